"""What a paged KV cache's memory means: the two layouts the CPU path reads.

Every cache has the logical shape [num_blocks, num_kv_heads, block_size, 2 * head_dim]; the layout
says where token (block, offset)'s K and V sit in it:
  ROWS           K || V along the last axis: kv_cache[block, head, offset] is that token's row
                 (any strides; the HT backend's own layout, and what the Triton kernels read).
  K_TRANSPOSED   vLLM CPU_ATTN's "vec"/"vec16" packing over contiguous memory: per (block, head)
                 the first block_size * head_dim values are K transposed [head_dim, block_size],
                 the next block_size * head_dim are V [block_size, head_dim]. vLLM's native CPU
                 attention kernel reads this; the HT CPU backend keeps it when the ISA writes it,
                 so plain (causal) steps can run that kernel.

Worked example, block_size 2, head_dim 3, one head, tokens a, b in block 0:
    ROWS          [a.k0 a.k1 a.k2 a.v0 a.v1 a.v2 | b.k0 b.k1 b.k2 b.v0 b.v1 b.v2]
    K_TRANSPOSED  [a.k0 b.k0 a.k1 b.k1 a.k2 b.k2 | a.v0 a.v1 a.v2 b.v0 b.v1 b.v2]
A slot is block * block_size + offset, as in vLLM's slot mapping.
"""
from __future__ import annotations

import torch

ROWS = "rows"
K_TRANSPOSED = "k_transposed"
LAYOUTS = (ROWS, K_TRANSPOSED)


def check_layout(cache_layout: str, kv_cache: torch.Tensor) -> None:
    if cache_layout not in LAYOUTS:
        raise ValueError(f"unknown cache layout {cache_layout!r}; choose one of {LAYOUTS}")
    if cache_layout == K_TRANSPOSED and not kv_cache.is_contiguous():
        raise ValueError(f"a {K_TRANSPOSED} cache must be contiguous (it is packed memory), got strides "
                         f"{kv_cache.stride()} for shape {tuple(kv_cache.shape)}")


def split_k_transposed(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Views (K^T [blocks, Hkv, D, block_size], V [blocks, Hkv, block_size, D]) of a K_TRANSPOSED cache."""
    blocks, heads, block_size, width = kv_cache.shape
    d = width // 2
    halves = kv_cache.view(blocks, heads, 2, block_size * d)
    return halves[:, :, 0].view(blocks, heads, d, block_size), halves[:, :, 1].view(blocks, heads, block_size, d)


def read_slots(kv_cache: torch.Tensor, slots: torch.Tensor, cache_layout: str) -> torch.Tensor:
    """[N, Hkv, 2D]: the K || V rows of the given slots (long, all >= 0)."""
    block_size = kv_cache.shape[2]
    block, offset = slots // block_size, slots % block_size
    if cache_layout == ROWS:
        return kv_cache[block, :, offset]
    kt, v = split_k_transposed(kv_cache)
    return torch.cat([kt[block, :, :, offset], v[block, :, offset]], dim=-1)


def write_slots(kv_cache: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor, cache_layout: str) -> None:
    """Write K || V rows [N, Hkv, 2D] to the given slots (long, all >= 0, distinct)."""
    block_size, d = kv_cache.shape[2], kv_cache.shape[3] // 2
    block, offset = slots // block_size, slots % block_size
    rows = rows.to(kv_cache.dtype)
    if cache_layout == ROWS:
        kv_cache[block, :, offset] = rows
        return
    kt, v = split_k_transposed(kv_cache)
    kt[block, :, :, offset] = rows[..., :d]
    v[block, :, offset] = rows[..., d:]


def gather_pages(kv_cache: torch.Tensor, pages: torch.Tensor) -> torch.Tensor:
    """[S, P * block_size, Hkv, 2D] token rows of whole blocks `pages` [S, P] of a K_TRANSPOSED cache.

    One index_select per half (whole blocks, contiguous copies), then one transposing copy."""
    kt, v = split_k_transposed(kv_cache)
    num_seqs, num_pages = pages.shape
    _, heads, d, block_size = kt.shape
    flat = pages.reshape(-1)
    k = kt.index_select(0, flat).view(num_seqs, num_pages, heads, d, block_size).permute(0, 1, 4, 2, 3)
    val = v.index_select(0, flat).view(num_seqs, num_pages, heads, block_size, d).permute(0, 1, 3, 2, 4)
    return torch.cat([k, val], dim=-1).reshape(num_seqs, num_pages * block_size, heads, 2 * d)


def to_layout(rows_cache: torch.Tensor, cache_layout: str) -> torch.Tensor:
    """A copy of a ROWS cache in `cache_layout` (same logical content; for tests and tools)."""
    if cache_layout == ROWS:
        return rows_cache.clone()
    check_layout(cache_layout, rows_cache.contiguous())
    out = torch.empty(rows_cache.shape, dtype=rows_cache.dtype, device=rows_cache.device)
    kt, v = split_k_transposed(out)
    d = rows_cache.shape[3] // 2
    kt.copy_(rows_cache[..., :d].transpose(2, 3))
    v.copy_(rows_cache[..., d:])
    return out
