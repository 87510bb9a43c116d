"""ReferenceEngine: Hidden Transfer generation on HF transformers (batch 1) — the oracle and CPU demo.

One decode step is propose -> verify -> compact:
  propose: the previous step's accepted node left k pseudo rows; their top-r tokens fill the tree
           template under the root (the previous bonus token);
  verify:  one forward of the tree rows (+ their pseudo rows) and `verify_tree`;
  compact: the accepted rows' K/V move to contiguous slots.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..checkpoint import load_checkpoint
from ..config import HiddenTransferConfig
from ..projections import TransferProjections
from ..tree import TokenTree, template_for_budget
from ..verify import SamplingParams, sample_token, verify_tree
from .cache import KVCache
from .forward import HTForward, StepInput

log = logging.getLogger(__name__)
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


@dataclass
class GenerationResult:
    tokens: list[int]                 # generated token ids (eos included if it was produced)
    seconds: float                    # wall time, prefill included
    steps: int = 0                    # verification steps (HT) or decode steps (plain)
    accepted_per_depth: list[int] = field(default_factory=list)  # steps accepting >= d drafts, d=1..k

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds else 0.0

    @property
    def tau(self) -> float:
        """Tokens emitted per verification step, bonus included (prefill's token excluded)."""
        return (len(self.tokens) - 1) / self.steps if self.steps else 0.0


class ReferenceEngine:
    def __init__(self, model_dir: str | Path, checkpoint: str | Path | None = None, dtype: str = "fp32",
                 num_nodes: int = 16, max_len: int = 4096, model: torch.nn.Module | None = None,
                 medusa: str | Path | None = None):
        """medusa: a Medusa heads file (`medusa.safetensors` from `vllm-ht train --medusa`): the
        baseline drafter, used instead of pseudo rows, with the same trees and verification."""
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}: use fp32 or bf16")
        self.dtype = DTYPES[dtype]
        self.model = model if model is not None else AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=self.dtype).eval()
        self.model.requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        mcfg = self.model.config
        if checkpoint is None:
            self.config = HiddenTransferConfig.for_model(mcfg, base_model=str(model_dir))
            self.projections = TransferProjections(self.config)
        else:
            self.config, self.projections = load_checkpoint(checkpoint)
            self.config.check_model(mcfg)
            self.config.check_servable()
        self.projections.to(self.dtype)
        self.medusa = None
        if medusa is not None:
            from ..training.medusa import MedusaHeads

            self.medusa = MedusaHeads.load(str(medusa)).to(self.dtype).requires_grad_(False)
        self.forward = HTForward(self.model, self.projections, self.config)
        self.tree = template_for_budget(self.config.tree_templates, self.config.topr_accuracy,
                                        num_nodes, self.config.num_steps)
        self.num_ranks = max((p[-1] for p in self.tree.paths), default=0) + 1
        head_dim = self.model.model.layers[0].self_attn.head_dim
        self.cache = KVCache(mcfg.num_hidden_layers, mcfg.num_key_value_heads, head_dim, max_len, self.dtype)
        self.eos = self._eos_ids()

    def _eos_ids(self) -> set[int]:
        ids = self.model.generation_config.eos_token_id
        ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return set(ids)

    def encode_chat(self, text: str) -> list[int]:
        return self.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                  add_generation_prompt=True, tokenize=True,
                                                  return_dict=False)

    # ---- decoding ----------------------------------------------------------------------------
    def _prefill(self, prompt: list[int], want_drafts: bool):
        n = len(prompt)
        self.cache.reset()
        out = self.forward(StepInput(
            tokens=torch.tensor(prompt), positions=torch.arange(n),
            window_mask=torch.ones(n, n, dtype=torch.bool).tril(),
            anchors=torch.tensor([n - 1] if want_drafts else [], dtype=torch.long),
            logit_rows=torch.tensor([n - 1])), self.cache)
        self.cache.compact(list(range(n)))
        return out

    def _drafts(self, out, row: int) -> torch.Tensor:
        """Draft token ids [k, num_ranks] of real row `row` (the accepted node): from its k pseudo
        rows (HT), or from the Medusa heads on its final state."""
        states = self.medusa(out.real_hidden[row]) if self.medusa is not None else out.pseudo_hidden[row]
        return torch.topk(self.forward.logits(states), self.num_ranks, dim=-1).indices

    def _done(self, tokens: list[int], max_tokens: int) -> bool:
        return len(tokens) >= max_tokens or any(t in self.eos for t in tokens)

    def _finish(self, tokens: list[int], max_tokens: int) -> list[int]:
        """Cut at max_tokens and after the first eos: what plain decoding would have produced."""
        tokens = tokens[:max_tokens]
        for i, t in enumerate(tokens):
            if t in self.eos:
                return tokens[: i + 1]
        return tokens

    @torch.inference_mode()
    def generate_plain(self, prompt: list[int], max_tokens: int, params: SamplingParams = SamplingParams(),
                       seed: int | None = None) -> GenerationResult:
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        start = time.perf_counter()
        out = self._prefill(prompt, want_drafts=False)
        tokens, steps = [sample_token(out.real_logits[-1], params, gen)], 0
        one = torch.ones(1, 1, dtype=torch.bool)
        while not self._done(tokens, max_tokens):
            out = self.forward(StepInput(tokens=torch.tensor(tokens[-1:]),
                                         positions=torch.tensor([self.cache.length]), window_mask=one,
                                         anchors=torch.empty(0, dtype=torch.long)), self.cache)
            self.cache.compact([0])
            tokens.append(sample_token(out.real_logits[0], params, gen))
            steps += 1
        return GenerationResult(self._finish(tokens, max_tokens), time.perf_counter() - start, steps)

    @torch.inference_mode()
    def generate(self, prompt: list[int], max_tokens: int, params: SamplingParams = SamplingParams(),
                 seed: int | None = None, tree: TokenTree | None = None) -> GenerationResult:
        """Hidden Transfer decoding; the tokens equal generate_plain's (greedy), or follow the same
        distribution (sampling)."""
        tree = tree or self.tree
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        start = time.perf_counter()
        out = self._prefill(prompt, want_drafts=self.medusa is None)
        tokens = [sample_token(out.real_logits[-1], params, gen)]
        drafts = self._drafts(out, -1 if self.medusa is not None else 0)
        anchors = torch.arange(tree.num_nodes) if self.medusa is None else torch.empty(0, dtype=torch.long)
        steps, per_depth = 0, [0] * self.config.num_steps
        while not self._done(tokens, max_tokens):
            node_tokens = tree.node_tokens(tokens[-1], drafts)                       # propose
            out = self.forward(StepInput(tokens=node_tokens, positions=tree.positions(self.cache.length),
                                         window_mask=tree.mask, anchors=anchors), self.cache)
            result = verify_tree(tree, node_tokens, out.real_logits, params, gen)    # verify
            self.cache.compact(result.accepted)                                      # compact
            tokens += result.emitted
            drafts = self._drafts(out, result.accepted[-1])
            steps += 1
            for d in range(result.num_accepted_drafts):
                per_depth[d] += 1
        return GenerationResult(self._finish(tokens, max_tokens), time.perf_counter() - start,
                                steps, per_depth)
