"""HTStep: what one vLLM forward pass does beyond the plain model, built by the runner.

Two meanings of "step", kept apart: an `HTStep` is one forward pass (an engine step); a *pseudo
step* s is how far ahead a pseudo row drafts (`HiddenTransferConfig.num_steps` of them, k). Here s
is 0-based (s < D), in `vllm_ht.config` 1-based: anchor a's pseudo row for 0-based s drafts the
token at a's position + s + 2.

It travels in `get_forward_context().additional_kwargs["vllm_ht"]` (no hidden state on modules):
the attention backend reads the real rows' window mask and the pseudo rows' layout, the transfer
op (`transfer.py`) reads which rows become pseudo states, and the runner reads the pseudo rows'
final states after the forward.

Words as in `vllm_ht.tree`: a request's *window* is its rows scheduled this step; a *tree
request* schedules a root + N draft nodes (BFS order); every other request is causal over its
window. An *anchor* is a real row that gets pseudo rows (its drafts for the next step).

**Pseudo rows are ordinary rows of the model's input.** The runner appends them after the
scheduled (and padded) rows, so the step is one forward of vLLM's compiled model with more rows:
  rows [0, T)                 the real rows (T = scheduled tokens)
  rows [T, start)             vLLM's padding, if any
  rows [start, start + A*D)   pseudo rows, anchor-major: row start + a * D + s is anchor a's
                              pseudo row for pseudo step s (s < D, the depth the next tree reads)
Below their transfer layer, pseudo rows carry a dummy token and see nothing (their attention
output is zero; they write no K/V: slots exist only for real rows). At the transfer layer l_s
the transfer op overwrites row (a, s) with W_s h^l of anchor a (residual 0); from there on it
attends to what its anchor sees plus the earlier pseudo rows of its own group.

Worked example: two requests, q_lens [3, 1] (a 3-row tree root+(0,)+(1,) and a 1-token decode),
anchors = every tree node and the decode row, D = 2, one transfer layer, T = start = 4:
    real window mask per request: [[T,F,F],[T,T,F],[T,F,T]] and [[T]]
    anchors [0, 1, 2, 3], anchor_seq [0, 0, 0, 1]; pseudo rows 4..11, row 4 + 2a + s
    pseudo queries per request: [4, 10) and [10, 12) -> query_start_loc [0, 6, 8]
    window keys: request 0 = real rows 0, 1, 2 then pseudo rows 4..9; request 1 = row 3, rows 10, 11
    mask of pseudo row (a=1, s=1) (row 7) over request 0's window [0,1,2 | 4,5,6,7,8,9]:
        [T, T, F | F, F, T, T, F, F]   (anchor 1 sees the root and itself; group 1, steps 0..1)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_ht.kernels import pack_window_mask

from ..pseudo_group import group_visible
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


def window_mask(q_lens: list[int], trees: dict[int, TokenTree]) -> torch.Tensor:
    """bool [T, max q_len]: each real row against its own request's window (causal, or the tree's
    ancestor mask for tree requests). q_lens [2, 1] -> [[T, F], [T, T], [T, F]]."""
    lens = torch.tensor(q_lens, dtype=torch.long)
    width = max(int(lens.max()) if q_lens else 1, 1)
    starts = row_starts(q_lens)
    seq = torch.repeat_interleave(torch.arange(len(q_lens)), lens)                      # [T]
    local = torch.arange(seq.numel()) - torch.tensor(starts[:-1], dtype=torch.long)[seq]  # [T]
    dense = torch.arange(width)[None, :] <= local[:, None]                              # causal
    for i, tree in trees.items():
        n = q_lens[i]
        dense[starts[i] : starts[i] + n, :n] = tree.prefix(n).mask
    return dense


def row_starts(q_lens: list[int]) -> list[int]:
    """First row of each request's window, then the total: q_lens [3, 1] -> [0, 3, 4]. (The one
    place the step's running row offsets are built.)"""
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    return starts


@dataclass
class PseudoRows:
    """The step's pseudo rows (see the module docstring for the row layout)."""
    start: int                      # first pseudo row in the model's input
    depth: int                      # D: pseudo rows per anchor (steps 0..D-1)
    anchors: torch.Tensor           # [A] long, real row of each anchor (grouped by request)
    anchor_seq: torch.Tensor        # [A] long, request index of each anchor
    positions: torch.Tensor         # [A * D] long, anchor position + s + 1
    query_start_loc: torch.Tensor   # [B + 1] int32, pseudo queries per request (relative to start)
    window_rows: torch.Tensor       # [W] long, model rows of each request's window keys
    window_start_loc: torch.Tensor  # [B + 1] int32
    masks: dict[int, torch.Tensor]  # first layer of a join group -> [A * D, words] int32
    joins: dict[int, list[int]]     # transfer layer -> steps (< D) that join there
    # The same for real and pseudo rows together, in window order (rows = window_rows): tree steps
    # run one attention call per layer over both from the first transfer layer on.
    joint_masks: dict[int, torch.Tensor]   # join group -> [W, words] int32

    @property
    def num_rows(self) -> int:
        return self.anchors.numel() * self.depth

    def group_for_layer(self, layer: int) -> int | None:
        """The join group in force at a layer (the key of its mask in `masks`), or None below the
        first transfer layer."""
        joined = [j for j in self.masks if j <= layer]
        return max(joined) if joined else None


@dataclass
class HTStep:
    q_lens: list[int]                        # rows per request, batch order
    trees: dict[int, TokenTree]              # request index -> its tree (requests with drafts)
    real_mask_bits: torch.Tensor             # [T, words] int32, real rows vs their window
    real_visible: torch.Tensor               # [T, max q_len] bool, the same unpacked
    pseudo: PseudoRows | None = None         # None: no pseudo rows this step

    @classmethod
    def build(cls, q_lens: list[int], trees: dict[int, TokenTree]) -> "HTStep":
        visible = window_mask(q_lens, trees)
        return cls(q_lens=list(q_lens), trees=trees, real_mask_bits=pack_window_mask(visible), real_visible=visible)

    @property
    def num_real(self) -> int:
        return sum(self.q_lens)

    @property
    def row_starts(self) -> list[int]:
        """First row of each request's window, then the total: q_lens [3, 1] -> [0, 3, 4]."""
        return row_starts(self.q_lens)

    @property
    def causal(self) -> bool:
        """Every real row sees its whole window before it: no trees, or only chains (a chain's
        ancestor mask is the causal mask), so vLLM's causal attention kernel serves the real rows."""
        return all(all(p == (0,) * len(p) for p in tree.paths) for tree in self.trees.values())

    def add_pseudo_rows(self, anchor_rows: dict[int, list[int]], depth: int, start: int,
                        positions: torch.Tensor, joins: dict[int, list[int]]) -> None:
        """anchor_rows: request index -> local rows (within its window) to anchor; positions [T] the
        real rows' positions; joins: transfer layer -> steps joining there (all steps, any depth)."""
        starts = self.row_starts
        rows, seqs = [], []
        for i in sorted(anchor_rows):
            rows += [starts[i] + r for r in anchor_rows[i]]
            seqs += [i] * len(anchor_rows[i])
        if not rows or depth < 1:
            return
        anchors, anchor_seq = torch.tensor(rows, dtype=torch.long), torch.tensor(seqs, dtype=torch.long)
        num_seqs, num_anchors = len(self.q_lens), len(rows)
        lens = torch.tensor(self.q_lens, dtype=torch.long)                           # [B]
        per_seq = torch.bincount(anchor_seq, minlength=num_seqs)                      # [B] anchors
        first_anchor = per_seq.cumsum(0) - per_seq                                    # [B]
        q_loc = torch.cat([torch.zeros(1, dtype=torch.long), (per_seq * depth).cumsum(0)])
        w_lens = lens + per_seq * depth
        w_loc = torch.cat([torch.zeros(1, dtype=torch.long), w_lens.cumsum(0)])
        # window keys of request b: its real rows, then its pseudo rows
        seq_of_key = torch.repeat_interleave(torch.arange(num_seqs), w_lens)          # [W]
        local_key = torch.arange(seq_of_key.numel()) - w_loc[seq_of_key]
        real_start = torch.tensor(starts[:-1], dtype=torch.long)
        is_real = local_key < lens[seq_of_key]
        window_rows = torch.where(is_real, real_start[seq_of_key] + local_key,
                                  start + q_loc[seq_of_key] + local_key - lens[seq_of_key])
        # pseudo row q = a * D + s: its anchor's real visibility, then its group's steps <= s
        q = torch.arange(num_anchors * depth)
        a, s = q // depth, q % depth
        seq_q = anchor_seq[a]
        width = int(w_lens.max())
        base = torch.zeros(q.numel(), width, dtype=torch.bool)
        real_w = self.real_visible.shape[1]
        base[:, :real_w] = self.real_visible[anchors[a]] & (torch.arange(real_w) < lens[seq_q][:, None])
        group_cols = (lens[seq_q] + (a - first_anchor[seq_q]) * depth)[:, None] + torch.arange(depth)  # [Q, D]
        steps = torch.arange(depth)
        join_of_step = {s_: j for j, ss in joins.items() for s_ in ss}
        used = {j: [s_ for s_ in ss if s_ < depth] for j, ss in joins.items()}
        used = {j: ss for j, ss in sorted(used.items()) if ss}
        # real rows in window order: their own visibility over the real part of the window
        real_rows = torch.zeros(seq_of_key.numel(), width, dtype=torch.bool)
        real_rows[is_real, :real_w] = self.real_visible[window_rows[is_real]]
        is_pseudo = ~is_real
        masks, joint_masks = {}, {}
        for j in used:
            joined = torch.tensor([join_of_step[s_] <= j for s_ in range(depth)])    # [D]
            vis = group_visible(s, steps) & joined[None, :]
            m = base.clone()
            m.scatter_(1, group_cols, vis)
            masks[j] = pack_window_mask(m)
            joint = real_rows.clone()
            joint[is_pseudo] = m
            joint_masks[j] = pack_window_mask(joint)
        self.pseudo = PseudoRows(
            start=start, depth=depth, anchors=anchors, anchor_seq=anchor_seq,
            positions=(positions[anchors].long()[:, None] + torch.arange(1, depth + 1)).flatten(),
            query_start_loc=q_loc.to(torch.int32), window_rows=window_rows,
            window_start_loc=w_loc.to(torch.int32), masks=masks, joins=used, joint_masks=joint_masks)

    def pseudo_hidden(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """The model's output rows -> the pseudo rows' final states [A, D, d] (None without any)."""
        p = self.pseudo
        if p is None:
            return None
        return hidden[p.start : p.start + p.num_rows].view(p.anchors.numel(), p.depth, -1)
