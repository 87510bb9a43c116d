"""HTProposer: the `custom_class` drafter vLLM builds; it owns the tree policy.

vLLM hands custom proposers token ids only, so drafting happens in the HT model runner, which
has the pseudo rows; it asks this object for the step's DraftPlan (tree + anchor nodes, by batch
size: vllm_ht/policy.py) and turns pseudo logits into the flattened draft list. Called
through vLLM's stock `propose()` (i.e. without the HT worker), it refuses with the fix.
"""
from __future__ import annotations

from pathlib import Path

import torch
from vllm.logger import init_logger

from ..tree import TokenTree, accuracy_table, likely_end_nodes, template_for_budget
from ..calibration import calibration_path, is_current, load_costs
from ..options import HTOptions
from ..policy import DraftPlan, LookupStats, StepCost, best_lookup_length, best_plan, no_drafts, predicted_speedup

# under vLLM's "vllm" logger, so its handler, format and VLLM_LOGGING_LEVEL show our lines
log = init_logger(f"vllm.{__name__}")


class HTProposer:
    def __init__(self, vllm_config):
        self.options = HTOptions.from_vllm_config(vllm_config)
        self.cost = self._load_cost(vllm_config)
        self.ht_config = None
        self._plans: dict[tuple[int, int], DraftPlan] = {}   # (batch size, context bucket) -> plan
        self._anchors: dict[TokenTree, list[int]] = {}     # tree (or a scheduled prefix) -> anchor nodes
        # the lookup source of hybrid trees: vLLM's n-gram matcher, and its measured acceptance
        self.lookup_stats = LookupStats()
        # why this engine must not draft (the start-up self-check failed, self_check.py), or None
        self.refusal: str | None = None
        if self.options.test_biased_verifier:
            log.warning("vllm-ht: test_biased_verifier is on: sampled verification is deliberately NOT lossless "
                        "(the negative control of the sampling tests); never serve with it")
        self.lookup = None
        if self.options.lookup and self.options.max_lookup_nodes:
            from .lookup import PromptLookup

            self.lookup = PromptLookup(self.options.lookup_min, self.options.lookup_max,
                                       vllm_config.model_config.max_model_len)

    def load_model(self, model) -> None:
        self.ht_config = getattr(model, "ht_config", None)
        if self.ht_config is None:
            raise RuntimeError("the Hidden Transfer proposer needs the HT model class: start vLLM with "
                               "--speculative-model hidden_transfer (or hf_overrides architectures="
                               "['HTLlamaForCausalLM']).")

    def propose(self, *args, **kwargs):
        raise RuntimeError("HTProposer drafts inside the HT model runner: start vLLM with "
                           "--speculative-model hidden_transfer (or --worker-cls vllm_ht.vllm.worker.HTCPUWorker "
                           "/ HTGPUWorker).")

    @property
    def accuracy(self) -> list:
        return accuracy_table(self.ht_config.topr_accuracy, self.ht_config.num_steps)

    def _load_cost(self, vllm_config) -> StepCost:
        """The options' explicit costs over the calibration file's over the defaults."""
        mc = vllm_config.model_config
        path = Path(self.options.calibration) if self.options.calibration else calibration_path(mc.model, mc.dtype)
        calibrated = load_costs(path)
        if calibrated is not None and not is_current(path):
            log.warning("vllm-ht: %s is not of the current calibration design (made by an older `vllm-ht "
                        "calibrate`, whose cells could not tell pseudo rows from draft rows, or by hand); using "
                        "cautious default costs instead. Rerun `vllm-ht calibrate --model %s` (or `make "
                        "calibrate`), or give the costs in --additional-config.", path, mc.model)
            calibrated = None
        elif calibrated is None:
            log.warning("vllm-ht: no step-cost calibration at %s; using cautious default costs (run "
                        "`vllm-ht calibrate --model %s` to measure this machine)", path, mc.model)
        else:
            log.info("vllm-ht: step costs from %s", path)
        return self.options.cost_with(calibrated)

    def plan_for_batch(self, batch_size: int, context_tokens: float = 0.0) -> DraftPlan:
        """The tree and anchors for a step with `batch_size` requests (all of them, prefill chunks
        included) at a mean context length; cached per size and context bucket (powers of two)."""
        batch_size = max(batch_size, 1)
        bucket = 1 << max(int(context_tokens), 1).bit_length()          # 100 -> 128, 1000 -> 1024
        key = (batch_size, bucket)
        if key not in self._plans:
            self._plans[key] = plan = self._make_plan(batch_size, bucket)
            self._anchors.setdefault(plan.tree, list(plan.anchors))
            log.info("vllm-ht: batch %d, context <%d -> %d draft nodes, %d with pseudo rows (predicted %.2fx "
                     "vs plain)", batch_size, bucket, plan.tree.num_nodes - 1, len(plan.anchors), plan.speedup)
        return self._plans[key]

    def _make_plan(self, batch_size: int, context_tokens: float) -> DraftPlan:
        opts, cfg = self.options, self.ht_config
        if not opts.pseudo or self.refusal:
            return no_drafts()
        cap = opts.max_nodes_for_batch(batch_size)
        if opts.num_nodes is None:
            return best_plan(batch_size, self.accuracy, cfg.tree_templates, cfg.num_steps, self.cost,
                             max_nodes=cap, pseudo_nodes=opts.pseudo_nodes, context_tokens=context_tokens)
        if opts.num_nodes == 0:
            return no_drafts()
        tree = template_for_budget(cfg.tree_templates, cfg.topr_accuracy, opts.num_nodes, cfg.num_steps)
        anchors = tuple(likely_end_nodes(tree, self.accuracy, opts.pseudo_nodes or tree.num_nodes))
        speedup, tokens = predicted_speedup(tree, anchors, self.accuracy, cfg.num_steps, batch_size, self.cost,
                                            context_tokens)
        return DraftPlan(tree=tree, anchors=anchors, speedup=speedup, tokens_per_step=tokens)

    def lookup_room(self, plan: DraftPlan, batch_size: int) -> int:
        """The most lookup nodes a request may get this step: the row budget left by the plan's
        tree, within the lookup options (0: no chain can be drafted)."""
        opts = self.options
        if self.lookup is None or self.refusal or opts.num_nodes == 0:   # --ht-num-nodes 0: no drafts at all
            return 0
        room = max(0, opts.max_nodes_for_batch(batch_size) - (plan.tree.num_nodes - 1 if plan.drafts else 0))
        return min(room, opts.max_lookup_nodes)

    def lookup_length(self, plan: DraftPlan, batch_size: int) -> int:
        """Lookup nodes per request this step (0: no lookup): fixed by the options, else the policy's
        from the measured lookup acceptance, within `lookup_room`. Where the policy's pseudo tree
        does not pay, a chain alone may at batch 1 (best_lookup_length then adds the HT step's fixed
        cost): 1.21x plain vLLM on the mixed prompts, fp32 AVX2, one round. Not above batch 1 (the
        step's requests, prefill chunks included): there chains alone lost under both calibration
        versions (0.87x / 0.67x at batch 4 / 8 on AMX, benchmarks/results/throughput_hybrid.json;
        0.93x at batch 4 on AVX2 with version 2, throughput_mixed_fp32_avx2_v2.json). With pseudo
        rows off (chains are then the only source) or a fixed `lookup_nodes`, chains alone are
        drafted at any batch size, as configured."""
        room = self.lookup_room(plan, batch_size)
        if not room:
            return 0
        if self.options.lookup_nodes is not None:
            return room
        if not plan.drafts and self.options.pseudo and batch_size > 1:
            return 0
        return best_lookup_length(plan, self.lookup_stats, max(batch_size, 1), self.cost, room)

    @property
    def can_draft(self) -> bool:
        """Whether any draft source may still propose (no refusal; pseudo rows or lookup on)."""
        return self.refusal is None and (self.options.pseudo or self.lookup is not None)

    def refuse(self, reason: str) -> None:
        """Draft nothing from now on (every step a plain step); cached plans are dropped."""
        self.refusal = reason
        self._plans.clear()

    def anchor_nodes(self, tree: TokenTree) -> list[int]:
        """Nodes of a scheduled tree that get pseudo rows: the plan's anchors, or for a prefix the
        scheduler cut from a planned tree, as many of its likeliest end nodes."""
        if tree not in self._anchors:
            count = max((len(p.anchors) for p in self._plans.values() if p.tree.num_nodes >= tree.num_nodes),
                        default=tree.num_nodes)
            self._anchors[tree] = likely_end_nodes(tree, self.accuracy, max(count, 1))
        return self._anchors[tree]

    @staticmethod
    def drafts(tree: TokenTree, root_token: int, top_ids: torch.Tensor) -> list[int]:
        """top_ids [D, r] (the accepted node's pseudo rows' top-r token ids) -> draft tokens of tree
        nodes 1..N (BFS)."""
        return tree.node_tokens(root_token, top_ids)[1:].tolist()
