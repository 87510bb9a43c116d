"""Tree verification: which drafts the target accepts, and the tokens one step emits.

Glossary (tree words as in `tree.py`):
- target distribution p(v): the target's next-token distribution at node v's row, after the
  request's temperature / top-k / top-p (greedy: a point mass on the argmax).
- accepted: the root, then each node whose token the target itself produced at its parent.
- emitted: the tokens of the accepted nodes after the root, then the bonus.
- bonus: the target's own token at the last accepted node; it is the next step's root.

The walk (DESIGN §1): at node v draw y ~ p(v) (greedy: y = argmax). If a child of v holds y,
accept that child and continue there; otherwise emit y and stop. Each emitted token is an exact
draw from the target given everything before it, so the output distribution is plain decoding's;
draft probabilities are never needed, and the stop token is never re-sampled.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .tree import TokenTree


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 -> greedy
    top_k: int = 0            # 0 -> off
    top_p: float = 1.0        # 1 -> off

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 means greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 means off)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class VerifyResult:
    accepted: list[int]  # node indices, root first: [0, 3, 7] accepts node 3 then node 7
    emitted: list[int]   # tokens: accepted nodes' tokens after the root, then the bonus

    @property
    def bonus(self) -> int:
        return self.emitted[-1]

    @property
    def num_accepted_drafts(self) -> int:
        return len(self.accepted) - 1


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [n, V] -> probabilities [n, V] (fp32) after temperature, top-k, then top-p."""
    x = logits.float() / params.temperature
    if params.top_k:
        kth = torch.topk(x, min(params.top_k, x.shape[-1]), dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        cum = sorted_x.softmax(-1).cumsum(-1)
        drop_sorted = cum - sorted_x.softmax(-1) >= params.top_p  # keep the smallest prefix reaching top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    return x.softmax(-1)


def sample_token(logits: torch.Tensor, params: SamplingParams,
                 generator: torch.Generator | None = None) -> int:
    """One draw from the target for a single row of logits [V] (the plain-decoding rule)."""
    if params.greedy:
        return int(logits.argmax())
    probs = target_probs(logits[None], params)[0]
    return int(torch.multinomial(probs, 1, generator=generator))


def verify_tree(tree: TokenTree, tokens: torch.Tensor, logits: torch.Tensor,
                params: SamplingParams = SamplingParams(),
                generator: torch.Generator | None = None, argmax: list[int] | None = None,
                biased: bool = False) -> VerifyResult:
    """Walk the tree from the root.

    tree: the step's TokenTree;  tokens: [N+1] node tokens (root first);  logits: [N+1, V],
    the target's logits at each node's row;  argmax: greedy only, logits.argmax(-1) as a list when
    the caller already has it (one reduction for a whole batch);  biased: a deliberately WRONG rule
    (when the draw matches no draft, take the first draft anyway), only as the negative control of
    the sampling tests (HTOptions.test_biased_verifier): it must fail them.
    """
    if tokens.shape[0] != tree.num_nodes or logits.shape[0] != tree.num_nodes:
        raise ValueError(f"tokens {tuple(tokens.shape)} / logits {tuple(logits.shape)} do not match a "
                         f"tree of {tree.num_nodes} nodes")
    toks = tokens.tolist()
    if params.greedy:  # all argmaxes at once: one reduction instead of one per visited node
        picks = logits.argmax(-1).tolist() if argmax is None else argmax
        draw = lambda v: picks[v]  # noqa: E731
    else:
        draw = lambda v: sample_token(logits[v], params, generator)  # noqa: E731
    node, accepted, emitted = 0, [0], []
    while True:
        y = draw(node)
        child = next((c for c in tree.children[node] if toks[c] == y), None)
        if biased and child is None and tree.children[node]:
            child = tree.children[node][0]
            y = toks[child]
        emitted.append(y)
        if child is None:
            return VerifyResult(accepted=accepted, emitted=emitted)
        accepted.append(child)
        node = child
