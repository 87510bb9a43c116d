"""HTStep: what one vLLM forward pass does beyond the plain model, built by the runner.

It travels in `get_forward_context().additional_kwargs["vllm_ht"]` (no hidden state on modules):
the attention backend reads the real rows' window mask, the model reads the anchors and writes
the pseudo rows' final states back into it, and the runner reads those after sampling.

Words as in `vllm_ht.tree`: a request's *window* is its rows scheduled this step; a *tree
request* schedules a root + N draft nodes (BFS order); every other request is causal over its
window. An *anchor* is a real row that gets k pseudo rows (its drafts for the next step).

Example: two requests, q_lens [3, 1] (a 3-row tree root+(0,)+(1,) and a 1-token decode):
    real window mask per request: [[T,F,F],[T,T,F],[T,F,T]] and [[T]]
    anchors [0, 1, 2, 3] (every tree node, the decode row), anchor_seq [0, 0, 0, 1]
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kernels import pack_window_mask

from ..tree import TokenTree


def causal_blocks(q_lens: list[int]) -> list[torch.Tensor]:
    return [torch.ones(n, n, dtype=torch.bool).tril() for n in q_lens]


def pack_blocks(blocks: list[torch.Tensor]) -> torch.Tensor:
    """Per-request bool masks [n_b, w_b] -> one int32 bitmask [sum n_b, ceil(max w_b / 32)]."""
    width = max((b.shape[1] for b in blocks), default=1)
    rows = sum(b.shape[0] for b in blocks)
    dense = torch.zeros(rows, max(width, 1), dtype=torch.bool)
    r = 0
    for b in blocks:
        dense[r : r + b.shape[0], : b.shape[1]] = b
        r += b.shape[0]
    return pack_window_mask(dense)


@dataclass
class PseudoLayout:
    """Rows of a layer at/after a join, grouped by request: [req0 real, req0 pseudo, req1 real, ...].

    order [T + Q]: grouped position -> row of cat([real rows, pseudo rows]); inverse undoes it.
    """
    order: torch.Tensor             # [T + Q] long
    inverse: torch.Tensor           # [T + Q] long
    start_loc: torch.Tensor         # [B + 1] int32 (queries == window keys, both grouped)
    mask_bits: torch.Tensor         # [T + Q, words] int32
    positions: torch.Tensor         # [Q] pseudo row positions (anchor position + s + 1)


@dataclass
class HTStep:
    q_lens: list[int]                        # rows per request, batch order
    trees: dict[int, TokenTree]              # request index -> its tree (requests with drafts)
    anchors: torch.Tensor                    # [P] long, real row indices
    anchor_seq: torch.Tensor                 # [P] long, request index of each anchor
    real_mask_bits: torch.Tensor             # [T, words] int32, real rows vs their window
    pseudo_hidden: torch.Tensor | None = None  # [P, k, d], written by the model
    _blocks: list[torch.Tensor] = field(default_factory=list, repr=False)

    @classmethod
    def build(cls, q_lens: list[int], trees: dict[int, TokenTree], anchor_rows: dict[int, list[int]]) -> "HTStep":
        """anchor_rows: request index -> local row indices (within its window) to anchor."""
        blocks = [trees[i].prefix(n).mask if i in trees else torch.ones(n, n, dtype=torch.bool).tril()
                  for i, n in enumerate(q_lens)]
        starts = [0]
        for n in q_lens:
            starts.append(starts[-1] + n)
        anchors, seqs = [], []
        for i in sorted(anchor_rows):
            anchors += [starts[i] + r for r in anchor_rows[i]]
            seqs += [i] * len(anchor_rows[i])
        return cls(q_lens=list(q_lens), trees=trees, anchors=torch.tensor(anchors, dtype=torch.long),
                   anchor_seq=torch.tensor(seqs, dtype=torch.long), real_mask_bits=pack_blocks(blocks),
                   _blocks=blocks)

    @property
    def num_real(self) -> int:
        return sum(self.q_lens)

    def pseudo_layout(self, p_anchor: torch.Tensor, p_step: torch.Tensor, positions: torch.Tensor) -> PseudoLayout:
        """Layout for real rows + pseudo rows (p_anchor [Q] index into anchors, p_step [Q])."""
        starts = torch.tensor([0] + self.q_lens).cumsum(0)
        t = self.num_real
        order, blocks, start_loc = [], [], [0]
        for b, n in enumerate(self.q_lens):
            mine = (self.anchor_seq[p_anchor] == b).nonzero().flatten()  # pseudo rows of request b
            order += list(range(int(starts[b]), int(starts[b]) + n)) + (t + mine).tolist()
            q = mine.numel()
            m = torch.zeros(n + q, n + q, dtype=torch.bool)
            m[:n, :n] = self._blocks[b]
            if q:
                local_anchor = self.anchors[p_anchor[mine]] - int(starts[b])           # [q]
                m[n:, :n] = self._blocks[b][local_anchor]
                same = p_anchor[mine][:, None] == p_anchor[mine][None, :]
                earlier = p_step[mine][None, :] <= p_step[mine][:, None]
                m[n:, n:] = same & earlier
            blocks.append(m)
            start_loc.append(start_loc[-1] + n + q)
        order_t = torch.tensor(order, dtype=torch.long)
        inverse = torch.empty_like(order_t)
        inverse[order_t] = torch.arange(order_t.numel())
        pos = positions[self.anchors[p_anchor]] + p_step + 1
        return PseudoLayout(order=order_t, inverse=inverse, start_loc=torch.tensor(start_loc, dtype=torch.int32),
                            mask_bits=pack_blocks(blocks), positions=pos)
