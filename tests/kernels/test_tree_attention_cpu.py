"""The planned CPU path (`vllm_ht.kernels.tree_attention_cpu`) against the torch reference: awkward shapes,
dtypes, layouts, rows that see nothing, and one plan reused across layers."""
import pytest
import torch

from vllm_ht.kernels.reference import tree_paged_attention_ref
from vllm_ht.kernels.testing import TOLERANCES, make_problem
from vllm_ht.kernels.tree_attention_cpu import TreeAttentionPlan, tree_paged_attention_cpu

SHAPES = [
    pytest.param([1], [0], None, id="one-row-no-context"),
    pytest.param([1, 5, 129], [1, 18, 463], None, id="odd-rows-and-contexts"),
    pytest.param([17, 1, 3], [1328, 0, 33], [17, 1, 40], id="long-context-wide-window"),
    pytest.param([4, 0, 2], [5, 9, 0], [4, 3, 0], id="empty-sequence-and-empty-window"),
    pytest.param([1, 1, 1, 1], [7, 300, 0, 33], None, id="decode-batch-no-padding-rows"),
    pytest.param([3, 3], [18, 2], None, id="equal-trees-no-padding-rows"),
]


@pytest.mark.parametrize("rows,contexts,windows", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "lbnhc"])
def test_matches_reference(rows, contexts, windows, dtype, layout):
    problem = make_problem(rows, contexts, windows, num_heads=9, num_kv_heads=3, dtype=dtype, layout=layout,
                           seed=len(rows) + sum(contexts))
    poison = torch.full_like(problem.query, float("nan"))
    got = tree_paged_attention_cpu(*problem.args(), poison)
    want = tree_paged_attention_ref(*problem.args())
    torch.testing.assert_close(got, want, **TOLERANCES[dtype])


def test_rows_that_see_nothing_get_zeros():
    masks = [torch.tensor([[False, False], [True, False]])]      # row 0 sees no key, context is empty
    problem = make_problem([2], [0], masks=masks, seed=3)
    out = tree_paged_attention_cpu(*problem.args())
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    torch.testing.assert_close(out, tree_paged_attention_ref(*problem.args()), **TOLERANCES[torch.float32])


def test_one_plan_serves_every_layer():
    """The engine builds a plan on the first layer and runs it on the others (other caches,
    queries and window keys, same indices)."""
    layers = [make_problem([3, 8, 1], [18, 37, 5], seed=s) for s in (1, 2, 3)]
    for p in layers[1:]:   # same step: same block table, lengths and masks
        p.block_table, p.context_lens, p.window_mask = layers[0].block_table, layers[0].context_lens, layers[0].window_mask
    first = layers[0]
    plan = TreeAttentionPlan.build(*first.args()[:-1])
    for p in layers:
        got = plan.run(p.query, p.kv_cache, p.window_key, p.window_value, p.scale)
        torch.testing.assert_close(got, tree_paged_attention_ref(*p.args()), **TOLERANCES[torch.float32])


def test_plan_refuses_arguments_it_was_not_built_for():
    problem = make_problem([3, 2], [18, 5], seed=4)
    plan = TreeAttentionPlan.build(*problem.args()[:-1])
    other = make_problem([3, 3], [18, 5], seed=4)
    with pytest.raises(ValueError, match="do not match the plan"):
        plan.run(other.query, other.kv_cache, other.window_key, other.window_value, other.scale)
