"""Draft policy: which tree a step uses and which of its nodes carry pseudo rows, per batch size.

Speculation spends compute to save steps. Whether it pays depends on the draft accuracy (the
checkpoint's measured conditional top-r table) and on what extra rows cost on this hardware
(`StepCost`). Words as in `vllm_ht.tree`; in addition:
- anchor: a tree node that carries pseudo rows (D = the tree's depth: what the next tree
  reads). Only the accepted node's pseudo rows are used,
  so a node unlikely to end the accepted path is a poor anchor.
- drafting step (D): the request has a tree. If the accepted node is an anchor (probability q,
  the anchors' summed end probabilities) the next step drafts again; otherwise the next step is a
  plain step (P) whose one row is an anchor, so the step after drafts again.
  Stationary shares: pi_D = 1 / (2 - q), pi_P = (1 - q) / (2 - q).

Predicted speedup against plain decoding at batch B and mean context C tokens (costs in units of
a 1-request decode step, `StepCost`):
    tokens/step   pi_D * tau + pi_P                      (tau = expected accepted length + bonus)
    plain cost    1 + batch_row * (B - 1)
    HT cost       plain cost + fixed
                  + B * (pi_D * (row * N + pseudo * D * A) + pi_P * pseudo * D + context * C / 1000)
    speedup       tokens/step * plain cost / HT cost
with N draft nodes, A anchors and D = the tree's depth (pseudo rows per anchor). The policy takes the best (tree, anchors) over the candidate
budgets, or no drafting (speedup 1, no pseudo rows at all) when nothing beats plain by `margin`.

The costs come from `vllm-ht calibrate` on the user's hardware (StepCost's defaults are a
cautious fallback).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .tree import TokenTree, end_probabilities, expected_accepted_length, template_for_budget

CANDIDATE_BUDGETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


@dataclass(frozen=True)
class StepCost:
    """What a step's extra rows cost, in units of one single-request decode step.

    Measured on the user's hardware by `vllm-ht calibrate` (vllm_ht/tools/calibrate.py), which
    writes them to a file the plugin reads by default. These defaults are only the fallback
    without a calibration: deliberately cautious (drafting must clearly pay)."""
    row: float = 0.07          # one more draft (tree) row: every layer + the LM head
    pseudo_row: float = 0.03   # one pseudo row
    fixed: float = 0.30        # per HT step: masks, attention plans, verification, compaction, drafting
    context: float = 0.0       # per request and 1,000 context tokens, in a step with a tree or pseudo rows
    batch_row: float | None = None   # one more request in a plain decode step (None: `row`)

    def __post_init__(self) -> None:
        if min(self.row, self.pseudo_row, self.fixed, self.context, self.plain_row) < 0:
            raise ValueError(f"step costs must be >= 0, got {self}")

    @property
    def plain_row(self) -> float:
        return self.row if self.batch_row is None else self.batch_row


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
                      num_steps: int, batch_size: int, cost: StepCost,
                      context_tokens: float = 0.0) -> tuple[float, float]:
    """(speedup vs plain, tokens per step) of drafting with `tree` and these anchors at a batch size
    and a mean context length. Each anchor carries D = min(k, tree depth) pseudo rows (what the
    next tree reads)."""
    ends = end_probabilities(tree, accuracy)                                  # [N + 1]
    q = float(ends[list(anchors)].sum()) if anchors else 0.0
    pi_d = 1.0 / (2.0 - q)
    pi_p = 1.0 - pi_d
    tau = expected_accepted_length(tree.paths, accuracy)
    tokens = pi_d * tau + pi_p
    depth = min(num_steps, tree.max_depth)
    plain = 1.0 + cost.plain_row * (batch_size - 1)
    extra = pi_d * (cost.row * (tree.num_nodes - 1) + cost.pseudo_row * depth * len(anchors)) \
        + pi_p * cost.pseudo_row * depth + cost.context * context_tokens / 1000.0
    ht = plain + cost.fixed + batch_size * extra
    return tokens * plain / ht, tokens


def best_plan(batch_size: int, accuracy: Sequence[Sequence[float]], templates: dict, num_steps: int,
              cost: StepCost, budgets: Sequence[int] = CANDIDATE_BUDGETS, max_nodes: int = 64,
              pseudo_nodes: int | None = None, margin: float = 0.02, context_tokens: float = 0.0) -> DraftPlan:
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
            speedup, tokens = predicted_speedup(tree, anchors, accuracy, num_steps, batch_size, cost,
                                                context_tokens)
            if speedup > max(best.speedup, 1.0 + margin):
                best = DraftPlan(tree=tree, anchors=anchors, speedup=speedup, tokens_per_step=tokens)
    return best


class LookupStats:
    """Measured acceptance of the lookup chains (hybrid trees, vllm_ht/hybrid.py), for the policy.

    reached(d) = P(the accepted path follows the chain through depth d | the chain had >= d nodes),
    with a weak prior (PRIOR_WEIGHT pseudo-observations of PRIOR[d]) so the first steps try chains
    and measurement takes over within a few dozen verified chains."""
    PRIOR = (0.5, 0.35, 0.25, 0.2, 0.15, 0.12, 0.1, 0.08)
    PRIOR_WEIGHT = 4.0

    def __init__(self, max_len: int = 8) -> None:
        self.proposed = [0] * max_len      # chains with >= d nodes, d = 1..max_len
        self.accepted = [0] * max_len      # of those, followed through depth d
        self.tried = 0                     # requests the matcher ran for
        self.matched = 0                   # ... and found a continuation

    def record_match(self, found: bool) -> None:
        self.tried += 1
        self.matched += int(found)

    def record(self, length: int, depth: int) -> None:
        for d in range(min(length, len(self.proposed))):
            self.proposed[d] += 1
            self.accepted[d] += int(d < depth)

    @property
    def match_rate(self) -> float:
        return (self.matched + 1.0) / (self.tried + 2.0)

    def reached(self, d: int) -> float:
        """Never above reached(d - 1): a chain cannot be followed further than it was followed."""
        out = 1.0
        for j in range(1, d + 1):
            prior = self.PRIOR[min(j, len(self.PRIOR)) - 1]
            est = (self.accepted[j - 1] + self.PRIOR_WEIGHT * prior) / (self.proposed[j - 1] + self.PRIOR_WEIGHT)
            out = min(out, est)
        return out


def lookup_row_cost(cost: StepCost, batch_size: int) -> float:
    """What one lookup node costs per request at this batch size (see best_lookup_length)."""
    return cost.row if batch_size <= 1 else max(cost.row, cost.plain_row)


def best_lookup_length(plan: DraftPlan, stats: LookupStats, batch_size: int, cost: StepCost,
                       max_len: int, margin: float = 0.02) -> int:
    """How many lookup nodes each request's tree gets at this batch size (0: none), under the same
    cost model as the pseudo tree: the plan gives tokens/step T and cost H (in decode steps), a
    chain of L nodes adds match_rate * sum_{d<=L} reached(d) tokens and match_rate * B * row * L
    cost, plus the fixed HT step cost when the plan itself does not draft. What a lookup node costs:
    - at batch 1, `row`: the calibration times trees of 1-16 drafts at batch 1 itself, and a chain
      of up to 8 nodes beside the policy's tree stays near that range. Pricing it as a batch row
      there cut the chains short: with the shipped checkpoint, fixed 8-node chains reached tau 2.53
      against the priced chains' 2.30 (benchmarks/results/checkpoint_ab.json; single runs whose
      tokens/s differ within their noise, so the speed effect of this pricing is not measured);
    - above batch 1, a whole extra row of a batch (max of `row` and `plain_row`): `row` is fit
      mostly on small trees, and at batch 4-8 lookup chains of 6-8 nodes measured 2.6-3 plain steps
      per step (benchmarks/results/throughput_hybrid.json)."""
    plain = 1.0 + cost.plain_row * (batch_size - 1)
    row = lookup_row_cost(cost, batch_size)
    tokens = plan.tokens_per_step if plan.drafts else 1.0
    base = tokens * plain / (plan.speedup if plan.drafts else 1.0)        # H
    m = stats.match_rate
    best_len, best = 0, tokens * plain / base * (1.0 if plan.drafts else 1.0 + margin)
    gain = 0.0
    for length in range(1, min(max_len, len(stats.proposed)) + 1):
        gain += stats.reached(length)
        extra = (0.0 if plan.drafts else cost.fixed) + m * batch_size * row * length
        value = (tokens + m * gain) * plain / (base + extra)
        if value > best:
            best_len, best = length, value
    return best_len
