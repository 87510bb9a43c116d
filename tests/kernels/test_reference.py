"""The torch reference against a row-by-row loop, the CPU dispatchers, and argument validation
(shared by the reference and the Triton wrapper, so both are tested)."""
import pytest
import torch

from vllm_ht import kernels
from vllm_ht.kernels.reference import kv_compact_ref, tree_paged_attention_ref
from vllm_ht.kernels.testing import TOLERANCES, make_problem
from vllm_ht.kernels.tree_attention import tree_paged_attention
from vllm_ht.kernels.tree_attention_cpu import tree_paged_attention_cpu
from vllm_ht.kernels.window_mask import unpack_window_mask

IMPLS = pytest.mark.parametrize("impl", [tree_paged_attention, tree_paged_attention_ref, tree_paged_attention_cpu],
                                ids=["triton", "ref", "cpu"])


def row_by_row(problem) -> torch.Tensor:
    """Slow, obvious attention: for every (row, head), list its visible keys and softmax over them."""
    p = problem
    num_rows, num_heads, head_dim = p.query.shape
    group = num_heads // p.kv_cache.shape[1]
    block_size = p.kv_cache.shape[2]
    out = torch.zeros(num_rows, num_heads, head_dim)
    for b in range(p.context_lens.shape[0]):
        w0, w1 = int(p.window_start_loc[b]), int(p.window_start_loc[b + 1])
        for r in range(int(p.query_start_loc[b]), int(p.query_start_loc[b + 1])):
            bits = unpack_window_mask(p.window_mask[r:r + 1], w1 - w0)[0]
            for h in range(num_heads):
                kvh = h // group
                ks, vs = [], []
                for pos in range(int(p.context_lens[b])):
                    row = p.kv_cache[int(p.block_table[b, pos // block_size]), kvh, pos % block_size]
                    ks.append(row[:head_dim])
                    vs.append(row[head_dim:])
                for j in range(w1 - w0):
                    if bits[j]:
                        ks.append(p.window_key[w0 + j, kvh])
                        vs.append(p.window_value[w0 + j, kvh])
                if ks:
                    weights = torch.softmax(torch.stack(ks).float() @ p.query[r, h].float() * p.scale, 0)
                    out[r, h] = weights @ torch.stack(vs).float()
    return out


def test_reference_matches_row_by_row_loop():
    problem = make_problem([1, 4, 3, 2], [19, 0, 33, 0], windows=[1, 4, 35, 0], num_heads=9,
                           num_kv_heads=3, head_dim=64, block_size=16, layout="lbnhc", seed=11)
    torch.testing.assert_close(tree_paged_attention_ref(*problem.args()), row_by_row(problem),
                               **TOLERANCES[torch.float32])


def test_dispatchers_use_the_cpu_paths_on_cpu():
    problem = make_problem([3, 2], [18, 5], seed=12)
    assert torch.equal(kernels.tree_paged_attention(*problem.args()), tree_paged_attention_cpu(*problem.args()))
    caches = [torch.randn(4, 2, 4, 16) for _ in range(2)]
    expected = [c.clone() for c in caches]
    args = (torch.tensor([[2, 0, 1]], dtype=torch.int32), torch.tensor([3, 6], dtype=torch.int32),
            torch.tensor([1, 2], dtype=torch.int32), torch.tensor([0, 2], dtype=torch.int32))
    kv_compact_ref(expected, *args)
    kernels.compact_kv(caches, *args)
    assert all(torch.equal(a, b) for a, b in zip(caches, expected))


def _break(name, fn):
    """A case: mutate a fresh problem with fn(problem) -> extra kwargs (or None)."""
    return pytest.param(fn, id=name)


BAD_ARGS = [
    _break("query_fp64", lambda p: setattr(p, "query", p.query.double())),
    _break("kv_dtype_differs", lambda p: setattr(p, "kv_cache", p.kv_cache.half())),
    _break("block_table_int64", lambda p: setattr(p, "block_table", p.block_table.long())),
    _break("kv_last_dim_not_2d", lambda p: setattr(p, "kv_cache", p.kv_cache[..., :100])),
    _break("heads_not_multiple", lambda p: setattr(p, "query", p.query[:, :7])),
    _break("window_heads_differ", lambda p: setattr(p, "window_key", p.window_key[:, :1])),
    _break("mask_rows_differ", lambda p: setattr(p, "window_mask", p.window_mask[:-1])),
    _break("qsl_length", lambda p: setattr(p, "query_start_loc", p.query_start_loc[:-1])),
    _break("query_head_dim_strided", lambda p: setattr(p, "query", torch.randn(5, 8, 128)[..., ::2])),
    _break("kv_head_dim_strided", lambda p: setattr(p, "kv_cache", torch.randn(*p.kv_cache.shape[:3], 256)[..., ::2])),
    _break("qsl_not_from_zero", lambda p: setattr(p, "query_start_loc", p.query_start_loc + 1)),
    _break("qsl_decreasing", lambda p: setattr(p, "query_start_loc", torch.tensor([0, 4, 3], dtype=torch.int32))),
    _break("window_wider_than_mask",
           lambda p: setattr(p, "window_start_loc", torch.tensor([0, 33, 35], dtype=torch.int32))),
    _break("block_id_out_of_range", lambda p: setattr(p, "block_table", torch.full_like(p.block_table, 10**6))),
    _break("context_beyond_table", lambda p: setattr(p, "context_lens", torch.full_like(p.context_lens, 10**4))),
    _break("out_overlapping", lambda p: {"out": torch.zeros(1, 1, 64).expand(5, 8, 64)}),
    _break("out_wrong_dtype", lambda p: {"out": torch.zeros(5, 8, 64, dtype=torch.float16)}),
]


@IMPLS
@pytest.mark.parametrize("mutate", BAD_ARGS)
def test_bad_arguments_raise(impl, mutate):
    problem = make_problem([3, 2], [18, 5], windows=[3, 2], seed=13)
    problem.window_key = torch.randn(40, 2, 64)   # room for the window_wider_than_mask case
    problem.window_value = torch.randn(40, 2, 64)
    extra = mutate(problem) or {}
    with pytest.raises(ValueError):
        impl(*problem.args(), **extra)


@IMPLS
def test_good_arguments_pass_validation(impl):
    """The fixture of test_bad_arguments_raise is itself valid, so each failure is the mutation's."""
    problem = make_problem([3, 2], [18, 5], windows=[3, 2], seed=13)
    problem.window_key = torch.randn(40, 2, 64)
    problem.window_value = torch.randn(40, 2, 64)
    impl(*problem.args(), out=torch.zeros(5, 8, 64))


def test_error_messages_name_the_problem():
    problem = make_problem([3, 2], [18, 5], seed=13)
    problem.block_table = problem.block_table.long()
    with pytest.raises(ValueError, match="block_table must be int32"):
        tree_paged_attention(*problem.args())
    problem = make_problem([3, 2], [18, 5], seed=13)
    with pytest.raises(ValueError, match="stride 1 on its last"):
        tree_paged_attention(*problem.args(), out=torch.zeros(5, 8, 128)[..., ::2])
