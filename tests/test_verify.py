import pytest
import torch
from scipy.stats import chisquare

from vllm_ht.tree import TokenTree
from vllm_ht.verify import SamplingParams, sample_token, target_probs, verify_tree

V = 6


def _onehot_logits(argmaxes):
    logits = torch.zeros(len(argmaxes), V)
    logits[torch.arange(len(argmaxes)), torch.tensor(argmaxes)] = 5.0
    return logits


TREE = TokenTree.from_paths([(0,), (1,), (0, 0), (0, 1), (1, 0)])  # nodes 1..5
TOKENS = torch.tensor([9, 1, 2, 3, 4, 5])  # root token 9 (ignored), node tokens 1..5


def test_greedy_accepts_second_branch_then_bonus():
    # root's argmax is 2 = node 2's token; node 2's argmax is 5 = node 5's token; node 5 -> bonus 0
    res = verify_tree(TREE, TOKENS, _onehot_logits([2, 0, 0, 0, 0, 0]).index_put_(
        (torch.tensor([2, 5]),), torch.tensor([[0, 0, 0, 0, 0, 9.0], [9.0, 0, 0, 0, 0, 0]])))
    assert res.accepted == [0, 2, 5] and res.emitted == [2, 5, 0] and res.bonus == 0


def test_greedy_rejects_at_root():
    res = verify_tree(TREE, TOKENS, _onehot_logits([4, 3, 3, 3, 3, 3]))  # 4 is not a root child
    assert res.accepted == [0] and res.emitted == [4]


def test_greedy_full_depth():
    res = verify_tree(TREE, TOKENS, _onehot_logits([1, 3, 0, 0, 0, 0]))
    assert res.accepted == [0, 1, 3] and res.emitted == [1, 3, 0]


def test_shape_errors():
    with pytest.raises(ValueError, match="do not match"):
        verify_tree(TREE, TOKENS[:3], _onehot_logits([1, 2, 3]))


def test_target_probs_top_k_top_p():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    p = target_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    assert (p[0, 2:] == 0).all() and p[0, :2].sum() == pytest.approx(1.0)
    full = logits.softmax(-1)[0]  # [0.644, 0.237, 0.087, 0.032]
    p = target_probs(logits, SamplingParams(temperature=1.0, top_p=0.85))
    assert (p[0, :2] > 0).all() and (p[0, 2:] == 0).all()  # 0.644 < 0.85 <= 0.881
    p = target_probs(logits, SamplingParams(temperature=1.0, top_p=0.5))
    assert p[0].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert torch.allclose(target_probs(logits, SamplingParams(temperature=1.0))[0], full)


def test_params_validation():
    for bad in (dict(temperature=-1), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


# ---- sampling: the emitted tokens follow the target distribution ------------------------------
# Drafts sit on the two most likely root tokens, so acceptance is common and a rule that treats
# accepted and rejected cases differently shows a bias.
ROOT_P = torch.tensor([0.05, 0.35, 0.30, 0.15, 0.10, 0.05])
NODE_P = torch.tensor([0.40, 0.10, 0.20, 0.10, 0.15, 0.05])
PARAMS = SamplingParams(temperature=1.0)


def _logits():
    rows = [ROOT_P] + [NODE_P] * (TREE.num_nodes - 1)
    return torch.stack(rows).log()


def _biased_verify(tree, tokens, logits, params, gen):
    """A wrong rule: on rejection, re-sample the stop token (a fresh draw, which may land on a draft)."""
    res = verify_tree(tree, tokens, logits, params, gen)
    if len(res.accepted) == 1:
        return [sample_token(logits[0], params, gen)]
    return res.emitted


def _first_two(rule, n=20000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    first, second_given_1 = torch.zeros(V), torch.zeros(V)
    logits = _logits()
    for _ in range(n):
        emitted = rule(TREE, TOKENS, logits, PARAMS, gen)
        first[emitted[0]] += 1
        if emitted[0] == 1 and len(emitted) > 1:
            second_given_1[emitted[1]] += 1
    return first, second_given_1


def test_sampling_matches_target_distribution():
    first, second = _first_two(lambda *a: verify_tree(*a).emitted)
    assert chisquare(first, ROOT_P * first.sum()).pvalue > 1e-3
    assert chisquare(second, NODE_P * second.sum()).pvalue > 1e-3
    assert second.sum() > 5000  # the accepted branch was exercised


def test_chi_square_detects_a_biased_rule():
    first, _ = _first_two(_biased_verify)
    assert chisquare(first, ROOT_P * first.sum()).pvalue < 1e-6


def test_seeded_sampling_is_reproducible():
    logits = torch.randn(50)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = [sample_token(logits, PARAMS, g1) for _ in range(20)]
    assert a == [sample_token(logits, PARAMS, g2) for _ in range(20)]
    assert len(set(a)) > 1  # really sampling, not argmax
