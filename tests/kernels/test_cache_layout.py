"""The K_TRANSPOSED layout (vLLM's CPU cache packing): its memory, slot reads and writes, block
gathers, and the CPU attention plan and compaction reading it, against the ROWS layout."""
import pytest
import torch

from vllm_ht.kernels.cache_layout import (K_TRANSPOSED, ROWS, check_layout, gather_pages, read_slots,
                                          to_layout, write_slots)
from vllm_ht.kernels.reference import kv_compact_ref, tree_paged_attention_ref
from vllm_ht.kernels.testing import TOLERANCES, make_problem, start_loc
from vllm_ht.kernels.tree_attention_cpu import TreeAttentionPlan


def test_memory_matches_the_documented_example():
    """block_size 2, head_dim 3, one head: K transposed, then V as rows (module docstring)."""
    rows = torch.zeros(1, 1, 2, 6)
    rows[0, 0, 0] = torch.tensor([1, 2, 3, 4, 5, 6.])       # token a: K a.k0..a.k2, V a.v0..a.v2
    rows[0, 0, 1] = torch.tensor([11, 12, 13, 14, 15, 16.])
    packed = to_layout(rows, K_TRANSPOSED)
    assert packed.flatten().tolist() == [1, 11, 2, 12, 3, 13, 4, 5, 6, 14, 15, 16]


def test_slots_read_back_what_was_written():
    gen = torch.Generator().manual_seed(0)
    blocks, heads, block_size, d = 5, 3, 4, 8
    for layout in (ROWS, K_TRANSPOSED):
        cache = torch.zeros(blocks, heads, block_size, 2 * d)
        slots = torch.randperm(blocks * block_size, generator=gen)[:9]
        rows = torch.randn(9, heads, 2 * d, generator=gen)
        write_slots(cache, rows, slots, layout)
        assert torch.equal(read_slots(cache, slots, layout), rows)
        untouched = torch.ones(blocks * block_size, dtype=torch.bool)
        untouched[slots] = False
        assert (read_slots(cache, untouched.nonzero().flatten(), layout) == 0).all()


def test_packed_cache_holds_the_same_tokens():
    rows = torch.randn(6, 2, 4, 16, generator=torch.Generator().manual_seed(1))
    packed = to_layout(rows, K_TRANSPOSED)
    assert not torch.equal(packed, rows)                              # the memory differs ...
    every = torch.arange(6 * 4)
    assert torch.equal(read_slots(packed, every, K_TRANSPOSED), read_slots(rows, every, ROWS))   # ... the tokens not
    pages = torch.tensor([[4, 0, 2], [1, 1, 5]])
    want = rows[pages].transpose(2, 3).reshape(2, 12, 2, 16)          # token rows of those blocks, in order
    assert torch.equal(gather_pages(packed, pages), want)


SHAPES = [
    pytest.param([3, 2], [0, 0], None, id="no-context-at-all"),
    pytest.param([1, 1, 1, 1], [7, 300, 0, 33], None, id="decode-batch"),
    pytest.param([1, 5, 129], [1, 18, 463], None, id="odd-rows-and-contexts"),
    pytest.param([17, 1, 3], [1328, 0, 33], [17, 1, 40], id="long-context-wide-window"),
    pytest.param([4, 0, 2], [5, 9, 0], [4, 3, 0], id="empty-sequence-and-empty-window"),
    pytest.param([1], [300], None, id="one-sequence-decode"),
    pytest.param([4], [129], [10], id="one-sequence-window-wider-than-its-rows"),
]


@pytest.mark.parametrize("rows,contexts,windows", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_plan_reads_the_packed_cache(rows, contexts, windows, dtype):
    problem = make_problem(rows, contexts, windows, num_heads=9, num_kv_heads=3, block_size=32, dtype=dtype,
                           seed=len(rows) + sum(contexts))
    args = list(problem.args())
    want = tree_paged_attention_ref(*args)
    args[1] = to_layout(problem.kv_cache, K_TRANSPOSED)
    plan = TreeAttentionPlan.build(*args[:-1], cache_layout=K_TRANSPOSED)
    got = plan.run(problem.query, args[1], problem.window_key, problem.window_value, problem.scale)
    torch.testing.assert_close(got, want, **TOLERANCES[dtype])
    # read as ROWS, the packed memory is other numbers: the layout is what makes the result right
    wrong = TreeAttentionPlan.build(*args[:-1]).run(problem.query, args[1], problem.window_key,
                                                    problem.window_value, problem.scale)
    if sum(contexts):
        assert not torch.allclose(wrong, want, **TOLERANCES[dtype])


@pytest.mark.parametrize("consecutive", [True, False])
def test_one_sequence_on_consecutive_blocks_reads_them_in_place(consecutive):
    """One sequence whose blocks are consecutive is read through a view of the cache (no block
    gather); the result is the reference's either way."""
    problem = make_problem([3], [200], [6], num_heads=9, num_kv_heads=3, block_size=32, seed=7)
    blocks = problem.block_table.shape[1]
    problem.block_table[0] = torch.arange(blocks) + 2 if consecutive else torch.arange(blocks).flip(0) + 2
    args = list(problem.args())
    want = tree_paged_attention_ref(*args)
    args[1] = to_layout(problem.kv_cache, K_TRANSPOSED)
    plan = TreeAttentionPlan.build(*args[:-1], cache_layout=K_TRANSPOSED)
    assert (plan.first_page is not None) == consecutive
    got = plan.run(problem.query, args[1], problem.window_key, problem.window_value, problem.scale)
    torch.testing.assert_close(got, want, **TOLERANCES[torch.float32])


def test_compaction_moves_tokens_in_the_packed_cache():
    gen = torch.Generator().manual_seed(2)
    layers = [torch.randn(8, 2, 4, 16, generator=gen) for _ in range(3)]
    block_table = torch.tensor([[3, 5, 1], [6, 0, 7]], dtype=torch.int32)
    src = torch.tensor([5, 7, 8, 2, 6], dtype=torch.int32)           # seq 0: 5, 7, 8 -> 5, 6, 7; seq 1: 2, 6 -> 1, 2
    dst = torch.tensor([5, 6, 7, 1, 2], dtype=torch.int32)
    loc = start_loc([3, 2])
    packed = [to_layout(kv, K_TRANSPOSED) for kv in layers]
    kv_compact_ref(layers, block_table, src, dst, loc)
    kv_compact_ref(packed, block_table, src, dst, loc, cache_layout=K_TRANSPOSED)
    for rows, pk in zip(layers, packed):
        assert torch.equal(pk, to_layout(rows, K_TRANSPOSED))


def test_layout_errors_name_the_problem():
    cache = torch.zeros(2, 1, 4, 8)
    with pytest.raises(ValueError, match="unknown cache layout 'hnd'"):
        check_layout("hnd", cache)
    with pytest.raises(ValueError, match="must be contiguous"):
        check_layout(K_TRANSPOSED, torch.zeros(2, 4, 2, 8).transpose(1, 2))
