"""Tree-masked paged attention (Triton): tree rows and pseudo rows of many sequences at once.

Hidden Transfer (arXiv 2404.12022) verifies a token tree and runs pseudo rows in one pass. Each
query row attends to (a) its sequence's cached context in vLLM 0.32's paged layout, all of it, and
(b) this step's window keys under a per-row bitmask (tree ancestors and itself; a pseudo group).
Online softmax as in Triton's fused-attention tutorial (06-fused-attention.py) and FlashAttention-2;
long contexts split across programs and merged by log-sum-exp as in flash-decoding.
Glossary and the bitmask layout: `vllm_ht.kernels.window_mask`. Torch twin: `vllm_ht.kernels.reference`.

Program layout: axis 0 = a q-block: BLOCK_Q = BLOCK_M // GROUP rows of one sequence times the
GROUP query heads that share one KV head, so each K/V tile is loaded once for all of them (as in
vLLM's unified_attention; the grid needs no device sync); axis 1 = KV head; axis 2 = context split.
"""
import functools
import logging

import torch

from vllm_ht.kernels._checks import check_tree_attention_args
from vllm_ht.kernels._triton import interpreting, tl, triton

logger = logging.getLogger(__name__)


@triton.jit
def _find_seq(QSL, num_seqs, pid_q, BLOCK_Q: tl.constexpr):
    """Sequence b whose q-blocks [qsl[b] // BLOCK_Q + b, qsl[b+1] // BLOCK_Q + b + 1) hold pid_q."""
    left: tl.int32 = 0
    right = num_seqs
    while left < right:
        mid = (left + right) // 2
        if tl.load(QSL + mid) // BLOCK_Q + mid <= pid_q:
            left = mid + 1
        else:
            right = mid
    return left - 1


@triton.jit
def _attend_tile(acc, l_i, m_i, q, k, v, visible, qk_scale, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """One online-softmax step over a key tile: k [HEAD_DIM, BLOCK_N], v [BLOCK_N, HEAD_DIM]."""
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    qk = tl.dot(q, k, input_precision=PRECISION) * qk_scale      # [BLOCK_M, BLOCK_N], log2 domain
    qk = tl.where(visible, qk, float("-inf"))
    m_ij = tl.maximum(m_i, tl.max(qk, 1))
    p = tl.math.exp2(qk - m_ij[:, None])
    alpha = tl.math.exp2(m_i - m_ij)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
    return acc, l_i, m_ij


@triton.jit
def _tree_attn_fwd(
    Q, KV, BT, CTX, QSL, WK, WV, WSL, WMASK,   # inputs, shapes as in `tree_paged_attention`
    O,       # NUM_SPLITS == 1: out [num_rows, num_heads, HEAD_DIM]
             # else fp32 scratch [NUM_SPLITS, num_rows, num_heads, HEAD_DIM]
    LSE,     # fp32 [NUM_SPLITS, num_rows, num_heads] log2-sum-exp per split (unused when NUM_SPLITS == 1)
    qk_scale, num_seqs, num_words,
    stride_qr, stride_qh,
    stride_kvb, stride_kvh, stride_kvt,
    stride_btb,
    stride_wkn, stride_wkh, stride_wvn, stride_wvh,
    stride_wmr,
    stride_os, stride_or, stride_oh,
    stride_ls, stride_lr,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_q = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq = _find_seq(QSL, num_seqs, pid_q, BLOCK_Q)
    row_start = tl.load(QSL + seq)
    num_rows = tl.load(QSL + seq + 1) - row_start
    q_block = pid_q - (row_start // BLOCK_Q + seq)
    if q_block * BLOCK_Q >= num_rows:
        return

    # -- this program's (row, head) pairs --
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_local = q_block * BLOCK_Q + offs_m // GROUP                             # [BLOCK_M]
    m_valid = (offs_m // GROUP < BLOCK_Q) & (row_local < num_rows)
    row = row_start + row_local
    head = kv_head * GROUP + offs_m % GROUP
    q = tl.load(Q + row[:, None] * stride_qr + head[:, None] * stride_qh + offs_d[None, :],
                mask=m_valid[:, None], other=0.0)                               # [BLOCK_M, HEAD_DIM]
    if UPCAST:
        q = q.to(tl.float32)
    # NOTE: m_i starts finite, not -inf, so a fully masked tile gives exp2(-inf - m) = 0, never
    # exp2(-inf + inf) = NaN; a row that sees nothing keeps l_i = 0 and is written as zeros.
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # -- (a) paged context: every row sees positions [0, ctx); this split takes one chunk --
    ctx = tl.load(CTX + seq)
    chunk = tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, ctx)
    for start_n in range(lo, hi, BLOCK_N):
        pos = start_n + offs_n                                                  # [BLOCK_N]
        n_valid = pos < hi
        block = tl.load(BT + seq * stride_btb + pos // BLOCK_SIZE, mask=n_valid, other=0)
        # NOTE: int64 before the multiply: block id x block stride passes 2**31 on large caches.
        slot = block.to(tl.int64) * stride_kvb + kv_head * stride_kvh + (pos % BLOCK_SIZE) * stride_kvt
        k = tl.load(KV + slot[None, :] + offs_d[:, None], mask=n_valid[None, :], other=0.0)
        v = tl.load(KV + slot[:, None] + HEAD_DIM + offs_d[None, :], mask=n_valid[:, None], other=0.0)
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, k, v, n_valid[None, :], qk_scale, UPCAST, PRECISION)

    # -- (b) window keys under the row bitmask, in the last split --
    if split == NUM_SPLITS - 1:
        win_start = tl.load(WSL + seq)
        num_win = tl.load(WSL + seq + 1) - win_start
        for start_n in range(0, num_win, BLOCK_N):
            j = start_n + offs_n                                                # [BLOCK_N] local window index
            n_valid = (j < num_win) & (j // 32 < num_words)
            word = tl.load(WMASK + row[:, None] * stride_wmr + (j // 32)[None, :],
                           mask=m_valid[:, None] & n_valid[None, :], other=0)  # [BLOCK_M, BLOCK_N] int32
            visible = ((word >> (j % 32)[None, :]) & 1) != 0
            key = (win_start + j).to(tl.int64)
            k = tl.load(WK + key[None, :] * stride_wkn + kv_head * stride_wkh + offs_d[:, None],
                        mask=n_valid[None, :], other=0.0)
            v = tl.load(WV + key[:, None] * stride_wvn + kv_head * stride_wvh + offs_d[None, :],
                        mask=n_valid[:, None], other=0.0)
            acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, k, v, visible, qk_scale, UPCAST, PRECISION)

    # -- epilogue --
    has_key = l_i > 0.0
    acc = acc / tl.where(has_key, l_i, 1.0)[:, None]
    o_ptrs = O + split * stride_os + row[:, None] * stride_or + head[:, None] * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=m_valid[:, None])
    if NUM_SPLITS > 1:
        lse = tl.where(has_key, m_i + tl.math.log2(tl.where(has_key, l_i, 1.0)), float("-inf"))
        tl.store(LSE + split * stride_ls + row * stride_lr + head, lse, mask=m_valid)


@triton.jit
def _combine_splits(
    PART,    # fp32 [NUM_SPLITS, num_rows, num_heads, HEAD_DIM] per-split normalised outputs
    LSE,     # fp32 [NUM_SPLITS, num_rows, num_heads]
    O,       # [num_rows, num_heads, HEAD_DIM]
    QSL, num_seqs,
    stride_ps, stride_pr, stride_ph, stride_ls, stride_lr, stride_or, stride_oh,
    NUM_SPLITS: tl.constexpr, SPLITS_P: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    row = tl.program_id(0)
    head = tl.program_id(1)
    if row >= tl.load(QSL + num_seqs):   # padding rows past the last sequence are never written
        return
    offs_s = tl.arange(0, SPLITS_P)
    offs_d = tl.arange(0, HEAD_DIM)
    s_valid = offs_s < NUM_SPLITS
    lse = tl.load(LSE + offs_s * stride_ls + row * stride_lr + head, mask=s_valid, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    weight = tl.math.exp2(lse - tl.where(lse_max == float("-inf"), 0.0, lse_max))   # [SPLITS_P]
    part = tl.load(PART + offs_s[:, None] * stride_ps + row * stride_pr + head * stride_ph + offs_d[None, :],
                   mask=s_valid[:, None], other=0.0)                                 # [SPLITS_P, HEAD_DIM]
    total = tl.sum(weight, 0)
    o = tl.sum(part * weight[:, None], 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(O + row * stride_or + head * stride_oh + offs_d, o.to(O.dtype.element_ty))


def _launch_config(group: int, num_rows: int, num_seqs: int, fp32: bool) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N). The interpreter pays per program x iteration, so it gets big tiles."""
    if interpreting():
        return max(64, triton.next_power_of_2(group)), 128
    rows_per_seq = max(1, num_rows // max(1, num_seqs))
    block_m = min(64, max(16, triton.next_power_of_2(rows_per_seq * group)))
    # NOTE: with num_stages=2, K and V tiles of 64 x 128 fp32 would need 128 KiB of shared memory.
    return max(block_m, triton.next_power_of_2(group)), 32 if fp32 else 64


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _default_splits(num_programs: int, device: torch.device) -> int:
    """Enough context splits to put ~2 programs on every SM (flash-decoding); 1 in the interpreter."""
    if interpreting() or device.type != "cuda":
        return 1
    sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(16, (2 * sms) // max(1, num_programs)))


def tree_paged_attention(
    query: torch.Tensor,             # [num_rows, num_heads, head_dim]  rows of all sequences, grouped by sequence
    kv_cache: torch.Tensor,          # [num_blocks, num_kv_heads, block_size, 2*head_dim]  K||V, any strides
    block_table: torch.Tensor,       # [num_seqs, max_blocks_per_seq] int32
    context_lens: torch.Tensor,      # [num_seqs] int32  cached tokens every row of the sequence sees
    query_start_loc: torch.Tensor,   # [num_seqs+1] int32  rows of b: query[qsl[b]:qsl[b+1]], qsl[0] == 0
    window_key: torch.Tensor,        # [num_window, num_kv_heads, head_dim]  this step's extra keys
    window_value: torch.Tensor,      # [num_window, num_kv_heads, head_dim]
    window_start_loc: torch.Tensor,  # [num_seqs+1] int32  window keys of b: window_key[wsl[b]:wsl[b+1]]
    window_mask: torch.Tensor,       # [num_rows, ceil(max_window_per_seq/32)] int32  bit j: row sees wsl[b]+j
    scale: float,
    out: torch.Tensor | None = None,  # [num_rows, num_heads, head_dim]  written in place if given
    *,
    num_splits: int | None = None,    # context splits (flash-decoding); None = fill the GPU
) -> torch.Tensor:
    """softmax(scale * q k^T) v per row over its visible keys; fp32 accumulation; returns `out`.

    Row r of sequence b sees context positions 0..context_lens[b]-1 (through `block_table`,
    slot of position p = block_table[b, p // block_size], offset p % block_size) and the window
    keys wsl[b] + j whose bit j is set in window_mask[r]. Query head h uses KV head
    h // (num_heads // num_kv_heads). A row that sees no key is written as zeros. Rows from
    qsl[num_seqs] to num_rows are padding and left untouched (zeros when `out` is None).

    Example, one sequence with 2 cached tokens, a root and one child (W = 2, rows = 2):
        context_lens = [2], query_start_loc = [0, 2], window_start_loc = [0, 2],
        window_mask = pack_window_mask([[T, F], [T, T]]) = [[1], [3]]
        row 0 (root) sees ctx 0, 1 and window key 0; row 1 sees ctx 0, 1 and window keys 0, 1.
    """
    dims = check_tree_attention_args(query, kv_cache, block_table, context_lens, query_start_loc,
                                     window_key, window_value, window_start_loc, window_mask, out)
    head_dim, group = dims.head_dim, dims.num_heads // dims.num_kv_heads
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two >= 16, got {head_dim}")
    if out is None:
        out = torch.zeros_like(query)
    if dims.num_rows == 0 or dims.num_seqs == 0:
        return out
    block_m, block_n = _launch_config(group, dims.num_rows, dims.num_seqs, query.dtype == torch.float32)
    block_q = block_m // group
    q_programs = dims.num_rows // block_q + dims.num_seqs   # upper bound, needs no device sync
    splits = num_splits or _default_splits(q_programs * dims.num_kv_heads, query.device)
    # NOTE: UPCAST converts tiles to fp32 after loading and runs the dots in IEEE fp32 (no TF32):
    # always for fp32 inputs, and for bf16 in the interpreter, whose bf16 tl.dot is broken.
    upcast = query.dtype == torch.float32 or (query.dtype == torch.bfloat16 and interpreting())
    if splits == 1:
        target, lse = out, out   # LSE is never touched with one split
        so, sr, sh, sls, slr = 0, out.stride(0), out.stride(1), 0, 0
    else:
        target = torch.empty((splits,) + tuple(query.shape), dtype=torch.float32, device=query.device)
        lse = torch.empty((splits, dims.num_rows, dims.num_heads), dtype=torch.float32, device=query.device)
        so, sr, sh = target.stride(0), target.stride(1), target.stride(2)
        sls, slr = lse.stride(0), lse.stride(1)
    _tree_attn_fwd[(q_programs, dims.num_kv_heads, splits)](
        query, kv_cache, block_table, context_lens, query_start_loc, window_key, window_value,
        window_start_loc, window_mask, target, lse,
        scale * 1.4426950408889634, dims.num_seqs, dims.num_words,
        query.stride(0), query.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        block_table.stride(0),
        window_key.stride(0), window_key.stride(1), window_value.stride(0), window_value.stride(1),
        window_mask.stride(0),
        so, sr, sh, sls, slr,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=dims.block_size,
        BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=block_n,
        NUM_SPLITS=splits, UPCAST=upcast, PRECISION="ieee" if upcast else "tf32",
        num_warps=4, num_stages=2,
    )
    if splits > 1:
        _combine_splits[(dims.num_rows, dims.num_heads)](
            target, lse, out, query_start_loc, dims.num_seqs,
            target.stride(0), target.stride(1), target.stride(2), lse.stride(0), lse.stride(1),
            out.stride(0), out.stride(1),
            NUM_SPLITS=splits, SPLITS_P=triton.next_power_of_2(splits), HEAD_DIM=head_dim,
        )
    return out
