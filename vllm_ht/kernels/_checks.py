"""Argument validation shared by the Triton wrappers and the torch references.

Structural checks (rank, shape, dtype, device, strides) always run. Checks of index *values*
(monotone start locations, block ids in range, ...) run only when the index tensors are on the CPU:
on a GPU they would cost a device sync on every call.
"""
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vllm_ht.kernels.window_mask import BITS_PER_WORD

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class AttentionDims:
    num_rows: int
    num_heads: int
    head_dim: int
    num_kv_heads: int
    block_size: int
    num_seqs: int
    num_words: int        # window-mask words per row


def _fail(msg: str):
    raise ValueError(msg)


def _rank(name: str, t: torch.Tensor, dims: int):
    if t.dim() != dims:
        _fail(f"{name} must have {dims} dims, got shape {tuple(t.shape)}")


def _int32(name: str, t: torch.Tensor, dims: int):
    _rank(name, t, dims)
    if t.dtype != torch.int32:
        _fail(f"{name} must be int32, got {t.dtype}")
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        _fail(f"{name} must have stride 1 on its last dim, got strides {t.stride()}")


def _unit_last_stride(name: str, t: torch.Tensor):
    if t.stride(-1) != 1:
        _fail(f"{name} must have stride 1 on its last (head_dim) axis, got strides {t.stride()}")


def _non_overlapping(name: str, t: torch.Tensor):
    """Every element has its own address (no stride-0 or interleaved axes), so writes never collide."""
    extent = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n > 1):
        if stride < extent:
            _fail(f"{name} has overlapping memory (strides {t.stride()}, shape {tuple(t.shape)})")
        extent = stride * size


def _start_loc(name: str, loc: torch.Tensor, total: int, first_zero: bool):
    if first_zero and loc[0] != 0:
        _fail(f"{name}[0] must be 0, got {int(loc[0])}")
    if (loc[1:] < loc[:-1]).any() or loc[0] < 0:
        _fail(f"{name} must be non-negative and non-decreasing, got {loc.tolist()}")
    if loc[-1] > total:
        _fail(f"{name}[-1] = {int(loc[-1])} exceeds the {total} entries it indexes")


def check_tree_attention_args(query, kv_cache, block_table, context_lens, query_start_loc, window_key,
                              window_value, window_start_loc, window_mask, out) -> AttentionDims:
    """Validate `tree_paged_attention` arguments; return the problem's dimensions."""
    _rank("query", query, 3)
    _rank("kv_cache", kv_cache, 4)
    _rank("window_key", window_key, 3)
    _rank("window_value", window_value, 3)
    num_rows, num_heads, head_dim = query.shape
    num_blocks, num_kv_heads, block_size, kv_width = kv_cache.shape
    if query.dtype not in FLOAT_DTYPES:
        _fail(f"query dtype must be one of {FLOAT_DTYPES}, got {query.dtype}")
    for name, t in (("kv_cache", kv_cache), ("window_key", window_key), ("window_value", window_value)):
        if t.dtype != query.dtype:
            _fail(f"{name} dtype {t.dtype} differs from query dtype {query.dtype} (fp8 KV is not supported)")
    if kv_width != 2 * head_dim:
        _fail(f"kv_cache last dim must be 2*head_dim = {2 * head_dim} (K||V), got {kv_width}")
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        _fail(f"num_heads {num_heads} must be a multiple of num_kv_heads {num_kv_heads}")
    if window_key.shape != window_value.shape or tuple(window_key.shape[1:]) != (num_kv_heads, head_dim):
        _fail(f"window_key/window_value must both be [num_window, {num_kv_heads}, {head_dim}], "
              f"got {tuple(window_key.shape)} and {tuple(window_value.shape)}")
    _int32("block_table", block_table, 2)
    _int32("context_lens", context_lens, 1)
    _int32("query_start_loc", query_start_loc, 1)
    _int32("window_start_loc", window_start_loc, 1)
    _int32("window_mask", window_mask, 2)
    num_seqs = context_lens.shape[0]
    if block_table.shape[0] != num_seqs:
        _fail(f"block_table has {block_table.shape[0]} rows for {num_seqs} sequences")
    for name, loc in (("query_start_loc", query_start_loc), ("window_start_loc", window_start_loc)):
        if loc.shape[0] != num_seqs + 1:
            _fail(f"{name} must have num_seqs+1 = {num_seqs + 1} entries, got {loc.shape[0]}")
    if window_mask.shape[0] != num_rows:
        _fail(f"window_mask has {window_mask.shape[0]} rows, query has {num_rows}")
    for name, t in (("query", query), ("kv_cache", kv_cache), ("window_key", window_key),
                    ("window_value", window_value)):
        _unit_last_stride(name, t)
    if out is not None:
        if out.shape != query.shape or out.dtype != query.dtype:
            _fail(f"out must match query ({tuple(query.shape)}, {query.dtype}), "
                  f"got {tuple(out.shape)}, {out.dtype}")
        _unit_last_stride("out", out)
        _non_overlapping("out", out)
    tensors = (query, kv_cache, block_table, context_lens, query_start_loc, window_key, window_value,
               window_start_loc, window_mask) + ((out,) if out is not None else ())
    if len({t.device for t in tensors}) != 1:
        _fail(f"all tensors must be on one device, got {sorted({str(t.device) for t in tensors})}")
    if query.device.type == "cpu":
        _start_loc("query_start_loc", query_start_loc, num_rows, first_zero=True)
        _start_loc("window_start_loc", window_start_loc, window_key.shape[0], first_zero=False)
        max_window = int((window_start_loc[1:] - window_start_loc[:-1]).max()) if num_seqs else 0
        if max_window > window_mask.shape[1] * BITS_PER_WORD:
            _fail(f"a sequence has {max_window} window keys but window_mask has only "
                  f"{window_mask.shape[1]} words ({window_mask.shape[1] * BITS_PER_WORD} bits) per row")
        _check_block_refs(block_table, context_lens - 1, num_blocks, block_size, "context_lens")
    return AttentionDims(num_rows, num_heads, head_dim, num_kv_heads, block_size, num_seqs,
                         window_mask.shape[1])


def _check_block_refs(block_table, last_pos, num_blocks, block_size, what):
    """Every block a sequence uses up to position `last_pos` ([num_seqs], -1 = none) is valid."""
    if (last_pos < -1).any():
        _fail(f"{what} must be non-negative")
    needed = torch.div(last_pos, block_size, rounding_mode="floor") + 1          # [num_seqs]
    if (needed > block_table.shape[1]).any():
        _fail(f"{what} needs {int(needed.max())} blocks, block_table has {block_table.shape[1]} per sequence")
    used = torch.arange(block_table.shape[1]) < needed[:, None]                   # [num_seqs, max_blocks]
    ids = block_table[used]
    if ids.numel() and (ids.min() < 0 or ids.max() >= num_blocks):
        _fail(f"block_table holds block ids outside [0, {num_blocks}) for used blocks")


def check_kv_compact_args(kv_caches: Sequence[torch.Tensor], block_table, src_positions, dst_positions,
                          move_start_loc) -> None:
    """Validate `kv_compact` arguments (see vllm_ht/kernels/kv_compact.py for their meaning)."""
    if len(kv_caches) == 0:
        _fail("kv_caches is empty")
    first = kv_caches[0]
    _rank("kv_caches[0]", first, 4)
    if first.dtype not in FLOAT_DTYPES:
        _fail(f"kv_caches dtype must be one of {FLOAT_DTYPES}, got {first.dtype}")
    for i, kv in enumerate(kv_caches):
        if kv.shape != first.shape or kv.dtype != first.dtype or kv.stride() != first.stride() \
                or kv.device != first.device:
            _fail(f"kv_caches[{i}] differs from kv_caches[0] in shape, dtype, strides or device; "
                  f"compact groups of identical layers separately")
    _unit_last_stride("kv_caches[0]", first)
    _non_overlapping("kv_caches[0]", first)
    _int32("block_table", block_table, 2)
    _int32("src_positions", src_positions, 1)
    _int32("dst_positions", dst_positions, 1)
    _int32("move_start_loc", move_start_loc, 1)
    if src_positions.shape != dst_positions.shape:
        _fail(f"src_positions {tuple(src_positions.shape)} and dst_positions {tuple(dst_positions.shape)} differ")
    if move_start_loc.shape[0] != block_table.shape[0] + 1:
        _fail(f"move_start_loc must have num_seqs+1 = {block_table.shape[0] + 1} entries, "
              f"got {move_start_loc.shape[0]}")
    for name, t in (("block_table", block_table), ("src_positions", src_positions),
                    ("dst_positions", dst_positions), ("move_start_loc", move_start_loc)):
        if t.device != first.device:
            _fail(f"{name} is on {t.device}, kv_caches on {first.device}")
    if first.device.type == "cpu":
        _check_moves(first, block_table, src_positions, dst_positions, move_start_loc)


def _check_moves(kv, block_table, src, dst, move_start_loc):
    num_moves = src.shape[0]
    _start_loc("move_start_loc", move_start_loc, num_moves, first_zero=True)
    if move_start_loc[-1] != num_moves:
        _fail(f"move_start_loc[-1] must equal the number of moves {num_moves}")
    if (dst < 0).any() or (src < dst).any():
        _fail("positions must satisfy 0 <= dst <= src for every move")
    counts = (move_start_loc[1:] - move_start_loc[:-1]).long()                    # [num_seqs]
    seq = torch.repeat_interleave(torch.arange(counts.shape[0]), counts)          # [num_moves]
    same_seq = seq[1:] == seq[:-1]
    if (same_seq & ((src[1:] <= src[:-1]) | (dst[1:] <= dst[:-1]))).any():
        _fail("within a sequence, src_positions and dst_positions must be strictly ascending")
    # dst <= src and both ascending, so the last src of a sequence bounds every block it touches.
    last = torch.full((counts.shape[0],), -1, dtype=torch.int64).scatter_reduce(
        0, seq, src.long(), reduce="amax")                                         # [num_seqs]
    _check_block_refs(block_table, last, kv.shape[0], kv.shape[2], "src_positions")
