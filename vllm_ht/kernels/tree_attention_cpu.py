"""Tree-masked paged attention on the CPU: planned once per step, run once per layer.

The torch reference (`vllm_ht.kernels.reference`) loops over sequences and validates every index on every
call: right for an oracle, slow for an engine that calls it once per layer with the same indices.
A plan does the index work once (arguments and glossary as in `vllm_ht.kernels.tree_attention` and
`vllm_ht.kernels.window_mask`):
  - context gather: for each sequence, the cache (block, offset) of each context position,
    padded to the longest context C;
  - window gather: for each sequence, the rows of its window keys, padded to the longest window W;
  - query grid: each query row's place in a padded [num_seqs, R] grid (R = most rows of a sequence);
  - mask [num_seqs, 1, R, C + W] bool: a context position is visible when < that sequence's
    context length, a window key when its bit is set and it belongs to the sequence.
Each layer is then one gather from the cache, one gather of window keys and one
`scaled_dot_product_attention` over the padded batch (fp32 accumulation for every input dtype).
The cache is read in either `vllm_ht.kernels.cache_layout` layout: ROWS gathers token rows; K_TRANSPOSED
(vLLM CPU_ATTN's packing) copies the sequence's blocks once into contiguous K and V (a view of the
cache, no gather, when one sequence's blocks are consecutive) and runs one fused SDPA.

Worked example: block_size 2, block_table [[4, 7], [2, 0]], context_lens [3, 1]
    context gather  seq 0: positions 0, 1, 2 -> (block 4, off 0), (4, 1), (7, 0)
                    seq 1: position 0 -> (2, 0); padding -> (2, 0) again, masked out
    query_start_loc [0, 2, 3]: rows 0, 1 -> grid (0, 0), (0, 1); row 2 -> grid (1, 0)
A row that sees no key at all gets zeros (as in the reference), not softmax's NaN.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vllm_ht.kernels._checks import check_tree_attention_args
from vllm_ht.kernels.cache_layout import ROWS, check_layout, split_k_transposed
from vllm_ht.kernels.window_mask import unpack_window_mask


@dataclass
class TreeAttentionPlan:
    num_rows: int
    num_window: int
    block_size: int
    ctx_block: torch.Tensor      # [S, C + W] long, cache block of each context position (padding and
                                 # the window part: a valid block, overwritten or masked)
    ctx_offset: torch.Tensor     # [S, C + W] long, offset inside that block
    window_rows: torch.Tensor    # [S, W] long, row of window_key for each local window key (padding: 0)
    row_grid: torch.Tensor       # [T] long, flat index of each query row in the [S, R] grid
    mask: torch.Tensor           # [S, 1, R, C + W] bool, True = visible
    blind_rows: torch.Tensor     # [T] bool, rows that see no key (output zeros)
    dense_rows: bool             # every sequence has R rows: the query rows are the grid as they are
    any_blind: bool              # some row sees no key
    cache_layout: str = ROWS     # kernels.cache_layout
    pages: torch.Tensor | None = None   # [S, ceil(C / block_size)] long, blocks to unpack (K_TRANSPOSED)
    # K_TRANSPOSED: attention straight over the packed blocks (no unpacking), see _run_packed
    page_mask: torch.Tensor | None = None   # [S, 1, 1, R, P * block_size + W] bool
    first_page: int | None = None           # one sequence whose blocks are consecutive: their first

    @classmethod
    def build(cls, query, kv_cache, block_table, context_lens, query_start_loc, window_key, window_value,
              window_start_loc, window_mask, out=None, cache_layout: str = ROWS) -> "TreeAttentionPlan":
        """Validate the first layer's arguments (all checks) and precompute the step's indices."""
        dims = check_tree_attention_args(query, kv_cache, block_table, context_lens, query_start_loc, window_key,
                                         window_value, window_start_loc, window_mask, out)
        check_layout(cache_layout, kv_cache)
        if query.device.type != "cpu":
            raise ValueError(f"TreeAttentionPlan is the CPU path; got tensors on {query.device} "
                             f"(use kernels.tree_paged_attention, which dispatches to Triton)")
        num_seqs, bs = dims.num_seqs, dims.block_size
        qsl, wsl = query_start_loc.long(), window_start_loc.long()
        q_lens, w_lens, ctx = qsl[1:] - qsl[:-1], wsl[1:] - wsl[:-1], context_lens.long()   # [S] each
        rows_max = int(q_lens.max()) if num_seqs else 0
        win_max = int(w_lens.max()) if num_seqs else 0
        ctx_max = int(ctx.max()) if num_seqs else 0

        pos = torch.arange(ctx_max)                                                        # [C]
        ctx_visible = pos[None, :] < ctx[:, None]                                          # [S, C]
        page = (pos // bs).clamp(max=max(block_table.shape[1] - 1, 0)).expand(num_seqs, -1)
        blocks = block_table.long().gather(1, page) if ctx_max else page.clone()           # [S, C]
        first = blocks[:, :1] if ctx_max else blocks
        ctx_block = torch.where(ctx_visible, blocks, first)          # padding reads a block the sequence owns
        ctx_offset = torch.where(ctx_visible, pos % bs, 0).expand(num_seqs, -1).contiguous()
        # The window part of the gather reads a valid slot too; run() overwrites it with the window keys.
        fill = ctx_block[:, :1] if ctx_max else torch.zeros(num_seqs, 1, dtype=torch.long)
        ctx_block = torch.cat([ctx_block, fill.expand(-1, win_max)], 1)                   # [S, C + W]
        ctx_offset = torch.cat([ctx_offset, torch.zeros(num_seqs, win_max, dtype=torch.long)], 1)

        j = torch.arange(win_max)                                                          # [W]
        win_in_seq = j[None, :] < w_lens[:, None]                                          # [S, W]
        window_rows = torch.where(win_in_seq, wsl[:-1, None] + j, 0)

        seq_of_row = torch.repeat_interleave(torch.arange(num_seqs), q_lens)               # [T]
        local_row = torch.arange(dims.num_rows) - qsl[seq_of_row]                          # [T]
        row_grid = seq_of_row * rows_max + local_row

        mask = torch.zeros(num_seqs * rows_max, ctx_max + win_max, dtype=torch.bool)
        row_sees = torch.cat([ctx_visible[seq_of_row],
                              unpack_window_mask(window_mask, win_max) & win_in_seq[seq_of_row]], 1)
        mask[row_grid] = row_sees
        pages = ctx_block[:, :ctx_max:bs].contiguous() if ctx_max else ctx_block[:, :0]   # [S, ceil(C / bs)]
        blind = ~mask.any(1)                                           # padding rows and rows that see nothing
        if mask.shape[1]:
            mask[blind, 0] = True                                      # keep softmax finite; zeroed after
        page_mask, first_page = None, None
        if cache_layout != ROWS:
            # keys = every slot of the sequence's context pages (those past its context masked), then
            # the window keys: the context part of `mask`, padded to whole pages
            num_pages = pages.shape[1]
            page_mask = torch.zeros(num_seqs * rows_max, num_pages * bs + win_max, dtype=torch.bool)
            page_mask[:, :ctx_max] = mask[:, :ctx_max]
            page_mask[:, num_pages * bs :] = mask[:, ctx_max:]
            page_mask = page_mask.view(num_seqs, 1, 1, rows_max, -1)
            if num_seqs == 1 and num_pages and bool((pages[0] == pages[0, 0] + torch.arange(num_pages)).all()):
                first_page = int(pages[0, 0])
        return cls(num_rows=dims.num_rows, num_window=window_key.shape[0], block_size=bs,
                   ctx_block=ctx_block, ctx_offset=ctx_offset, window_rows=window_rows, row_grid=row_grid,
                   mask=mask.view(num_seqs, 1, rows_max, ctx_max + win_max), blind_rows=blind[row_grid],
                   dense_rows=dims.num_rows == num_seqs * rows_max, any_blind=bool(blind[row_grid].any()),
                   cache_layout=cache_layout, pages=pages, page_mask=page_mask, first_page=first_page)

    def run(self, query: torch.Tensor, kv_cache: torch.Tensor, window_key: torch.Tensor,
            window_value: torch.Tensor, scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
        """One layer. query [T, H, D]; kv_cache [blocks, Hkv, block_size, 2D]; window_* [num_window, Hkv, D]."""
        num_rows, num_heads, head_dim = query.shape
        if num_rows != self.num_rows or window_key.shape[0] != self.num_window or kv_cache.shape[2] != self.block_size:
            raise ValueError(f"arguments do not match the plan: {num_rows} rows / {window_key.shape[0]} window "
                             f"keys / block size {kv_cache.shape[2]}, planned {self.num_rows} / "
                             f"{self.num_window} / {self.block_size}")
        if self.page_mask is not None:
            return self._run_packed(query, kv_cache, window_key, window_value, scale, out)
        num_seqs, _, rows_max, keys_len = self.mask.shape
        ctx_len = keys_len - self.window_rows.shape[1]
        kv = self._gather(kv_cache)                                                  # [S, C + W, Hkv, 2D]
        if self.window_rows.shape[1]:
            kv[:, ctx_len:, :, :head_dim] = window_key[self.window_rows]
            kv[:, ctx_len:, :, head_dim:] = window_value[self.window_rows]
        q = self._query_grid(query)                                                  # [S, H, R, D]
        kv = kv.transpose(1, 2)                                                      # [S, Hkv, C + W, 2D]
        o = F.scaled_dot_product_attention(q, kv[..., :head_dim], kv[..., head_dim:], attn_mask=self.mask,
                                           scale=scale, enable_gqa=num_heads != kv.shape[1])  # [S, H, R, D]
        return self._finish(o, out)

    def _finish(self, o: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        """SDPA's [S, H, R, D] grid -> the query rows [T, H, D] (rows that see nothing: zeros)."""
        num_seqs, num_heads, rows_max, head_dim = o.shape
        result = o.transpose(1, 2).reshape(num_seqs * rows_max, num_heads, head_dim)
        if not self.dense_rows:
            result = result[self.row_grid]
        if self.any_blind:
            result = result.clone()
            result[self.blind_rows] = 0
        if out is None:
            return result.contiguous()
        out.copy_(result)
        return out

    def _query_grid(self, query: torch.Tensor) -> torch.Tensor:
        """Query rows [T, H, D] -> the padded [S, H, R, D] grid SDPA takes."""
        num_seqs, rows_max = self.mask.shape[0], self.mask.shape[2]
        num_heads, head_dim = query.shape[1:]
        if self.dense_rows:          # no padding rows (e.g. a decode batch, R = 1): the rows are the grid
            return query.view(num_seqs, rows_max, num_heads, head_dim).transpose(1, 2)
        grid = query.new_zeros(num_seqs * rows_max, num_heads, head_dim)
        grid[self.row_grid] = query
        return grid.view(num_seqs, rows_max, num_heads, head_dim).transpose(1, 2)

    def _run_packed(self, query, kv_cache, window_key, window_value, scale: float, out) -> torch.Tensor:
        """A K_TRANSPOSED cache read block by block into one contiguous [S, Hkv, keys, D] buffer per
        half (a single transposing copy for K, a plain one for V; no copy of the index work when
        one sequence's blocks are consecutive), window keys after them, then one fused SDPA."""
        num_rows, num_heads, head_dim = query.shape
        num_seqs, _, _, rows_max, keys_len = self.page_mask.shape
        kt, v = split_k_transposed(kv_cache)                # [blocks, Hkv, D, bs], [blocks, Hkv, bs, D]
        kv_heads, bs, num_pages = kt.shape[1], self.block_size, self.pages.shape[1]
        if self.first_page is not None:
            kt_sel, v_sel = kt[self.first_page : self.first_page + num_pages], v[self.first_page : self.first_page + num_pages]
        else:
            flat = self.pages.reshape(-1)
            kt_sel, v_sel = kt.index_select(0, flat), v.index_select(0, flat)
        ctx_keys = num_pages * bs
        k = query.new_empty(num_seqs, kv_heads, keys_len, head_dim)
        val = query.new_empty(num_seqs, kv_heads, keys_len, head_dim)
        k[:, :, :ctx_keys].view(num_seqs, kv_heads, num_pages, bs, head_dim).copy_(
            kt_sel.view(num_seqs, num_pages, kv_heads, head_dim, bs).permute(0, 2, 1, 4, 3))
        val[:, :, :ctx_keys].view(num_seqs, kv_heads, num_pages, bs, head_dim).copy_(
            v_sel.view(num_seqs, num_pages, kv_heads, bs, head_dim).transpose(1, 2))
        if self.window_rows.shape[1]:
            k[:, :, ctx_keys:] = window_key[self.window_rows].transpose(1, 2)
            val[:, :, ctx_keys:] = window_value[self.window_rows].transpose(1, 2)
        o = F.scaled_dot_product_attention(self._query_grid(query), k, val, attn_mask=self.page_mask[:, 0],
                                           scale=scale, enable_gqa=num_heads != kv_heads)   # [S, H, R, D]
        return self._finish(o, out)

    def _gather(self, kv_cache: torch.Tensor) -> torch.Tensor:
        """[S, C + W, Hkv, 2D] from a ROWS cache: each sequence's context tokens (then filler for the
        window part)."""
        num_blocks, kv_heads, block_size, width = kv_cache.shape
        tokens = kv_cache.transpose(1, 2)                                 # [blocks, block_size, Hkv, 2D]
        if tokens.is_contiguous():   # token-major memory: one row copy per token
            slots = self.ctx_block * block_size + self.ctx_offset                  # [S, C + W]
            flat = tokens.view(num_blocks * block_size, kv_heads, width)
            return flat.index_select(0, slots.flatten()).view(*slots.shape, kv_heads, width)
        return kv_cache[self.ctx_block, :, self.ctx_offset]


def tree_paged_attention_cpu(query, kv_cache, block_table, context_lens, query_start_loc, window_key, window_value,
                             window_start_loc, window_mask, scale: float, out=None) -> torch.Tensor:
    """One-shot `tree_paged_attention` on the CPU (plan + run); engines keep the plan across layers."""
    plan = TreeAttentionPlan.build(query, kv_cache, block_table, context_lens, query_start_loc, window_key,
                                   window_value, window_start_loc, window_mask, out)
    return plan.run(query, kv_cache, window_key, window_value, scale, out)
