"""The draft policy: predicted speedup by hand, the choice it makes per batch size, anchors."""
import pytest

from vllm_ht.tree import TokenTree
from vllm_ht.options import HTOptions
from vllm_ht.policy import StepCost, best_plan, predicted_speedup

ACC = [[0.5, 0.1], [0.4, 0.1], [0.3, 0.1]]      # conditional top-r accuracy per depth, k = 3
FREE = StepCost(row=0.0, pseudo_row=0.0, fixed=0.0)


def test_speedup_by_hand():
    # chain root -> (0,) -> (0, 0): path probabilities 0.5 and 0.2, tau = 1.7
    tree = TokenTree.from_paths([[0], [0, 0]])
    # every node an anchor: q = 1, always drafting; each anchor carries D = 2 pseudo rows (the
    # tree's depth, what the next tree reads): cost 1 + 0.1 + 1 * (0.05 * 2 + 0.02 * 2 * 3) = 1.32
    speedup, tokens = predicted_speedup(tree, [0, 1, 2], ACC, 3, 1, StepCost(0.05, 0.02, 0.1))
    assert tokens == pytest.approx(1.7)
    assert speedup == pytest.approx(1.7 / 1.32)
    # a long context costs per request: + 0.2 * 1.5 at 1,500 tokens
    speedup, _ = predicted_speedup(tree, [0, 1, 2], ACC, 3, 1, StepCost(0.05, 0.02, 0.1, context=0.2), 1500)
    assert speedup == pytest.approx(1.7 / 1.62)
    # only the deepest node: it ends the path with p 0.2, so pi_D = 1 / 1.8 and pi_P = 0.8 / 1.8
    speedup, tokens = predicted_speedup(tree, [2], ACC, 3, 1, StepCost(0.05, 0.02, 0.1))
    pi_d, pi_p = 1 / 1.8, 0.8 / 1.8
    assert tokens == pytest.approx(pi_d * 1.7 + pi_p)
    cost = 1 + 0.1 + pi_d * (0.05 * 2 + 0.02 * 2) + pi_p * 0.02 * 2
    assert speedup == pytest.approx(tokens / cost)


def test_free_rows_take_the_biggest_tree_with_every_anchor():
    plan = best_plan(1, ACC, {}, 3, FREE, budgets=(1, 2, 4, 8))
    assert plan.tree.num_nodes == 9 and plan.anchors == tuple(range(9))
    assert plan.speedup == pytest.approx(plan.tokens_per_step)


def test_expensive_rows_turn_drafting_off_as_the_batch_grows():
    cost = StepCost(row=0.07, pseudo_row=0.03, fixed=0.1)
    small, large = best_plan(1, ACC, {}, 3, cost), best_plan(32, ACC, {}, 3, cost)
    assert small.drafts and small.speedup > 1.02
    assert not large.drafts and large.tree.num_nodes == 1 and large.speedup == 1.0


def test_budget_cap_and_fixed_anchor_count():
    plan = best_plan(1, ACC, {}, 3, FREE, max_nodes=2, pseudo_nodes=1)
    assert plan.tree.num_nodes <= 3 and len(plan.anchors) == 1


def test_options_validate_costs_and_cap_nodes_by_rows():
    with pytest.raises(ValueError, match="step costs"):
        HTOptions(row_cost=-1.0)
    with pytest.raises(ValueError, match="cpu_cache_layout='packed': choose one of"):
        HTOptions(cpu_cache_layout="packed")
    opts = HTOptions(row_budget=32)
    assert [opts.max_nodes_for_batch(b) for b in (1, 8, 16, 32)] == [31, 3, 1, 0]
