"""KV compaction (Triton): move the accepted path's K/V to contiguous positions, all layers at once.

After tree verification the accepted nodes of a sequence sit at scattered positions p + i_1,
p + i_2, ... (i_1 < i_2 < ...); the next step expects them at p + 1, p + 2, .... For every layer
and KV head, token row `kv[block, head, offset, :]` (K and V together, 2*head_dim values) moves
from the source position's slot to the destination position's slot; a position's slot is
(block_table[b, pos // block_size], pos % block_size). Torch twin: `vllm_ht.kernels.reference.kv_compact_ref`.

Worked example, one sequence, root at p = 5, accepted BFS nodes 2 and 3 (positions 7 and 8):
    src_positions = [5, 7, 8], dst_positions = [5, 6, 7], move_start_loc = [0, 3]
    -> slot(6) <- old slot(7), slot(7) <- old slot(8); slot(5) is left as it is (src == dst).
Two sequences with moves [a, b] and [c] -> move_start_loc = [0, 2, 3].

All layers in one launch: when the per-layer caches are equally spaced views of one allocation
(vLLM allocates them that way), the kernel walks a strided "stacked" view (layer stride = the
spacing); otherwise it reads each layer's base address from a small int64 pointer table.
"""
import itertools
import logging
from collections.abc import Sequence

import torch

from vllm_ht.kernels._checks import check_kv_compact_args
from vllm_ht.kernels._triton import tl, triton

logger = logging.getLogger(__name__)


@triton.jit
def _kv_compact_kernel(
    KV,        # layer 0: [num_blocks, num_kv_heads, BLOCK_SIZE, ROW]
    PTRS,      # [num_layers] int64 base addresses (read only when USE_PTRS)
    BT, SRC, DST, MSL,   # block_table [num_seqs, max_blocks], positions [num_moves], move_start_loc
    stride_l, stride_b, stride_h, stride_t, stride_btb,
    BLOCK_SIZE: tl.constexpr, ROW: tl.constexpr, ROW_P: tl.constexpr, USE_PTRS: tl.constexpr,
):
    seq = tl.program_id(0)
    layer = tl.program_id(1)
    head = tl.program_id(2)
    if USE_PTRS:
        base = tl.load(PTRS + layer).to(tl.pointer_type(KV.dtype.element_ty))
    else:
        base = KV + layer.to(tl.int64) * stride_l
    base += head * stride_h
    offs_c = tl.arange(0, ROW_P)
    c_valid = offs_c < ROW
    # NOTE: the moves of one sequence run in order inside one program, and that order is what makes
    # an in-place copy safe. With src >= dst and both strictly ascending, move k reads src_k, which
    # no earlier move wrote (earlier dst_j <= src_j < src_k), and writes dst_k, which no later move
    # reads (dst_k <= src_k < src_m). E.g. src [5, 7, 8] -> dst [5, 6, 7]: move 2 reads 7 before
    # move 3 overwrites it. Moves in parallel would race (move 3 could clobber 7 first).
    for i in range(tl.load(MSL + seq), tl.load(MSL + seq + 1)):
        src = tl.load(SRC + i)
        dst = tl.load(DST + i)
        src_block = tl.load(BT + seq * stride_btb + src // BLOCK_SIZE).to(tl.int64)
        dst_block = tl.load(BT + seq * stride_btb + dst // BLOCK_SIZE).to(tl.int64)
        moved = c_valid & (src != dst)                                  # src == dst: nothing to do
        row = tl.load(base + src_block * stride_b + (src % BLOCK_SIZE) * stride_t + offs_c, mask=moved)
        tl.store(base + dst_block * stride_b + (dst % BLOCK_SIZE) * stride_t + offs_c, row, mask=moved)


def _layer_stride(kv_caches: Sequence[torch.Tensor]) -> int | None:
    """Element spacing between consecutive layers if they are equally spaced in one storage, else None."""
    first = kv_caches[0]
    if len(kv_caches) == 1:
        return 0
    if any(kv.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() for kv in kv_caches):
        return None
    gap = kv_caches[1].data_ptr() - first.data_ptr()
    if gap <= 0 or gap % first.element_size():
        return None
    if any(b.data_ptr() - a.data_ptr() != gap for a, b in itertools.pairwise(kv_caches)):
        return None
    return gap // first.element_size()


def kv_compact(
    kv_caches: Sequence[torch.Tensor],  # L x [num_blocks, num_kv_heads, block_size, 2*head_dim], identical layouts
    block_table: torch.Tensor,          # [num_seqs, max_blocks_per_seq] int32
    src_positions: torch.Tensor,        # [num_moves] int32  token positions to read, ascending per sequence
    dst_positions: torch.Tensor,        # [num_moves] int32  token positions to write, ascending, <= src
    move_start_loc: torch.Tensor,       # [num_seqs+1] int32  moves of b: [msl[b], msl[b+1]), msl[0] == 0
) -> None:
    """Copy K||V of every (layer, KV head) from src to dst positions in place, one kernel launch.

    Requirements (checked when the index tensors are on the CPU): within a sequence src and dst are
    strictly ascending and dst <= src move by move; all layers share shape, dtype and strides
    (compact groups of different layers with separate calls). Moves with src == dst are skipped.
    """
    check_kv_compact_args(kv_caches, block_table, src_positions, dst_positions, move_start_loc)
    first = kv_caches[0]
    num_seqs = block_table.shape[0]
    if src_positions.numel() == 0 or num_seqs == 0:
        return
    _, num_kv_heads, block_size, row = first.shape
    layer_stride = _layer_stride(kv_caches)
    if layer_stride is None:
        logger.debug("kv_compact: %d layers are not equally spaced; using a pointer table", len(kv_caches))
        ptrs = torch.tensor([kv.data_ptr() for kv in kv_caches], dtype=torch.int64, device=first.device)
    else:
        ptrs = block_table   # placeholder, never read
    _kv_compact_kernel[(num_seqs, len(kv_caches), num_kv_heads)](
        first, ptrs, block_table, src_positions, dst_positions, move_start_loc,
        layer_stride or 0, first.stride(0), first.stride(1), first.stride(2), block_table.stride(0),
        BLOCK_SIZE=block_size, ROW=row, ROW_P=triton.next_power_of_2(row), USE_PTRS=layer_stride is None,
    )
