"""Kernels for Hidden Transfer verification: tree-masked paged attention and KV compaction.

Entry points the engine calls (they dispatch on the tensors' device):
- `tree_paged_attention(...)`: Triton (`vllm_ht.kernels.tree_attention`) for CUDA tensors, the planned
  CPU path (`vllm_ht.kernels.tree_attention_cpu`) otherwise. Engines that call it once per layer build a
  `TreeAttentionPlan` once per step instead. `vllm_ht.kernels.reference` is the oracle both are tested on.
- `compact_kv(...)`: Triton (`vllm_ht.kernels.kv_compact.kv_compact`) for CUDA tensors, the torch reference
  (`vllm_ht.kernels.reference.kv_compact_ref`) otherwise. (Not named `kv_compact`: that name is the
  submodule.)
- `cache_layout`: what a cache's memory means (ROWS, or K_TRANSPOSED: vLLM's CPU packing, which
  the CPU paths also read).
- `pack_window_mask` / `unpack_window_mask`: bool mask <-> the int32 row bitmask both kernels read.

Triton is imported lazily, only for CUDA tensors or when a Triton submodule is imported, so the
CPU path needs no Triton at all. On a machine without CUDA the Triton submodules still import and
run, in Triton's interpreter: importing one sets TRITON_INTERPRET=1 unless triton is already
loaded (see `vllm_ht.kernels._triton`); `import vllm_ht.kernels` alone leaves the environment alone.
"""
from collections.abc import Sequence

import torch

from vllm_ht.kernels.cache_layout import K_TRANSPOSED, ROWS
from vllm_ht.kernels.reference import kv_compact_ref, tree_paged_attention_ref
from vllm_ht.kernels.tree_attention_cpu import TreeAttentionPlan, tree_paged_attention_cpu
from vllm_ht.kernels.window_mask import num_mask_words, pack_window_mask, unpack_window_mask

__all__ = [
    "K_TRANSPOSED",
    "ROWS",
    "TreeAttentionPlan",
    "compact_kv",
    "kv_compact_ref",
    "num_mask_words",
    "pack_window_mask",
    "tree_paged_attention",
    "tree_paged_attention_cpu",
    "tree_paged_attention_ref",
    "unpack_window_mask",
]


def tree_paged_attention(query, kv_cache, block_table, context_lens, query_start_loc, window_key,
                         window_value, window_start_loc, window_mask, scale: float,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """Tree-masked paged attention; arguments as in `vllm_ht.kernels.tree_attention.tree_paged_attention`."""
    args = (query, kv_cache, block_table, context_lens, query_start_loc, window_key, window_value,
            window_start_loc, window_mask, scale, out)
    if query.is_cuda:
        from vllm_ht.kernels.tree_attention import tree_paged_attention as triton_impl
        return triton_impl(*args)
    return tree_paged_attention_cpu(*args)


def compact_kv(kv_caches: Sequence[torch.Tensor], block_table, src_positions, dst_positions,
               move_start_loc, cache_layout: str = ROWS) -> None:
    """KV compaction for all layers; arguments as in `vllm_ht.kernels.kv_compact.kv_compact`."""
    args = (kv_caches, block_table, src_positions, dst_positions, move_start_loc)
    if kv_caches and kv_caches[0].is_cuda:
        if cache_layout != ROWS:
            raise ValueError(f"the Triton compaction reads the {ROWS} layout only, got {cache_layout!r}")
        from vllm_ht.kernels.kv_compact import kv_compact as triton_impl
        return triton_impl(*args)
    return kv_compact_ref(*args, cache_layout=cache_layout)
