"""Draft token trees: templates, their flattened layout, and template search.

Glossary (the words `verify.py` and the engines use):
- root: node 0, the bonus token of the previous step; at position p, not yet in the KV cache.
- node: a tree entry other than the root, one draft token. Nodes are numbered 1..N in BFS order.
- depth: root 0; a node at depth d sits at position p + d.
- path: a node's rank tuple (r_1, .., r_d): its depth-j ancestor is the rank-r_j (0-based) token of
  the previous step's pseudo row for step j. Siblings are distinct ranks, hence distinct tokens.
- template: the list of paths of a tree (root excluded), BFS-sorted and ancestor-closed, so any
  prefix of the list is itself a tree (vLLM's scheduler may truncate a request's tokens from the end).
- window mask: mask[i, j] is True when node j is node i or one of its ancestors.
- accuracy table: acc[d-1][r] = P(the rank-r draft at depth d is the right token | the path up to
  depth d-1 was right). Expected accepted length of a template = 1 (bonus) + sum over its paths of
  prod_j acc[j-1][r_j]: every node's path probability, since siblings are disjoint events.

Example, template [(0,), (1,), (0, 0)]:
    node:    0(root) 1=(0,) 2=(1,) 3=(0,0)
    parents: [-1, 0, 0, 1]    depths: [0, 1, 1, 2]
    mask row 3: [T, T, F, T]  (root, node 1, itself)
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import torch

Path = tuple[int, ...]

# Generic prior used when a checkpoint has no measured accuracies: conditional top-r accuracy
# falling with rank and depth, roughly the shape a freshly trained checkpoint shows.
DEFAULT_ACCURACY: list[list[float]] = [
    [0.40, 0.12, 0.06, 0.04, 0.03, 0.02, 0.015, 0.01],
    [0.30, 0.10, 0.05, 0.03, 0.02, 0.015, 0.01, 0.01],
    [0.25, 0.08, 0.04, 0.03, 0.02, 0.01, 0.01, 0.01],
    [0.22, 0.07, 0.04, 0.02, 0.02, 0.01, 0.01, 0.01],
    [0.20, 0.06, 0.03, 0.02, 0.01, 0.01, 0.01, 0.01],
]


def normalize_paths(paths: Sequence[Sequence[int]]) -> list[Path]:
    """Sort paths in BFS order (depth, then ranks) and check the set is ancestor-closed.

    [(0, 0), (1,), (0,)] -> [(0,), (1,), (0, 0)];   [(0, 1)] -> ValueError (no (0,)).
    """
    out = sorted({tuple(int(r) for r in p) for p in paths}, key=lambda p: (len(p), p))
    if len(out) != len(paths):
        raise ValueError(f"template has duplicate paths: {list(paths)}")
    have = set(out)
    for p in out:
        if len(p) == 0 or min(p) < 0:
            raise ValueError(f"template path {p} must be a non-empty tuple of ranks >= 0")
        if len(p) > 1 and p[:-1] not in have:
            raise ValueError(f"template is not ancestor-closed: {p} has no parent {p[:-1]}")
    return out


@dataclass(frozen=True)
class TokenTree:
    """A template flattened for one decode step: node 0 is the root, nodes 1..N the paths."""

    paths: tuple[Path, ...]  # N paths, BFS order

    @classmethod
    def from_paths(cls, paths: Sequence[Sequence[int]]) -> "TokenTree":
        return cls(tuple(normalize_paths(paths)))

    @property
    def num_nodes(self) -> int:
        """Root included: N + 1 rows per step."""
        return len(self.paths) + 1

    @property
    def max_depth(self) -> int:
        return max((len(p) for p in self.paths), default=0)

    def prefix(self, num_nodes: int) -> "TokenTree":
        """The tree of the first num_nodes rows (root included) — still a tree by BFS order."""
        return TokenTree(self.paths[: max(num_nodes - 1, 0)])

    @cached_property
    def _index(self) -> dict[Path, int]:
        return {p: i + 1 for i, p in enumerate(self.paths)} | {(): 0}

    @cached_property
    def parents(self) -> torch.Tensor:  # [N+1] long, root -1
        return torch.tensor([-1] + [self._index[p[:-1]] for p in self.paths], dtype=torch.long)

    @cached_property
    def depths(self) -> torch.Tensor:  # [N+1] long
        return torch.tensor([0] + [len(p) for p in self.paths], dtype=torch.long)

    @cached_property
    def ranks(self) -> torch.Tensor:  # [N+1] long, root -1
        return torch.tensor([-1] + [p[-1] for p in self.paths], dtype=torch.long)

    @cached_property
    def children(self) -> tuple[tuple[int, ...], ...]:  # per node, its children's indices
        kids: list[list[int]] = [[] for _ in range(self.num_nodes)]
        for i, parent in enumerate(self.parents.tolist()[1:], start=1):
            kids[parent].append(i)
        return tuple(tuple(k) for k in kids)

    @cached_property
    def mask(self) -> torch.Tensor:  # [N+1, N+1] bool, mask[i, j]: j is i or an ancestor of i
        n = self.num_nodes
        m = torch.eye(n, dtype=torch.bool)
        parents = self.parents.tolist()
        for i in range(1, n):  # BFS order: the parent's row is complete before its children's
            m[i] |= m[parents[i]]
        return m

    @cached_property
    def retrieve(self) -> torch.Tensor:  # [N+1, max_depth+1] node indices root..node, -1 padded
        out = torch.full((self.num_nodes, self.max_depth + 1), -1, dtype=torch.long)
        for i in range(self.num_nodes):
            path = self.path_to(i)
            out[i, : len(path)] = torch.tensor(path)
        return out

    def path_to(self, node: int) -> list[int]:
        """Node indices from the root to `node`, both included: path_to(3) -> [0, 1, 3] above."""
        p = self.paths[node - 1] if node else ()
        return [self._index[p[:j]] for j in range(len(p) + 1)]

    def positions(self, root_position: int) -> torch.Tensor:  # [N+1]
        return self.depths + root_position

    def node_tokens(self, root_token: int, draft_ids: torch.Tensor) -> torch.Tensor:
        """Token per node: draft_ids [k, R] (rank r of pseudo step d in row d-1) -> [N+1] long.

        draft_ids = [[7, 9], [4, 5]], template [(0,), (1,), (0, 0)], root 3 -> [3, 7, 9, 4]
        """
        if self.max_depth > draft_ids.shape[0] or max((p[-1] for p in self.paths), default=-1) >= draft_ids.shape[1]:
            raise ValueError(f"draft_ids {tuple(draft_ids.shape)} too small for a tree of depth "
                             f"{self.max_depth} using ranks up to {max(p[-1] for p in self.paths)}")
        d, r = self.depths[1:] - 1, self.ranks[1:]
        return torch.cat([torch.tensor([root_token], dtype=torch.long), draft_ids[d, r].long().cpu()])


def expected_accepted_length(paths: Sequence[Sequence[int]], accuracy: Sequence[Sequence[float]]) -> float:
    """1 (the bonus) + sum of path probabilities under the conditional accuracy table."""
    total = 1.0
    for p in paths:
        prob = 1.0
        for depth, rank in enumerate(p):
            row = accuracy[depth]
            prob *= row[rank] if rank < len(row) else 0.0
        total += prob
    return total


def best_template(accuracy: Sequence[Sequence[float]], num_nodes: int,
                  max_depth: int | None = None) -> list[Path]:
    """The template of `num_nodes` paths maximising expected accepted length.

    A child's path probability never exceeds its parent's, so growing the tree greedily from a
    max-heap of frontier paths picks the top-N path probabilities and stays ancestor-closed;
    that set is optimal for the additive objective. Ties break towards shallower, lower ranks.
    """
    depth_limit = len(accuracy) if max_depth is None else min(max_depth, len(accuracy))
    if num_nodes < 0:
        raise ValueError(f"num_nodes={num_nodes} must be >= 0")
    chosen: list[Path] = []
    heap: list[tuple[float, Path]] = []

    def push(path: Path, prob: float) -> None:
        depth, rank = len(path) - 1, path[-1]
        if depth < depth_limit and rank < len(accuracy[depth]):
            heapq.heappush(heap, (-prob * accuracy[depth][rank], path))

    push((0,), 1.0)
    while heap and len(chosen) < num_nodes:
        neg, path = heapq.heappop(heap)
        chosen.append(path)
        push(path[:-1] + (path[-1] + 1,), -neg / accuracy[len(path) - 1][path[-1]])  # next sibling
        push(path + (0,), -neg)  # first child
    return normalize_paths(chosen)


def calibrate_templates(accuracy: Sequence[Sequence[float]],
                        budgets: Sequence[int] = (1, 2, 4, 8, 16, 32, 64)) -> dict[int, list[list[int]]]:
    """Templates for every node budget, for HiddenTransferConfig.tree_templates."""
    return {n: [list(p) for p in best_template(accuracy, n)] for n in budgets}


def accuracy_table(accuracy: Sequence[Sequence[float]] | None, num_steps: int) -> list[Sequence[float]]:
    """The measured accuracy rows for depths 1..num_steps, DEFAULT_ACCURACY where none was measured."""
    table = list(accuracy or [])[:num_steps]
    return table + DEFAULT_ACCURACY[len(table):num_steps]


def template_for_budget(templates: dict[int, list[list[int]]], accuracy: Sequence[Sequence[float]] | None,
                        num_nodes: int, num_steps: int) -> TokenTree:
    """The tree for a node budget: the stored template for exactly that budget, else the best
    template under the measured `accuracy` (or DEFAULT_ACCURACY where nothing was measured)."""
    if num_nodes in templates:
        return TokenTree.from_paths(templates[num_nodes])
    return TokenTree.from_paths(best_template(accuracy_table(accuracy, num_steps), num_nodes))


def end_probabilities(tree: TokenTree, accuracy: Sequence[Sequence[float]]) -> torch.Tensor:
    """[N+1] P(the accepted path ends exactly at each node) under the accuracy table: the node's
    path probability minus its children's (root: 1 - sum of depth-1 path probabilities)."""
    path_p = torch.ones(tree.num_nodes)
    for i, p in enumerate(tree.paths, start=1):
        known = len(p) <= len(accuracy) and p[-1] < len(accuracy[len(p) - 1])   # lookup nodes: beyond the table
        path_p[i] = path_p[int(tree.parents[i])] * (accuracy[len(p) - 1][p[-1]] if known else 0.0)
    end = path_p.clone()
    for i in range(1, tree.num_nodes):
        end[int(tree.parents[i])] -= path_p[i]
    return end.clamp(min=0)


def likely_end_nodes(tree: TokenTree, accuracy: Sequence[Sequence[float]], count: int) -> list[int]:
    """The `count` nodes most likely to end the accepted path (ascending node order): the ones
    worth carrying pseudo rows when not every node can."""
    if count >= tree.num_nodes:
        return list(range(tree.num_nodes))
    return sorted(torch.topk(end_probabilities(tree, accuracy), count).indices.tolist())
