"""Hybrid draft trees: the pseudo rows' tree and a prompt-lookup chain, verified in one pass.

Words as in `vllm_ht.tree`. A request's draft has two sources:
- pseudo: the policy's tree, its tokens read from the accepted node's pseudo rows (top-r per depth);
- lookup: a chain continuing the longest match of the request's last tokens in its own prompt +
  output (vLLM's n-gram matcher, vllm_ht/vllm/lookup.py). It needs no pseudo rows.
Verification does not care where a draft came from, so the merged tree is verified exactly like a
pseudo tree (lossless either way).

Merge: the lookup chain is inserted into the pseudo tree as into a trie. While its token equals a
child's token it walks down that child (the node then has both sources); from the first token no
child has, it hangs new nodes, each with rank LOOKUP_RANK (so siblings keep distinct tokens, and
BFS order puts lookup children after their pseudo siblings). Example, pseudo tree [(0,), (1,), (0, 0)]
with tokens [7, 9, 4] and lookup [7, 5, 6]:
    paths  (0,) (1,) (0,0) (0,L) (0,L,L)      L = LOOKUP_RANK
    tokens  7    9    4     5     6
    source  P+L  P    P     L     L            lookup nodes (depth 1..3): [1, 4, 5]
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .tree import TokenTree

LOOKUP_RANK = 1023          # a rank no pseudo row has: lookup nodes in a merged tree's paths
PSEUDO, LOOKUP = 1, 2       # source bits per node


@dataclass(frozen=True)
class Draft:
    """One request's proposed tree: what the runner schedules, verifies and counts per source."""
    tree: TokenTree
    tokens: tuple[int, ...]          # nodes 1..N, BFS order (what vLLM schedules)
    anchors: tuple[int, ...]         # nodes that get pseudo rows when the tree is verified
    sources: tuple[int, ...]         # nodes 0..N: PSEUDO | LOOKUP bits (root 0)
    lookup_nodes: tuple[int, ...]    # the lookup chain's node at depth 1, 2, .. (a path from the root)

    def prefix(self, num_nodes: int) -> "Draft":
        """The first num_nodes rows (root included), as the scheduler cuts from the end."""
        n = max(num_nodes, 1)
        return Draft(self.tree.prefix(n), self.tokens[: n - 1], tuple(a for a in self.anchors if a < n),
                     self.sources[:n], tuple(x for x in self.lookup_nodes if x < n))


def merge(tree: TokenTree, tokens: Sequence[int], anchors: Sequence[int], lookup: Sequence[int],
          lookup_anchor: bool = False) -> Draft:
    """The pseudo tree (nodes 1..N with `tokens`, `anchors`) with the lookup chain merged in.

    lookup_anchor: the chain's deepest new node also gets pseudo rows (when the whole chain is
    accepted, the next step can still draft from pseudo rows)."""
    if len(tokens) != tree.num_nodes - 1:
        raise ValueError(f"{len(tokens)} tokens for a tree of {tree.num_nodes - 1} nodes")
    token_of = {p: int(t) for p, t in zip(tree.paths, tokens)}
    source = {p: PSEUDO for p in tree.paths}
    kids: dict[tuple, dict[int, tuple]] = {}
    for p in tree.paths:
        kids.setdefault(p[:-1], {})[token_of[p]] = p
    anchor_paths = [tree.paths[a - 1] if a else () for a in anchors]
    chain, here, new = [], (), False
    for t in lookup:
        t = int(t)
        hit = None if new else kids.get(here, {}).get(t)
        if hit is None:
            new, hit = True, here + (LOOKUP_RANK,)
            token_of[hit] = t
        source[hit] = source.get(hit, 0) | LOOKUP
        chain.append(hit)
        here = hit
    if lookup_anchor and new and chain and chain[-1] not in anchor_paths:
        anchor_paths.append(chain[-1])
    merged = TokenTree.from_paths(list(token_of))
    index = {p: i for i, p in enumerate(merged.paths, start=1)} | {(): 0}
    return Draft(tree=merged, tokens=tuple(token_of[p] for p in merged.paths),
                 anchors=tuple(sorted(index[p] for p in anchor_paths)),
                 sources=(0,) + tuple(source[p] for p in merged.paths),
                 lookup_nodes=tuple(index[p] for p in chain))


def lookup_only(lookup: Sequence[int], anchors: Sequence[int] = ()) -> Draft:
    """A lookup chain alone (the accepted node had no pseudo rows); `anchors` may name the root (0)
    and -1 for the chain's last node."""
    draft = merge(TokenTree.from_paths([]), [], [], lookup)
    last = draft.lookup_nodes[-1] if draft.lookup_nodes else 0
    picked = sorted({last if a == -1 else a for a in anchors})
    return Draft(draft.tree, draft.tokens, tuple(picked), draft.sources, draft.lookup_nodes)


def source_counts(draft: Draft, accepted: Sequence[int]) -> dict[str, tuple[int, int]]:
    """Per source: (draft nodes proposed, draft nodes on the accepted path). A node both sources
    proposed counts for both, and for "both"."""
    on_path = set(accepted[1:])
    out = {}
    for name, bit in (("pseudo", PSEUDO), ("lookup", LOOKUP), ("both", PSEUDO | LOOKUP)):
        nodes = [i for i, s in enumerate(draft.sources) if s & bit == bit]
        out[name] = (len(nodes), sum(1 for i in nodes if i in on_path))
    return out


def lookup_depth_accepted(draft: Draft, accepted: Sequence[int]) -> tuple[int, int]:
    """(chain length proposed, chain nodes accepted): the accepted path follows the chain for a
    prefix of it."""
    on_path = set(accepted)
    depth = 0
    for node in draft.lookup_nodes:
        if node not in on_path:
            break
        depth += 1
    return len(draft.lookup_nodes), depth
