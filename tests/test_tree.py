import itertools

import pytest
import torch

from vllm_ht.tree import (TokenTree, best_template, calibrate_templates, expected_accepted_length,
                          normalize_paths, template_for_budget)

T, F = True, False


def test_chain_mask_by_hand():
    tree = TokenTree.from_paths([(0,), (0, 0), (0, 0, 0)])
    assert tree.mask.tolist() == [[T, F, F, F],
                                  [T, T, F, F],
                                  [T, T, T, F],
                                  [T, T, T, T]]
    assert tree.parents.tolist() == [-1, 0, 1, 2]
    assert tree.positions(10).tolist() == [10, 11, 12, 13]


def test_small_tree_by_hand():
    # root -> a=(0,), b=(1,);  a -> c=(0,0), d=(0,1);  c -> e=(0,0,0)
    tree = TokenTree.from_paths([(0, 0), (1,), (0,), (0, 0, 0), (0, 1)])  # any order in
    assert tree.paths == ((0,), (1,), (0, 0), (0, 1), (0, 0, 0))
    assert tree.parents.tolist() == [-1, 0, 0, 1, 1, 3]
    assert tree.depths.tolist() == [0, 1, 1, 2, 2, 3]
    assert tree.ranks.tolist() == [-1, 0, 1, 0, 1, 0]
    assert tree.children == ((1, 2), (3, 4), (), (5,), (), ())
    assert tree.mask.tolist() == [[T, F, F, F, F, F],
                                  [T, T, F, F, F, F],
                                  [T, F, T, F, F, F],
                                  [T, T, F, T, F, F],
                                  [T, T, F, F, T, F],
                                  [T, T, F, T, F, T]]
    assert tree.retrieve.tolist() == [[0, -1, -1, -1], [0, 1, -1, -1], [0, 2, -1, -1],
                                      [0, 1, 3, -1], [0, 1, 4, -1], [0, 1, 3, 5]]
    assert tree.path_to(5) == [0, 1, 3, 5]
    drafts = torch.tensor([[7, 9], [4, 5], [8, 6]])
    assert tree.node_tokens(3, drafts).tolist() == [3, 7, 9, 4, 5, 8]


def test_every_prefix_is_a_tree():
    tree = TokenTree.from_paths(best_template([[0.5, 0.2, 0.1], [0.4, 0.2], [0.3, 0.1]], 12))
    for n in range(1, tree.num_nodes + 1):
        sub = tree.prefix(n)
        assert sub.num_nodes == n
        assert torch.equal(sub.mask, tree.mask[:n, :n])
        assert (sub.parents[1:] < torch.arange(1, n)).all()


def test_not_ancestor_closed_or_duplicate():
    with pytest.raises(ValueError, match="no parent"):
        normalize_paths([(0,), (1, 0)])
    with pytest.raises(ValueError, match="duplicate"):
        normalize_paths([(0,), (0,)])


def test_node_tokens_checks_draft_shape():
    tree = TokenTree.from_paths([(0,), (1,), (0, 0)])
    with pytest.raises(ValueError, match="too small"):
        tree.node_tokens(1, torch.zeros(2, 1, dtype=torch.long))


def test_expected_accepted_length():
    acc = [[0.5, 0.2], [0.4, 0.1]]
    assert expected_accepted_length([], acc) == 1.0
    assert expected_accepted_length([(0,), (1,), (0, 0)], acc) == pytest.approx(1 + 0.5 + 0.2 + 0.2)


def _all_closed_templates(acc, n, max_depth):
    """Brute force: every ancestor-closed set of n paths over the table's ranks."""
    paths = [p for d in range(1, max_depth + 1)
             for p in itertools.product(*(range(len(acc[j])) for j in range(d)))]
    for combo in itertools.combinations(paths, n):
        s = set(combo)
        if all(len(p) == 1 or p[:-1] in s for p in combo):
            yield combo


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7])
def test_best_template_is_optimal(n):
    acc = [[0.6, 0.25, 0.1], [0.5, 0.3], [0.45, 0.2]]
    best = max(expected_accepted_length(c, acc) for c in _all_closed_templates(acc, n, 3))
    got = best_template(acc, n)
    assert len(got) == n
    assert expected_accepted_length(got, acc) == pytest.approx(best)
    normalize_paths(got)  # ancestor-closed


def test_calibrated_templates_and_budget_lookup():
    acc = [[0.7, 0.1, 0.05], [0.5, 0.1], [0.4, 0.05]]
    templates = calibrate_templates(acc, budgets=(1, 4, 8))
    assert templates[1] == [[0]] and len(templates[8]) == 8
    assert template_for_budget(templates, acc, 4, 3).paths == tuple(map(tuple, templates[4]))
    # not stored: searched from the accuracy table, same answer as the stored calibration would give
    assert template_for_budget(templates, acc, 6, 3).paths == tuple(best_template(acc, 6))
    # no accuracy: the generic prior, depth limited to num_steps
    assert template_for_budget({}, None, 16, 2).max_depth <= 2


def test_end_probabilities_by_hand():
    from vllm_ht.tree import end_probabilities, likely_end_nodes

    acc = [[0.5, 0.2], [0.4]]
    tree = TokenTree.from_paths([(0,), (1,), (0, 0)])
    # path probs: root 1, (0,) .5, (1,) .2, (0,0) .2 -> ends: root .3, (0,) .3, (1,) .2, (0,0) .2
    assert torch.allclose(end_probabilities(tree, acc), torch.tensor([0.3, 0.3, 0.2, 0.2]))
    assert end_probabilities(tree, acc).sum().item() == pytest.approx(1.0)
    assert likely_end_nodes(tree, acc, 2) == [0, 1]
    assert likely_end_nodes(tree, acc, 9) == [0, 1, 2, 3]
