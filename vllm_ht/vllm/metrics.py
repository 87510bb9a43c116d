"""Acceptance statistics of the HT runner: tau (tokens per verification step, bonus included)
and per-depth acceptance (share of tree steps whose accepted path reaches depth d)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class HTStats:
    tree_steps: int = 0                 # request-steps verified with a tree
    drafted_nodes: int = 0              # tree nodes scheduled (root excluded)
    accepted: int = 0                   # accepted draft tokens
    per_depth: list[int] = field(default_factory=list)  # [d-1]: tree steps accepting >= d drafts

    def record(self, num_accepted: int, num_nodes: int) -> None:
        self.tree_steps += 1
        self.drafted_nodes += num_nodes
        self.accepted += num_accepted
        while len(self.per_depth) < num_accepted:
            self.per_depth.append(0)
        for d in range(num_accepted):
            self.per_depth[d] += 1

    @property
    def mean_accepted_length(self) -> float:
        return 1.0 + self.accepted / self.tree_steps if self.tree_steps else 0.0

    def summary(self) -> dict:
        return {"tree_steps": self.tree_steps, "drafted_nodes": self.drafted_nodes, "accepted_tokens": self.accepted,
                "mean_accepted_length": round(self.mean_accepted_length, 4),
                "acceptance_per_depth": [round(c / self.tree_steps, 4) for c in self.per_depth] if self.tree_steps else []}
