"""Draft policy: which tree a step uses and which of its nodes carry pseudo rows, per batch size.

Speculation spends compute to save steps. Whether it pays depends on the draft accuracy (the
checkpoint's measured conditional top-r table) and on what extra rows cost on this hardware
(`StepCost`). Words as in `vllm_ht.tree`; in addition:
- anchor: a tree node that carries k pseudo rows. Only the accepted node's pseudo rows are used,
  so a node unlikely to end the accepted path is a poor anchor.
- drafting step (D): the request has a tree. If the accepted node is an anchor (probability q,
  the anchors' summed end probabilities) the next step drafts again; otherwise the next step is a
  plain step (P) whose one row is an anchor, so the step after drafts again.
  Stationary shares: pi_D = 1 / (2 - q), pi_P = (1 - q) / (2 - q).

Predicted speedup against plain decoding at batch B (costs in units of a 1-request decode step):
    tokens/step   pi_D * tau + pi_P                      (tau = expected accepted length + bonus)
    plain cost    1 + row * (B - 1)
    HT cost       plain cost + fixed + B * (pi_D * (row * N + pseudo * k * A) + pi_P * pseudo * k)
    speedup       tokens/step * plain cost / HT cost
with N draft nodes and A anchors. The policy takes the best (tree, anchors) over the candidate
budgets, or no drafting (speedup 1, no pseudo rows at all) when nothing beats plain by `margin`.

Example (this CPU, bf16: row 0.07, pseudo 0.03, fixed 0.3; the shipped checkpoint, depth-1 top-1
0.47): the best tree at batch 1 (3 drafts, 2 anchors) is predicted at 0.97x, so no batch size
drafts and every step is the plain model; with fixed 0.1 (cheaper steps) batch 1 would draft.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..tree import TokenTree, end_probabilities, expected_accepted_length, template_for_budget

CANDIDATE_BUDGETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


@dataclass(frozen=True)
class StepCost:
    """What a step's extra rows cost, in units of one single-request decode step.

    Defaults: measured with vLLM's CPU build, bf16, SmolLM2-135M on a 2-core AVX512-BF16 Xeon
    without AMX (see benchmarks/README.md): extra rows are far from free there. A GPU has
    much cheaper rows; set them through additional_config (README, "Serving with Hidden Transfer")."""
    row: float = 0.07          # one more real row: every layer + the LM head
    pseudo_row: float = 0.03   # one pseudo row: the layers from the transfer layer up
    # per HT step: tree masks, attention plans, verification, compaction, and what the row terms
    # miss. Fitted to measured batch-1 decoding with the shipped checkpoint (3-draft tree, 2 anchors,
    # eager): 1.65 decode steps per HT step, of which the row terms explain 0.35. (A compiled engine
    # runs these steps eagerly against a faster plain step, so there drafting costs more still.)
    fixed: float = 0.30

    def __post_init__(self) -> None:
        if min(self.row, self.pseudo_row, self.fixed) < 0:
            raise ValueError(f"step costs must be >= 0, got {self}")


@dataclass(frozen=True)
class DraftPlan:
    tree: TokenTree                   # root + N draft nodes (N = 0: no drafting)
    anchors: tuple[int, ...]          # nodes with pseudo rows, ascending
    speedup: float                    # predicted, vs plain decoding at this batch size
    tokens_per_step: float = 1.0

    @property
    def drafts(self) -> bool:
        return self.tree.num_nodes > 1 and bool(self.anchors)


def no_drafts() -> DraftPlan:
    return DraftPlan(tree=TokenTree.from_paths([]), anchors=(), speedup=1.0)


def predicted_speedup(tree: TokenTree, anchors: Sequence[int], accuracy: Sequence[Sequence[float]],
                      num_steps: int, batch_size: int, cost: StepCost) -> tuple[float, float]:
    """(speedup vs plain, tokens per step) of drafting with `tree` and these anchors at a batch size."""
    ends = end_probabilities(tree, accuracy)                                  # [N + 1]
    q = float(ends[list(anchors)].sum()) if anchors else 0.0
    pi_d = 1.0 / (2.0 - q)
    pi_p = 1.0 - pi_d
    tau = expected_accepted_length(tree.paths, accuracy)
    tokens = pi_d * tau + pi_p
    plain = 1.0 + cost.row * (batch_size - 1)
    extra = pi_d * (cost.row * (tree.num_nodes - 1) + cost.pseudo_row * num_steps * len(anchors)) \
        + pi_p * cost.pseudo_row * num_steps
    ht = plain + cost.fixed + batch_size * extra
    return tokens * plain / ht, tokens


def best_plan(batch_size: int, accuracy: Sequence[Sequence[float]], templates: dict, num_steps: int,
              cost: StepCost, budgets: Sequence[int] = CANDIDATE_BUDGETS, max_nodes: int = 64,
              pseudo_nodes: int | None = None, margin: float = 0.02) -> DraftPlan:
    """The (tree, anchors) with the highest predicted speedup at this batch size, or no drafting."""
    best = no_drafts()
    for n in budgets:
        if n > max_nodes:
            break
        tree = template_for_budget(templates, accuracy, n, num_steps)
        order = end_probabilities(tree, accuracy).argsort(descending=True).tolist()
        counts = [pseudo_nodes] if pseudo_nodes else range(1, tree.num_nodes + 1)
        for a in counts:
            anchors = tuple(sorted(order[: min(a, tree.num_nodes)]))
            speedup, tokens = predicted_speedup(tree, anchors, accuracy, num_steps, batch_size, cost)
            if speedup > max(best.speedup, 1.0 + margin):
                best = DraftPlan(tree=tree, anchors=anchors, speedup=speedup, tokens_per_step=tokens)
    return best
