"""kv_compact (Triton, interpreted on CPU) and kv_compact_ref against an in-order copy loop.

Copies are exact, so results are compared with torch.equal.
"""
import pytest
import torch

from vllm_ht.kernels.kv_compact import _layer_stride, kv_compact
from vllm_ht.kernels.reference import kv_compact_ref
from vllm_ht.kernels.testing import compact_layers, start_loc

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
IMPLS = pytest.mark.parametrize("impl", [kv_compact, kv_compact_ref], ids=["triton", "ref"])


def i32(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32)


def in_order_copy(kv_caches, block_table, src, dst, move_start_loc):
    """The obvious loop: one move at a time, in order, each token row copied across all heads."""
    block_size = kv_caches[0].shape[2]
    for kv in kv_caches:
        for b in range(block_table.shape[0]):
            for i in range(int(move_start_loc[b]), int(move_start_loc[b + 1])):
                s, d = int(src[i]), int(dst[i])
                row = kv[int(block_table[b, s // block_size]), :, s % block_size].clone()
                kv[int(block_table[b, d // block_size]), :, d % block_size] = row


@IMPLS
def test_overlapping_moves_in_place(impl):
    # Root at position 5, accepted nodes at 7 and 8 move to 6 and 7; block_size 4 so moves cross blocks.
    caches = compact_layers("stacked", num_layers=2)
    block_table = i32([[9, 2, 4, 0]])                       # positions 4..7 -> block 2, 8..11 -> block 4
    before = [kv.clone() for kv in caches]
    impl(caches, block_table, i32([5, 7, 8]), i32([5, 6, 7]), i32([0, 3]))
    for kv, old in zip(caches, before):
        assert torch.equal(kv[2, :, 2], old[2, :, 3])       # slot(6) <- old slot(7)
        assert torch.equal(kv[2, :, 3], old[4, :, 0])       # slot(7) <- old slot(8), not the new slot(7)
        untouched = torch.ones(kv.shape[0], kv.shape[2], dtype=torch.bool)
        untouched[2, 2] = untouched[2, 3] = False
        assert torch.equal(kv.transpose(1, 2)[untouched], old.transpose(1, 2)[untouched])


@IMPLS
@pytest.mark.parametrize("kind", ["stacked", "separate", "lbnhc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_in_order_copy(impl, kind, dtype):
    caches = compact_layers(kind, dtype=dtype)
    block_table = i32([[3, 7, 1, 8], [0, 0, 0, 0], [5, 2, 9, 4]])
    # seq 0: root at 2, path 2 -> 4 -> 9; seq 1: nothing accepted; seq 2: 10 -> 12 -> 13 -> 15.
    src = i32([2, 4, 9, 10, 12, 13, 15])
    dst = i32([2, 3, 4, 10, 11, 12, 13])
    move_start_loc = start_loc([3, 0, 4])
    expected = [kv.clone() for kv in caches]
    in_order_copy(expected, block_table, src, dst, move_start_loc)
    impl(caches, block_table, src, dst, move_start_loc)
    for got, want in zip(caches, expected):
        assert torch.equal(got, want)


def test_layer_addressing_paths():
    assert _layer_stride(compact_layers("stacked")) == 10 * 2 * 4 * 32
    assert _layer_stride(compact_layers("lbnhc")) == 10 * 2 * 4 * 32
    assert _layer_stride(compact_layers("separate")) is None
    reversed_stack = compact_layers("stacked")[::-1]
    assert _layer_stride(reversed_stack) is None             # descending addresses -> pointer table


@IMPLS
def test_no_moves_is_a_no_op(impl):
    caches = compact_layers("stacked")
    before = [kv.clone() for kv in caches]
    impl(caches, i32([[1, 2]]), i32([]), i32([]), i32([0, 0]))
    assert all(torch.equal(a, b) for a, b in zip(caches, before))


BAD_MOVES = {
    "dst_after_src": (i32([4, 6]), i32([5, 6]), i32([0, 2])),
    "src_not_ascending": (i32([6, 5]), i32([4, 5]), i32([0, 2])),
    "dst_not_ascending": (i32([6, 7]), i32([5, 5]), i32([0, 2])),
    "msl_total_wrong": (i32([6, 7]), i32([5, 6]), i32([0, 1])),
    "beyond_block_table": (i32([6, 70]), i32([5, 6]), i32([0, 2])),
    "int64_positions": (torch.tensor([6, 7]), torch.tensor([5, 6]), i32([0, 2])),
    "length_mismatch": (i32([6, 7]), i32([5]), i32([0, 2])),
}


@IMPLS
@pytest.mark.parametrize("moves", BAD_MOVES.values(), ids=BAD_MOVES.keys())
def test_bad_moves_raise(impl, moves):
    with pytest.raises(ValueError):
        impl(compact_layers("stacked"), i32([[1, 2, 3]]), *moves)


@IMPLS
def test_mismatched_layers_raise(impl):
    caches = compact_layers("separate") + [torch.randn(10, 2, 4, 16)]
    with pytest.raises(ValueError, match="differs from kv_caches"):
        impl(caches, i32([[1, 2, 3]]), i32([6, 7]), i32([5, 6]), i32([0, 2]))


@requires_cuda
@pytest.mark.parametrize("kind", ["stacked", "separate", "lbnhc"])
def test_gpu_matches_reference(kind):
    caches = compact_layers(kind, num_layers=8, shape=(64, 8, 16, 256), dtype=torch.float16, device="cuda")
    block_table = torch.randperm(64, dtype=torch.int32).view(8, 8).cuda()
    counts = [0, 1, 3, 5, 2, 7, 4, 6]
    src, dst = [], []
    for n in counts:                     # root at 20, accepted nodes spread over the next 3n slots
        picks = sorted(torch.randperm(3 * n)[:n].add(21).tolist())
        src += picks
        dst += list(range(21, 21 + n))
    args = (block_table, i32(src).cuda(), i32(dst).cuda(), start_loc(counts, "cuda"))
    expected = [kv.clone() for kv in caches]
    kv_compact_ref(expected, *args)
    kv_compact(caches, *args)
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(caches, expected))
