"""Triton tree_paged_attention against the torch reference, on awkward shapes.

On CPU the kernel runs in Triton's interpreter (small cases, big tiles); `TestGPU` repeats larger
cases natively and skips without CUDA. Every output starts as NaN poison, so a row the kernel
fails to write shows. Tolerances: kernels.testing.TOLERANCES.
"""
import pytest
import torch

from vllm_ht.kernels.reference import tree_paged_attention_ref
from vllm_ht.kernels.testing import TOLERANCES, make_problem
from vllm_ht.kernels.tree_attention import tree_paged_attention

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
T, F = True, False


def strided_copy(t: torch.Tensor, extra_heads: int = 2) -> torch.Tensor:
    """Same values, non-contiguous: a slice of a wider [n, heads + extra, d] buffer (like q of a qkv)."""
    buf = torch.full((t.shape[0], t.shape[1] + extra_heads, t.shape[2]), float("nan"), dtype=t.dtype,
                     device=t.device)
    buf[:, : t.shape[1]] = t
    return buf[:, : t.shape[1]]


def run_both(problem, **kwargs):
    """(triton output, reference output), both written into NaN-poisoned buffers."""
    out = torch.full_like(problem.query, float("nan"))
    got = tree_paged_attention(*problem.args(), out, **kwargs)
    assert got is out
    want = tree_paged_attention_ref(*problem.args(), torch.full_like(problem.query, float("nan")))
    return out, want


def assert_matches(out, want):
    assert not out.isnan().any(), "a row was not written"
    torch.testing.assert_close(out, want, **TOLERANCES[out.dtype])


CASES = {
    "q1_ctx1": {"rows": [1], "contexts": [1]},
    "q5_ctx18_gqa9-3_lbnhc_fp16": {"rows": [5], "contexts": [18], "num_heads": 9, "num_kv_heads": 3,
                                       "layout": "lbnhc", "dtype": torch.float16},
    "q33_ctx463_d128_bs128_bf16": {"rows": [33], "contexts": [463], "windows": [40], "head_dim": 128,
                                       "block_size": 128, "layout": "padded", "dtype": torch.bfloat16},
    "three_seqs_gqa9-3": {"rows": [1, 5, 33], "contexts": [463, 1, 18], "windows": [1, 5, 40],
                              "num_heads": 9, "num_kv_heads": 3, "layout": "padded"},
    "ctx0_rows": {"rows": [3, 2, 4], "contexts": [0, 5, 0], "windows": [3, 2, 0], "dtype": torch.float16},
    "huge_num_blocks": {"rows": [5, 2], "contexts": [40, 17], "num_heads": 4, "num_kv_heads": 1,
                            "dtype": torch.float16, "huge": True},
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_reference(case):
    problem = make_problem(**case)
    assert_matches(*run_both(problem))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads", [(9, 3, 64), (8, 2, 128)], ids=["gqa9-3_d64", "gqa8-2_d128"])
def test_dtypes_and_head_shapes(dtype, heads):
    num_heads, num_kv_heads, head_dim = heads
    problem = make_problem([5, 2], [18, 33], num_heads=num_heads, num_kv_heads=num_kv_heads,
                           head_dim=head_dim, dtype=dtype, layout="lbnhc", seed=1)
    assert_matches(*run_both(problem))


def test_context_splits_match_one_split():
    problem = make_problem([5, 2], [463, 18], windows=[7, 2], num_heads=4, num_kv_heads=2, seed=2)
    split, want = run_both(problem, num_splits=4)
    assert_matches(split, want)
    whole, _ = run_both(problem, num_splits=1)
    torch.testing.assert_close(split, whole, **TOLERANCES[torch.float32])


def test_non_contiguous_query_and_window():
    problem = make_problem([5, 3], [18, 20], num_heads=9, num_kv_heads=3, seed=3)
    want = tree_paged_attention_ref(*problem.args())
    problem.query = strided_copy(problem.query)
    problem.window_key = strided_copy(problem.window_key)
    problem.window_value = strided_copy(problem.window_value, extra_heads=1)
    assert not problem.query.is_contiguous() and not problem.window_key.is_contiguous()
    out = torch.full((8, 12, 64), float("nan"))[:, :9]          # non-contiguous out, too
    tree_paged_attention(*problem.args(), out)
    assert_matches(out, want)


def test_padding_rows_after_last_sequence_are_untouched():
    problem = make_problem([3, 2], [18, 5], seed=4)
    problem.query = torch.cat([problem.query, torch.randn(3, 8, 64)])          # 3 padding rows
    problem.window_mask = torch.cat([problem.window_mask, torch.full((3, 1), -1, dtype=torch.int32)])
    for num_splits in (1, 2):
        out, want = run_both(problem, num_splits=num_splits)
        assert out[5:].isnan().all() and want[5:].isnan().all()
        assert_matches(out[:5], want[:5])


@pytest.mark.parametrize("impl", [tree_paged_attention, tree_paged_attention_ref], ids=["triton", "ref"])
def test_row_that_sees_nothing_is_zero(impl):
    # ctx 0: row 0 sees no key at all, row 1 sees only window key 0.
    problem = make_problem([2], [0], windows=[2], masks=[torch.tensor([[F, F], [T, F]])])
    out = impl(*problem.args(), torch.full_like(problem.query, float("nan")))
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    value = problem.window_value[0].repeat_interleave(4, dim=0)                  # [num_heads, D]
    torch.testing.assert_close(out[1], value, **TOLERANCES[torch.float32])


def test_returns_new_zeroed_out_when_none_given():
    problem = make_problem([2, 0, 3], [7, 4, 0], seed=5)
    out = tree_paged_attention(*problem.args())
    assert_matches(out, tree_paged_attention_ref(*problem.args()))


def test_rejects_head_dim_that_is_not_a_power_of_two():
    problem = make_problem([2], [7], head_dim=80)
    tree_paged_attention_ref(*problem.args())                                    # the reference is fine
    with pytest.raises(ValueError, match="power of two"):
        tree_paged_attention(*problem.args())


@requires_cuda
class TestGPU:
    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
    @pytest.mark.parametrize("heads", [(32, 8, 128), (9, 3, 64)], ids=["gqa32-8_d128", "gqa9-3_d64"])
    def test_decode_shapes(self, dtype, heads):
        num_heads, num_kv_heads, head_dim = heads
        problem = make_problem([17, 64, 1, 40], [512, 3001, 1, 8000], windows=[17, 80, 1, 40],
                               num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                               dtype=dtype, layout="lbnhc", device="cuda")
        assert_matches(*run_both(problem))

    @pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
    @pytest.mark.parametrize("num_splits", [None, 1, 3])
    def test_cpu_cases_on_gpu(self, case, num_splits):
        problem = make_problem(**case, device="cuda")
        assert_matches(*run_both(problem, num_splits=num_splits))
