"""Pure-torch tree-masked paged attention and KV compaction: the CPU path and the test oracle.

Same signatures and semantics as `vllm_ht.kernels.tree_attention.tree_paged_attention` and
`vllm_ht.kernels.kv_compact.kv_compact`; see those docstrings (and `vllm_ht.kernels.window_mask` for the
glossary).
Vectorised per sequence: one Python iteration per sequence, none per row or per layer-head.
Math runs in fp32 whatever the input dtype; the result is cast back to the query dtype.
"""
from collections.abc import Sequence

import torch

from vllm_ht.kernels._checks import check_kv_compact_args, check_tree_attention_args
from vllm_ht.kernels.cache_layout import ROWS, check_layout, read_slots, write_slots
from vllm_ht.kernels.window_mask import unpack_window_mask


def tree_paged_attention_ref(
    query: torch.Tensor,             # [num_rows, num_heads, head_dim]
    kv_cache: torch.Tensor,          # [num_blocks, num_kv_heads, block_size, 2*head_dim]  K||V
    block_table: torch.Tensor,       # [num_seqs, max_blocks_per_seq] int32
    context_lens: torch.Tensor,      # [num_seqs] int32
    query_start_loc: torch.Tensor,   # [num_seqs+1] int32
    window_key: torch.Tensor,        # [num_window, num_kv_heads, head_dim]
    window_value: torch.Tensor,      # [num_window, num_kv_heads, head_dim]
    window_start_loc: torch.Tensor,  # [num_seqs+1] int32
    window_mask: torch.Tensor,       # [num_rows, num_words] int32 bitmask
    scale: float,
    out: torch.Tensor | None = None,  # [num_rows, num_heads, head_dim]
) -> torch.Tensor:
    """Torch version of `tree_paged_attention` (same arguments, same result)."""
    dims = check_tree_attention_args(query, kv_cache, block_table, context_lens, query_start_loc,
                                     window_key, window_value, window_start_loc, window_mask, out)
    if out is None:
        out = torch.zeros_like(query)
    kv_heads, head_dim, block_size = dims.num_kv_heads, dims.head_dim, dims.block_size
    group = dims.num_heads // kv_heads
    qsl, wsl, ctxs = query_start_loc.tolist(), window_start_loc.tolist(), context_lens.tolist()
    for b in range(dims.num_seqs):
        r0, r1, w0, w1, ctx = qsl[b], qsl[b + 1], wsl[b], wsl[b + 1], ctxs[b]
        n = r1 - r0
        if n == 0:
            continue
        num_pages = (ctx + block_size - 1) // block_size
        pages = kv_cache[block_table[b, :num_pages].long()]                  # [pages, Hkv, bs, 2D]
        context = pages.transpose(0, 1).reshape(kv_heads, num_pages * block_size, 2 * head_dim)
        context = context[:, :ctx]                                           # [Hkv, ctx, 2D]
        keys = torch.cat([context[..., :head_dim], window_key[w0:w1].transpose(0, 1)], 1)    # [Hkv, L, D]
        values = torch.cat([context[..., head_dim:], window_value[w0:w1].transpose(0, 1)], 1)
        window_visible = unpack_window_mask(window_mask[r0:r1], w1 - w0)                    # [n, W]
        # GROUP query heads share a KV head: fold them into the row axis so each product is one bmm.
        q = (query[r0:r1].float() * scale).view(n, kv_heads, group, head_dim).permute(1, 2, 0, 3)
        scores = torch.bmm(q.reshape(kv_heads, group * n, head_dim), keys.float().transpose(1, 2))
        scores = scores.view(kv_heads, group, n, ctx + w1 - w0)                               # [Hkv, G, n, L]
        scores[..., ctx:].masked_fill_(~window_visible, float("-inf"))   # the context is all visible
        probs = torch.softmax(scores, dim=-1)
        if ctx == 0:   # a row that sees no key at all gets zeros instead of softmax's NaN
            probs = torch.where(window_visible.any(-1)[:, None], probs, 0.0)
        o = torch.bmm(probs.view(kv_heads, group * n, -1), values.float())                    # [Hkv, G*n, D]
        out[r0:r1] = o.view(kv_heads, group, n, head_dim).permute(2, 0, 1, 3).reshape(
            n, dims.num_heads, head_dim).to(out.dtype)
    return out


def kv_compact_ref(
    kv_caches: Sequence[torch.Tensor],  # L x [num_blocks, num_kv_heads, block_size, 2*head_dim]
    block_table: torch.Tensor,          # [num_seqs, max_blocks_per_seq] int32
    src_positions: torch.Tensor,        # [num_moves] int32
    dst_positions: torch.Tensor,        # [num_moves] int32
    move_start_loc: torch.Tensor,       # [num_seqs+1] int32
    cache_layout: str = ROWS,           # vllm_ht.kernels.cache_layout: what the caches' memory means
) -> None:
    """Torch version of `kv_compact`: gathers every source slot, then scatters (one op per layer).

    Gather-then-scatter gives the same result as the kernel's in-order copy because src >= dst
    and both ascend within a sequence (see vllm_ht/kernels/kv_compact.py). Unlike the kernel it also
    reads and writes the K_TRANSPOSED layout (vLLM's CPU cache).
    """
    check_kv_compact_args(kv_caches, block_table, src_positions, dst_positions, move_start_loc)
    for kv in kv_caches:
        check_layout(cache_layout, kv)
    block_size = kv_caches[0].shape[2]
    counts = (move_start_loc[1:] - move_start_loc[:-1]).long()                      # [num_seqs]
    seq = torch.repeat_interleave(torch.arange(counts.shape[0], device=counts.device), counts)  # [num_moves]
    table = block_table.long()
    src, dst = src_positions.long(), dst_positions.long()
    src_slot = table[seq, src // block_size] * block_size + src % block_size        # [num_moves] each
    dst_slot = table[seq, dst // block_size] * block_size + dst % block_size
    for kv in kv_caches:
        write_slots(kv, read_slots(kv, src_slot, cache_layout), dst_slot, cache_layout)   # [num_moves, Hkv, 2D]
