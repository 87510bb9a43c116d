"""Draft accuracy on held-out self-distilled sequences, and tree calibration from it.

For every response position i (the anchor, i.e. a would-be accepted node) and step s, the rank of
the true next token x[i + s + 2] among the drafter's logits. From the rank tuples:
- per-depth top-r accuracy (marginal);
- path frequencies: freq(r_1..r_d) = share of anchors whose first d ranks are exactly r_1..r_d.
  A template accepts, at an anchor, as many drafts as it has paths that are prefixes of the
  anchor's rank tuple, so expected tau(template) = 1 + sum of its paths' frequencies — exact for
  greedy decoding of these sequences, and maximised by taking the N most frequent paths (a
  child is never more frequent than its parent, so that set is ancestor-closed).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm import tqdm

from ..backbone import Backbone
from ..config import HiddenTransferConfig
from ..tree import Path, normalize_paths
from .data import Sequence, collate
from .passes import pseudo_pass, real_pass, targets_valid

MAX_RANK = 10  # ranks >= MAX_RANK count as misses
BUDGETS = (1, 2, 4, 8, 16, 32, 64)


@dataclass
class DraftEval:
    ranks: torch.Tensor                          # [anchors, k] long; MAX_RANK = miss, -1 = no target
    seq_lens: list[int] | None = None            # anchors per sequence (rows of `ranks` in order)
    freq: dict[Path, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        counts: Counter = Counter()
        for row in self.ranks.tolist():
            for d in range(len(row)):
                if not 0 <= row[d] < MAX_RANK:
                    break
                counts[tuple(row[: d + 1])] += 1
        n = max(self.ranks.shape[0], 1)
        self.freq = {p: c / n for p, c in counts.items()}

    @property
    def num_steps(self) -> int:
        return self.ranks.shape[1]

    def topr(self, depth: int, r: int) -> float:
        """Marginal: P(true token within the top r of step `depth` (1-based)), over valid anchors."""
        col = self.ranks[:, depth - 1]
        valid = col >= 0
        return float(((col < r) & valid).sum() / valid.sum().clamp(min=1))

    def conditional_accuracy(self) -> list[list[float]]:
        """acc[d-1][r] = P(rank r at depth d | the true tokens of depths < d were all in the tree's
        reach, i.e. ranked < MAX_RANK) — the table tree.best_template uses for other budgets."""
        table = []
        for d in range(self.num_steps):
            prev_ok = (self.ranks[:, :d] >= 0).all(1) & (self.ranks[:, :d] < MAX_RANK).all(1) & (self.ranks[:, d] >= 0)
            col = self.ranks[prev_ok, d]
            n = max(col.numel(), 1)
            table.append([round(float((col == r).sum()) / n, 4) for r in range(MAX_RANK)])
        return table

    def best_template(self, budget: int) -> list[Path]:
        ordered = sorted(self.freq.items(), key=lambda kv: (-kv[1], len(kv[0]), kv[0]))
        return normalize_paths([p for p, _ in ordered[:budget]])

    def expected_tau(self, paths: list[Path]) -> float:
        return 1.0 + sum(self.freq.get(tuple(p), 0.0) for p in paths)

    def decoded_tau(self, paths: list[Path]) -> float:
        """Greedy decoding replayed on the held-out sequences: from an anchor, the template accepts
        as many drafts as it has paths that prefix the anchor's rank tuple (a); the next anchor is
        a + 1 positions on. Unlike expected_tau, this visits only the positions decoding visits."""
        have = {tuple(p) for p in paths}
        steps = emitted = 0
        start = 0
        for n in self.seq_lens or [self.ranks.shape[0]]:
            rows = self.ranks[start : start + n].tolist()
            start += n
            i = 0
            while i < n:
                a = 0
                while a < len(rows[i]) and 0 <= rows[i][a] < MAX_RANK and tuple(rows[i][: a + 1]) in have:
                    a += 1
                steps += 1
                emitted += min(a + 1, n - i)   # a cut sequence (`head`) ends at its last anchor
                i += a + 1
        return emitted / steps if steps else 0.0

    def head(self, n: int) -> "DraftEval":
        """Only the first n anchors of every sequence: what decoding the first n tokens sees."""
        rows, lens, start = [], [], 0
        for m in self.seq_lens or [self.ranks.shape[0]]:
            rows.append(self.ranks[start : start + min(m, n)])
            lens.append(rows[-1].shape[0])
            start += m
        return DraftEval(torch.cat(rows) if rows else self.ranks[:0], lens)

    def calibrated_templates(self, budgets=BUDGETS) -> dict[int, list[list[int]]]:
        """Only budgets the data can fill (enough distinct observed paths)."""
        return {n: [list(p) for p in self.best_template(n)] for n in budgets if n <= len(self.freq)}

    def summary(self, budgets=BUDGETS) -> dict:
        return {"anchors": int(self.ranks.shape[0]),
                "top1": [round(self.topr(d, 1), 4) for d in range(1, self.num_steps + 1)],
                "top5": [round(self.topr(d, 5), 4) for d in range(1, self.num_steps + 1)],
                "tau": {n: round(self.expected_tau(self.best_template(n)), 4) for n in budgets if n <= len(self.freq)},
                "decoded_tau": {n: round(self.decoded_tau(self.best_template(n)), 4)
                                for n in budgets if n <= len(self.freq)}}


Drafter = Callable[[object, torch.Tensor], torch.Tensor]  # (RealPass, anchors [B, A]) -> states [B, A, k, d]


def ht_drafter(bb: Backbone, projections, config: HiddenTransferConfig) -> Drafter:
    return lambda real, anchors: pseudo_pass(bb, projections, config, real, anchors)


def medusa_drafter(heads) -> Drafter:
    return lambda real, anchors: heads(real.final[torch.arange(anchors.shape[0])[:, None], anchors])


@torch.no_grad()
def evaluate(bb: Backbone, config: HiddenTransferConfig, drafters: dict[str, Drafter], seqs: list[Sequence],
             batch_size: int = 4, progress: bool = True) -> dict[str, DraftEval]:
    """Rank tuples of every drafter on every response anchor of `seqs` (one real pass per batch)."""
    k = config.num_steps
    ranks: dict[str, list[torch.Tensor]] = {name: [] for name in drafters}
    seq_lens: list[int] = []
    for start in tqdm(range(0, len(seqs), batch_size), desc="eval drafts", disable=not progress):
        batch = collate(seqs[start : start + batch_size])
        real = real_pass(bb, batch.ids, config)
        lo, hi = batch.prompt_lens - 1, batch.lengths - 3
        width = int((hi - lo).max()) + 1
        if width <= 0:
            continue
        anchors = (lo[:, None] + torch.arange(width)).clamp(max=batch.ids.shape[1] - 1)  # [B, A]
        in_range = anchors <= hi[:, None]
        valid = targets_valid(anchors, batch.lengths, k) & in_range[:, :, None]         # [B, A, k]
        seq_lens += in_range.sum(1).tolist()
        tpos = (anchors[:, :, None] + torch.arange(k) + 2).clamp(max=batch.ids.shape[1] - 1)
        truth = batch.ids[torch.arange(batch.ids.shape[0])[:, None, None], tpos]        # [B, A, k]
        for name, drafter in drafters.items():
            states = drafter(real, anchors)                                              # [B, A, k, d]
            r = torch.full(truth.shape, -1, dtype=torch.long)
            for b in range(states.shape[0]):  # one sequence at a time keeps logits small
                logits = bb.logits(states[b])                                            # [A, k, V]
                true_logit = logits.gather(-1, truth[b][..., None])
                r[b] = (logits > true_logit).sum(-1).clamp(max=MAX_RANK)
            r[~valid] = -1
            ranks[name].append(r[in_range])
    return {name: DraftEval(torch.cat(rs) if rs else torch.empty(0, k, dtype=torch.long), seq_lens)
            for name, rs in ranks.items()}
