"""The HT model runner: vLLM's V1 runner with tree verification, KV compaction and tree drafting.

One step, per request (DESIGN §1, in vLLM's terms):
  _model_forward   tree requests get depth positions (root position + depth, written in place)
                   and the tree mask; the policy's anchor nodes (and the last row of a plain
                   decode/prefill) get D pseudo rows, D the depth the next tree reads: extra input
                   rows of the same compiled forward (HTStep in the forward context, step.py);
  _sample          vLLM's own sampler runs first (plain requests stay exactly stock); each tree
                   request is then re-decided by `verify_tree` and its accepted nodes' K/V are
                   compacted to contiguous slots, so the scheduler's count-based rollback is right.
                   A seeded sampled request draws every token by the verifier's rule, once per
                   token, with or without a tree (vLLM's sampler does not see its generator): its
                   tokens do not depend on the drafts it got;
  propose_draft_token_ids
                   the accepted node's pseudo rows -> top-r tokens per depth -> the next tree,
                   merged with a prompt-lookup chain (a hybrid tree, vllm_ht/hybrid.py).
Requests whose features assume a chain (penalties, logprobs, structured output, ...) get no
drafts and decode plainly.
"""
from __future__ import annotations

import contextlib
import functools
from collections import Counter
from dataclasses import dataclass, field

import torch
from vllm.forward_context import get_forward_context
from vllm.logger import init_logger

from vllm_ht import kernels

from .. import hybrid
from ..hybrid import Draft
from ..tree import TokenTree
from ..verify import SamplingParams, sample_token, verify_tree
from .attention import STEP_KEY
from .prometheus import publish_source_counts
from .self_check import SelfCheckReport, run_self_check
from ..policy import DraftPlan
from .step import HTStep, row_starts

# under vLLM's "vllm" logger, so its handler, format and VLLM_LOGGING_LEVEL show our lines
log = init_logger(f"vllm.{__name__}")


def chain_only_reason(sp) -> str | None:
    """Why a request must decode without drafts, or None. (Verification applies temperature,
    top-k and top-p only; everything else assumes one token per position.)"""
    checks = {"logprobs": sp.logprobs is not None or sp.prompt_logprobs is not None,
              "penalties": sp.presence_penalty != 0 or sp.frequency_penalty != 0 or sp.repetition_penalty != 1,
              "structured output": sp.structured_outputs is not None,
              "bad words": bool(sp.bad_words), "min tokens": sp.min_tokens > 0, "min_p": sp.min_p > 0,
              "logit bias": bool(sp.logit_bias) or bool(sp.allowed_token_ids),
              "thinking budget": sp.thinking_token_budget is not None,
              "logprob token ids": bool(sp.logprob_token_ids), "watermarking": bool(sp.watermarking)}
    return next((name for name, hit in checks.items() if hit), None)


def custom_logits_processors(logitsprocs) -> list[str]:
    """Class names of the engine's logits processors other than vLLM's built-in ones (min_p, logit
    bias, min tokens: chain_only_reason covers their requests). Verification does not apply them,
    and which requests such a processor acts on cannot be told from outside (often per-request
    `extra_args`), so while one is loaded no request drafts."""
    from vllm.v1.sample.logits_processor import BUILTIN_LOGITS_PROCESSORS

    return sorted({type(p).__name__ for p in logitsprocs.all if type(p) not in BUILTIN_LOGITS_PROCESSORS})


@dataclass
class StepState:
    """One engine step's HT state: created by `execute_model`, cleared after drafting.

    Hook order in vLLM's V1 runner (each reads what the ones before it wrote):
      execute_model            StepState(sched)
      _model_forward           .plan, .step (tree masks, pseudo rows), .untreed, .block_table, .cache_layout;
                               after the forward .pseudo_hidden
      _compute_logits          .pseudo_top (the pseudo rows ride along the real rows' LM head)
      sample_tokens -> _sample .rng_snapshots, .accepted (verification), then KV compaction
      _bookkeeping_sync        restores .rng_snapshots
      propose_draft_token_ids  the next trees from .pseudo_top; the state is dropped
    """
    sched: object                                      # vLLM's SchedulerOutput
    step: HTStep | None = None
    pseudo_hidden: torch.Tensor | None = None          # [A, D, d] final-normed pseudo states
    pseudo_top: torch.Tensor | None = None             # [A, D, r] their top-r token ids (long)
    plan: DraftPlan | None = None                      # the policy's tree and anchors for this step
    drafts: dict[int, Draft] = field(default_factory=dict)          # request index -> its scheduled draft
    accepted: dict[int, list[int]] = field(default_factory=dict)   # request index -> accepted rows
    block_table: torch.Tensor | None = None
    cache_layout: str = kernels.ROWS
    rng_snapshots: dict = field(default_factory=dict)
    untreed: set[int] = field(default_factory=set)   # draft-eligible requests sampling a token without a tree


class HTRunnerMixin:
    """Mixed into GPUModelRunner / CPUModelRunner (V1). Per-step state lives in `self.ht` (StepState)."""

    def _ht_setup(self) -> None:
        # req_id -> the Draft (tree, tokens, anchors, sources) we proposed; kept across steps in
        # which the request is not scheduled, dropped when it finishes
        self.ht_trees: dict[str, Draft] = {}
        self.ht: StepState | None = None
        self._ht_ids = torch.zeros(0, dtype=torch.int32)     # persistent input buffers (real + pseudo rows)
        self._ht_pos = torch.zeros(0, dtype=torch.int64)
        self.ht_step_counts: Counter = Counter()      # steps by kind ("plain", "tree", "pseudo", "padded")
        self.ht_source_counts: Counter = Counter()    # draft nodes by source: "<source>_drafted" / "_accepted"
        self.ht_kv_layout: dict = {}                  # the KV layout (and CPU_ATTN ISA) the attention backend uses
        self.ht_self_check: dict = {}                 # the start-up self-check's report (self_check.py)

    def load_model(self, *args, **kwargs):
        super().load_model(*args, **kwargs)
        # One LM-head pass per step for the real rows and the pseudo rows (the LM head is a read of
        # the whole vocabulary matrix, the same cost for 1 row or 20): see _compute_logits.
        self._ht_lm_head = self.model.compute_logits
        self.model.compute_logits = self._compute_logits

    def ht_run_self_check(self) -> None:
        """The start-up self-check (self_check.py), once the KV cache exists and the model is warm:
        a failure turns drafting off (plain vLLM) and says which check failed, or stops the engine
        in strict mode. Under tensor parallelism every rank runs the probe (its forward has
        collectives) and a check fails if it failed on any rank."""
        opts = self.drafter.options
        if opts.self_check == "off":
            self.ht_self_check = {"passed": None, "skipped": "self_check is off"}
            log.warning("vllm-ht: start-up self-check turned off (self_check='off'): drafts are not checked on "
                        "this platform")
            return
        report = run_self_check(self, opts.test_self_check_fault)
        group = self._ht_tp_group
        if group is not None:          # each rank compacted its own KV shard: a failure on any rank counts
            reports = [None] * group.world_size
            exception, report.exception = report.exception, None      # the exception stays on its rank
            torch.distributed.all_gather_object(reports, report, group=group.cpu_group)
            report = SelfCheckReport.merge(reports)
            report.exception = exception
        if report.exception is not None and opts.self_check == "strict":
            raise RuntimeError("vllm-ht: the start-up self-check raised inside HT's own step and "
                               "self_check='strict' was asked for") from report.exception
        self.ht_self_check = report.to_dict()
        if report.passed:
            log.info("vllm-ht: start-up self-check passed: %s", report.summary())
            return
        what = (f"could not run ({report.skipped})" if report.skipped
                else f"failed {', '.join(report.failed)}: {report.summary()}")
        if opts.self_check == "strict":
            raise RuntimeError(f"vllm-ht: the start-up self-check {what}. Hidden Transfer would not be lossless "
                               f"here, and self_check='strict' was asked for, so the engine stops. Report this "
                               f"with the log; meanwhile serve without --speculative-model, or with self_check "
                               f"'on' to serve as plain vLLM.")
        self.drafter.refuse(f"start-up self-check {what}")
        log.error("vllm-ht: the start-up self-check %s. HT does not draft in this engine: it serves as plain vLLM "
                  "(the same tokens, no speedup). Report this with the log; additional_config vllm_ht.self_check"
                  "='strict' stops the engine instead.", what)

    def _compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """vLLM asks for the real rows' logits right after the forward; this step's pseudo rows
        ride along, and only their top-r token ids (what the next tree reads) are kept."""
        st = self.ht
        if st is None or st.pseudo_hidden is None or st.pseudo_top is not None:
            return self._ht_lm_head(hidden)
        n = hidden.shape[0]                                                  # hidden [n, d]: the rows vLLM samples
        logits = self._ht_lm_head(torch.cat([hidden, st.pseudo_hidden.flatten(0, 1)]))   # [n + A*D, V]
        ranks = max((p[-1] for p in st.plan.tree.paths), default=0) + 1
        num_anchors, depth = st.pseudo_hidden.shape[:2]
        st.pseudo_top = torch.topk(logits[n:].float(), ranks, dim=-1).indices.view(num_anchors, depth, ranks)  # [A, D, r]
        return logits[:n]                                                    # [n, V]

    def execute_model(self, scheduler_output, intermediate_tensors=None):
        # an empty step returns early in vLLM (no sampling, no drafting): no state for it
        self.ht = StepState(sched=scheduler_output) if scheduler_output.total_num_scheduled_tokens else None
        return super().execute_model(scheduler_output, intermediate_tensors)

    # ---- forward ---------------------------------------------------------------------------
    @functools.cached_property
    def _custom_logits_processors(self) -> list[str]:
        return custom_logits_processors(self.input_batch.logitsprocs)

    def _wants_drafts(self, req_id: str) -> bool:
        state = self.requests.get(req_id)
        sp = getattr(state, "sampling_params", None)
        if sp is None:
            return False
        reason = chain_only_reason(sp)
        if reason is None and self._custom_logits_processors:
            reason = "custom logits processors (" + ", ".join(self._custom_logits_processors) + ")"
        if reason:
            log.warning_once("vllm-ht: requests using %s (and other chain-only features) decode without drafts",
                             reason)
        return reason is None

    def _build_step(self, positions: torch.Tensor, num_input: int, drafting: bool) -> HTStep:
        """The step's trees (tree rows get depth positions, written in place into `positions`) and,
        when drafting, its pseudo rows after the `num_input` input rows."""
        so, batch = self.ht.sched, self.input_batch
        req_ids = batch.req_ids[: batch.num_reqs]
        q_lens = [so.num_scheduled_tokens[r] for r in req_ids]
        trees, planned, last_rows = {}, {}, {}
        for i, (req_id, n, start) in enumerate(zip(req_ids, q_lens, row_starts(q_lens))):
            drafts = so.scheduled_spec_decode_tokens.get(req_id) or []
            # A chain-only request can still arrive with drafts: vLLM's scheduler pads some new
            # decodes with placeholder drafts (-1). Those stay a causal chain that vLLM's own
            # rejection sampler decides (so penalties, logit bias, ... apply): never an HT tree.
            if drafts and self._wants_drafts(req_id):
                trees[i], planned[i] = self._scheduled_tree(i, req_id, drafts)
                tree = trees[i]
                positions[start + 1 : start + n] = positions[start] + tree.depths[1:].to(positions.device)
            elif not drafts and batch.num_computed_tokens_cpu[i] + n >= batch.num_tokens_no_spec[i]:
                last_rows[i] = n - 1                  # samples this step (partial prefill chunks do not)
        if self.drafter.can_draft:     # else HT decodes as plain vLLM, seeded draws included
            self.ht.untreed = {i for i in last_rows if self._wants_drafts(req_ids[i])}
        step = HTStep.build(q_lens, trees)
        # The policy's batch size is every request in the step (prefill chunks too): counting only
        # the sampling ones would plan batch-1 trees while other prompts are still prefilling.
        n = batch.num_reqs
        context = float(batch.num_computed_tokens_cpu[:n].mean()) if n else 0.0
        self.ht.plan = plan = self.drafter.plan_for_batch(n, context)
        if drafting and plan.drafts:                  # else: no pseudo rows at all
            anchors = {i: planned[i] or self.drafter.anchor_nodes(tree) for i, tree in trees.items()}
            anchors.update({i: [row] for i, row in last_rows.items() if self._wants_drafts(req_ids[i])})
            step.add_pseudo_rows(anchors, plan.tree.max_depth, num_input, positions[: step.num_real].cpu(),
                                 self.model.ht_config.joins)
        return step

    def _scheduled_tree(self, i: int, req_id: str, drafts: list[int]) -> tuple[TokenTree, list[int] | None]:
        """The tree of a request's scheduled drafts and the anchors its plan gave it: the tree we
        proposed, cut to what the scheduler kept (it trims from the end; anchors past the cut go);
        drafts we did not propose are verified as a plain chain (anchors: None, the policy's)."""
        draft = self.ht_trees.get(req_id)
        if draft is not None and len(drafts) <= len(draft.tokens) and list(drafts) == list(draft.tokens[: len(drafts)]):
            self.ht.drafts[i] = cut = draft.prefix(len(drafts) + 1)
            return cut.tree, list(cut.anchors) or None
        return TokenTree.from_paths([[0] * d for d in range(1, len(drafts) + 1)]), None

    def _input_fits_in_drafter(self, *args, **kwargs) -> bool:
        # vLLM asks whether a separate draft model could take the sequence; near max_model_len it
        # then schedules placeholder drafts of zeros. HT drafts come from this step's own pseudo
        # rows, and the scheduler already trims drafts to the context end.
        return True

    def _model_forward(self, input_ids=None, positions=None, intermediate_tensors=None,
                       inputs_embeds=None, **model_kwargs):
        st = self.ht
        if st is None or positions is None:
            return super()._model_forward(input_ids, positions, intermediate_tensors, inputs_embeds, **model_kwargs)
        num_input = positions.shape[0]
        st.step = step = self._build_step(positions, num_input, drafting=input_ids is not None)
        fc = get_forward_context()
        fc.additional_kwargs[STEP_KEY] = step
        md = fc.attn_metadata
        if isinstance(md, dict) and md:
            first = next(iter(md.values()))
            st.block_table = first.block_table
            st.cache_layout = getattr(first, "cache_layout", kernels.ROWS)
            self.ht_kv_layout = {"layout": st.cache_layout, "isa": getattr(first, "isa", None)}
        self._count_step(step, num_input)
        if step.pseudo is not None:      # the same compiled forward over the real + pseudo rows
            input_ids, positions = self._with_pseudo_rows(input_ids, positions, step.pseudo)
        try:
            hidden = super()._model_forward(input_ids, positions, intermediate_tensors, inputs_embeds, **model_kwargs)
        finally:
            fc.additional_kwargs.pop(STEP_KEY, None)
        if step.pseudo is None:
            return hidden
        st.pseudo_hidden = step.pseudo_hidden(hidden)
        return hidden[:num_input]

    def _with_pseudo_rows(self, input_ids: torch.Tensor, positions: torch.Tensor, pseudo) -> tuple:
        """Input ids and positions for real + pseudo rows, in persistent buffers written in place
        (grown, rarely, when a step needs more rows than any before it)."""
        n, total = positions.shape[0], pseudo.start + pseudo.num_rows
        if self._ht_pos.shape[0] < total or self._ht_pos.device != positions.device:
            size = max(total, 2 * self._ht_pos.shape[0])
            self._ht_ids = torch.zeros(size, dtype=input_ids.dtype, device=input_ids.device)
            self._ht_pos = torch.zeros(size, dtype=positions.dtype, device=positions.device)
        ids, pos = self._ht_ids[:total], self._ht_pos[:total]        # [n + pseudo rows]: real rows first
        ids[:n].copy_(input_ids)
        ids[n:].zero_()                                # pseudo rows' dummy token (replaced at the transfer layer)
        pos[:n].copy_(positions)
        limit = self.model_config.max_model_len - 1    # RoPE table bound; drafts past the end are cut anyway
        pos[n:].copy_(pseudo.positions.clamp(max=limit))
        return ids, pos

    def _count_step(self, step: HTStep, num_input: int) -> None:
        """Steps by kind: plain / tree / pseudo (any step with pseudo rows), and among those with
        pseudo rows: tree+pseudo, and decode+pseudo (every request decodes one row, no tree)."""
        kind = "pseudo" if step.pseudo is not None else "tree" if step.trees else "plain"
        self.ht_step_counts[kind] += 1
        if step.trees and step.pseudo is not None:
            self.ht_step_counts["tree+pseudo"] += 1
        if step.pseudo is not None and not step.trees and all(n == 1 for n in step.q_lens):
            self.ht_step_counts["decode+pseudo"] += 1
        if num_input > step.num_real:
            self.ht_step_counts["padded"] += 1

    # ---- verification + compaction ---------------------------------------------------------
    def _request_params(self, i: int) -> tuple[SamplingParams, torch.Generator | None]:
        state = self.requests[self.input_batch.req_ids[i]]
        sp = state.sampling_params
        if sp.temperature < 1e-5:
            return SamplingParams(), None
        top_k = sp.top_k if 0 < sp.top_k < self.input_batch.vocab_size else 0
        return SamplingParams(sp.temperature, top_k, sp.top_p), state.generator

    def _sample(self, logits, spec_decode_metadata):
        st = self.ht
        if st is not None:
            st.rng_snapshots = self._snapshot_discarded_generators()
        step = st.step if st is not None else None
        verifying = step is not None and spec_decode_metadata is not None and bool(step.trees)
        redraw = self._seeded_untreed(st) if step is not None else {}
        ends = []
        if redraw or verifying:       # logits rows per request, summed (one row each without drafts)
            ends = (spec_decode_metadata.cu_num_sampled_tokens.tolist() if spec_decode_metadata is not None
                    else list(range(1, len(step.q_lens) + 1)))
        # before vLLM's sampler, which may scale and mask its logits in place
        redrawn = {i: sample_token(logits[ends[i] - 1], params, gen) for i, (params, gen) in redraw.items()}
        with self._generators_held([*(step.trees if verifying else ()), *redraw]):
            out = super()._sample(logits, spec_decode_metadata)
        if step is None:
            return out
        accepted = {i: [n - 1] for i, n in enumerate(step.q_lens)}
        sampled = out.sampled_token_ids
        if redraw or verifying:
            sampled = sampled.clone()
        for i, token in redrawn.items():
            sampled[i, 0] = token
        if verifying:
            argmax = logits.argmax(-1).tolist()                            # every greedy decision at once
            req_ids = self.input_batch.req_ids
            for i, tree in sorted(step.trees.items()):
                first = ends[i - 1] if i else 0
                tokens = [-1] + self.ht.sched.scheduled_spec_decode_tokens[req_ids[i]][: tree.num_nodes - 1]
                params, gen = self._request_params(i)
                res = verify_tree(tree, torch.tensor(tokens), logits[first : first + tree.num_nodes], params, gen,
                                  argmax=argmax[first : first + tree.num_nodes] if params.greedy else None,
                                  biased=self.drafter.options.test_biased_verifier)
                sampled[i] = -1
                sampled[i, : len(res.emitted)] = torch.tensor(res.emitted, dtype=sampled.dtype)
                accepted[i] = res.accepted
        if self._ht_tp_group is not None:
            device = sampled.device
            sampled, accepted = self._from_first_rank((sampled.cpu(), accepted))
            sampled = sampled.to(device)
        st.accepted = accepted
        if verifying:
            self._count_sources(st.drafts, accepted)
        out.sampled_token_ids = sampled
        if verifying:
            self._compact(step)
        return out

    def _seeded_untreed(self, st: StepState) -> dict[int, tuple[SamplingParams, torch.Generator]]:
        """Seeded, sampled, draft-eligible requests that sample a token this step without a tree
        (a prefill, or a decode whose accepted node carried no pseudo rows and found no lookup
        chain): drawn by the verifier's rule too, so such a request draws once per token by one
        rule whether or not a step had a tree."""
        out = {}
        for i in sorted(st.untreed):
            params, gen = self._request_params(i)
            if gen is not None and not params.greedy:
                out[i] = (params, gen)
        return out

    @contextlib.contextmanager
    def _generators_held(self, requests):
        """Keep these requests' seeded generators away from vLLM while the block runs: from its
        sampler, whose tokens for them we replace (`verify_tree`, `sample_token`), and from its
        rewind of discarded samples (`_bookkeeping_sync`). vLLM's rejection sampler draws per draft
        row, so the stream would depend on the tree; without it, a seeded request draws once per
        emitted token: its tokens do not depend on its drafts (nor on draft near-ties between TP
        sizes)."""
        gens = self.input_batch.generators
        held = {i: gens.pop(i) for i in requests if i in gens}
        try:
            yield
        finally:
            gens.update(held)

    def _count_sources(self, drafts: dict[int, Draft], accepted: dict[int, list[int]]) -> None:
        """Per-source draft and accepted nodes (Prometheus, benchmark JSON) and the lookup chains'
        measured acceptance (the policy's lookup length)."""
        for i, draft in drafts.items():
            for name, (drafted, hit) in hybrid.source_counts(draft, accepted[i]).items():
                self.ht_source_counts[name + "_drafted"] += drafted
                self.ht_source_counts[name + "_accepted"] += hit
            if draft.lookup_nodes:
                self.drafter.lookup_stats.record(*hybrid.lookup_depth_accepted(draft, accepted[i]))
        if drafts:
            self.ht_source_counts["verified_trees"] += len(drafts)
            group = self._ht_tp_group
            if group is None or group.rank_in_group == 0:       # every rank verifies the same trees
                publish_source_counts(self.ht_source_counts)

    def _compact(self, step: HTStep) -> None:
        """Move each tree request's accepted nodes' K/V to the contiguous slots after the root."""
        src, dst, loc = [], [], [0]
        ctx = self._ht_context_positions(step)
        for i in range(len(step.q_lens)):
            if i in step.trees:
                moves = [(ctx[i] + a, ctx[i] + j) for j, a in enumerate(self.ht.accepted[i]) if a != j]
                src += [s for s, _ in moves]
                dst += [d for _, d in moves]
            loc.append(len(src))
        if src:
            dev = self.ht.block_table.device
            kernels.compact_kv(self.kv_caches, self.ht.block_table,
                               torch.tensor(src, dtype=torch.int32, device=dev),
                               torch.tensor(dst, dtype=torch.int32, device=dev),
                               torch.tensor(loc, dtype=torch.int32, device=dev), self.ht.cache_layout)

    # ---- seeded requests in partial prefill (vLLM CPU) ---------------------------------------
    def _snapshot_discarded_generators(self) -> dict:
        """RNG states, before sampling, of seeded requests whose sample this step is discarded
        (partial prefill chunks). vLLM rewinds those with `set_offset`, which only CUDA generators
        have: on the CPU build it raises and kills the engine. We restore the state instead."""
        n = self.input_batch.num_reqs
        gens = self.input_batch.generators
        return {int(i): gens[int(i)].get_state() for i in self.discard_request_mask.np[:n].nonzero()[0]
                if int(i) in gens and gens[int(i)].device.type == "cpu"}

    def _bookkeeping_sync(self, *args, **kwargs):
        snapshots = self.ht.rng_snapshots if self.ht is not None else {}
        gens = self.input_batch.generators
        try:
            with self._generators_held(snapshots):
                return super()._bookkeeping_sync(*args, **kwargs)
        finally:
            for i, state in snapshots.items():
                if i in gens:
                    gens[i].set_state(state)
            if self.ht is not None:
                self.ht.rng_snapshots = {}

    def _ht_context_positions(self, step: HTStep) -> list[int]:
        """Position of each request's first scheduled row (the root, for tree requests)."""
        return [int(self.input_batch.num_computed_tokens_cpu[i]) for i in range(len(step.q_lens))]

    # ---- drafting --------------------------------------------------------------------------
    def propose_draft_token_ids(self, scheduler_output, sampled_token_ids, *args, **kwargs):
        live = [i for i, toks in enumerate(sampled_token_ids) if toks]
        drafts = self._from_first_rank(self._propose(sampled_token_ids, live))
        for req_id in scheduler_output.finished_req_ids:
            self.ht_trees.pop(req_id, None)
        for i, draft in enumerate(drafts):
            req_id = self.input_batch.req_ids[i]
            if draft is not None:
                self.ht_trees[req_id] = draft
            else:
                self.ht_trees.pop(req_id, None)
        self.ht = None                                                    # the step is over
        return [list(d.tokens) if d is not None else [] for d in drafts]

    def _propose(self, sampled_token_ids, live: list[int]) -> list[Draft | None]:
        """Each live request's next tree: the pseudo tree from its accepted node's pseudo rows (if
        that node is an anchor), merged with a prompt-lookup chain over its prompt + output."""
        st, drafter = self.ht, self.drafter
        result: list[Draft | None] = [None] * len(sampled_token_ids)
        if st is None or st.plan is None:
            return result
        plan = st.plan                                   # the plan _build_step used
        picks = self._pseudo_picks(live) if plan.drafts else {}
        length = drafter.lookup_length(plan, self.input_batch.num_reqs)
        # the matcher runs while the policy gives chains no nodes too (cheap next to a step): its
        # match rate keeps following the text, so chains come back when copying starts
        probe = drafter.lookup_room(plan, self.input_batch.num_reqs) > 0
        batch = self.input_batch
        for i in live:
            lookup = []
            if (length or probe) and self._wants_drafts(batch.req_ids[i]):
                found = drafter.lookup.propose(batch.token_ids_cpu[i, : batch.num_tokens_no_spec[i]], length or 1)
                drafter.lookup_stats.record_match(bool(found))
                lookup = found if length else []
            if i in picks:
                tokens = drafter.drafts(plan.tree, sampled_token_ids[i][-1], st.pseudo_top[picks[i]])
                draft = hybrid.merge(plan.tree, tokens, plan.anchors, lookup, lookup_anchor=True)
            elif lookup:      # the accepted node had no pseudo rows: the chain alone (root + its end anchored)
                draft = hybrid.lookup_only(lookup, anchors=(0, -1) if plan.drafts else ())
            else:
                continue
            result[i] = draft
        return result

    def _pseudo_picks(self, live: list[int]) -> dict[int, int]:
        """Request index -> its pseudo-row anchor index, for the live requests whose accepted node
        carried pseudo rows this step."""
        st = self.ht
        if st.pseudo_hidden is None or st.pseudo_top is None:   # no pseudo rows (or no logits) this step
            return {}
        starts = st.step.row_starts
        anchor_of_row = {int(r): a for a, r in enumerate(st.step.pseudo.anchors.tolist())}
        picks = {}
        for i in live:
            if not self._wants_drafts(self.input_batch.req_ids[i]):
                continue
            node = st.accepted.get(i, [None])[-1]
            a = anchor_of_row.get(starts[i] + node) if node is not None else None
            if a is not None:
                picks[i] = a
        return picks

    # ---- tensor parallelism: the first rank decides, every rank applies ------------------------
    def _from_first_rank(self, obj):
        """Under tensor parallelism every rank samples, verifies and drafts from the same
        all-gathered logits (keeping RNG streams in step); the first rank's result (sampled tokens,
        accepted nodes, next drafts) is what all ranks apply, so inputs, trees and KV compaction
        can never drift apart between head shards."""
        group = self._ht_tp_group
        return obj if group is None else group.broadcast_object(obj, src=0)

    @functools.cached_property
    def _ht_tp_group(self):
        """vLLM's tensor-parallel group, or None at TP=1 (looked up once, after distributed init)."""
        from vllm.distributed import get_tp_group

        group = get_tp_group()
        return group if group.world_size > 1 else None
