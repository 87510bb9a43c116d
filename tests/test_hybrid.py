"""Hybrid trees: merging a prompt-lookup chain into the pseudo tree (vllm_ht/hybrid.py), and the
policy's lookup length (vllm_ht/policy.py). Oracles: hand-built trees, brute-force walks."""
import random

import pytest

from vllm_ht import hybrid
from vllm_ht.hybrid import LOOKUP, LOOKUP_RANK, PSEUDO
from vllm_ht.tree import TokenTree
from vllm_ht.verify import SamplingParams, verify_tree
from vllm_ht.policy import DraftPlan, LookupStats, StepCost, best_lookup_length, lookup_row_cost, no_drafts

L = LOOKUP_RANK
TREE = TokenTree.from_paths([[0], [1], [0, 0]])


def test_docstring_example():
    d = hybrid.merge(TREE, [7, 9, 4], [0, 1], [7, 5, 6])
    assert d.tree.paths == ((0,), (1,), (0, 0), (0, L), (0, L, L))
    assert d.tokens == (7, 9, 4, 5, 6)
    assert d.sources == (0, PSEUDO | LOOKUP, PSEUDO, PSEUDO, LOOKUP, LOOKUP)
    assert d.lookup_nodes == (1, 4, 5) and d.anchors == (0, 1)


def test_lookup_that_disagrees_at_once_hangs_from_the_root_after_the_pseudo_siblings():
    d = hybrid.merge(TREE, [7, 9, 4], [0], [3, 3], lookup_anchor=True)
    assert d.tree.paths == ((0,), (1,), (L,), (0, 0), (L, L))
    assert d.tokens == (7, 9, 3, 4, 3) and d.lookup_nodes == (3, 5) and d.anchors == (0, 5)


def test_lookup_inside_the_pseudo_tree_adds_no_node():
    d = hybrid.merge(TREE, [7, 9, 4], [3], [7, 4], lookup_anchor=True)
    assert d.tree == TREE and d.tokens == (7, 9, 4)
    assert d.lookup_nodes == (1, 3) and d.anchors == (3,)        # no new node: no extra anchor
    assert d.sources == (0, 3, 1, 3)


def test_lookup_only_chain_and_its_anchors():
    d = hybrid.lookup_only([5, 6, 7], anchors=(0, -1))
    assert d.tree.paths == ((L,), (L, L), (L, L, L)) and d.tokens == (5, 6, 7) and d.anchors == (0, 3)
    assert hybrid.lookup_only([5], anchors=()).anchors == ()


def _random_tree(rng):
    paths = [(0,)]
    for _ in range(rng.randint(0, 10)):
        parent = rng.choice(paths + [()])
        ranks = {p[-1] for p in paths if p[:-1] == parent}
        paths.append(parent + (min(set(range(8)) - ranks),))
    return TokenTree.from_paths(paths)


@pytest.mark.parametrize("seed", range(30))
def test_merged_trees_are_valid_and_keep_every_path(seed):
    """Any merge: BFS order, ancestor-closed prefixes (scheduler cuts), distinct sibling tokens, the
    pseudo tree's root-to-node token paths and the lookup chain all present, sources exact."""
    rng = random.Random(seed)
    tree = _random_tree(rng)
    tokens = [rng.randint(0, 5) for _ in range(tree.num_nodes - 1)]
    for i, kids in enumerate(tree.children):           # pseudo siblings are distinct top-r tokens
        used = set()
        for k in kids:
            while tokens[k - 1] in used:
                tokens[k - 1] += 6
            used.add(tokens[k - 1])
    lookup = [rng.randint(0, 7) for _ in range(rng.randint(0, 5))]
    d = hybrid.merge(tree, tokens, [0], lookup, lookup_anchor=True)
    assert list(d.tree.paths) == sorted(d.tree.paths, key=lambda p: (len(p), p))
    for n in range(1, d.tree.num_nodes + 1):            # every prefix is a tree
        TokenTree.from_paths(d.tree.paths[: n - 1])
    seqs = {tuple(d.tokens[j - 1] for j in d.tree.path_to(i)[1:]): i for i in range(d.tree.num_nodes)}
    assert len(seqs) == d.tree.num_nodes               # siblings never share a token
    for i in range(1, tree.num_nodes):
        path = tuple(tokens[j - 1] for j in tree.path_to(i)[1:])
        assert d.sources[seqs[path]] & PSEUDO
    for depth in range(1, len(lookup) + 1):
        node = seqs[tuple(lookup[:depth])]
        assert d.lookup_nodes[depth - 1] == node and d.sources[node] & LOOKUP
    assert sum(1 for s in d.sources if s & PSEUDO) == tree.num_nodes - 1


def test_prefix_keeps_what_the_scheduler_kept():
    d = hybrid.merge(TREE, [7, 9, 4], [0, 1], [7, 5, 6], lookup_anchor=True)     # nodes (0,)(1,)(0,0)(0,L)(0,L,L)
    cut = d.prefix(4)
    assert cut.tree == TREE and cut.tokens == (7, 9, 4) and cut.lookup_nodes == (1,) and cut.anchors == (0, 1)
    assert d.prefix(1).tokens == () and d.prefix(1).anchors == (0,)


def test_greedy_verification_follows_the_lookup_branch_and_counts_sources():
    import torch

    d = hybrid.merge(TREE, [7, 9, 4], [0], [7, 5, 6])
    vocab = 12
    logits = torch.full((d.tree.num_nodes, vocab), -5.0)
    want = {0: 7, 1: 5, 4: 6, 5: 2}                  # the target continues 7 5 6, then 2
    for node, tok in want.items():
        logits[node, tok] = 5.0
    res = verify_tree(d.tree, torch.tensor([-1, *d.tokens]), logits, SamplingParams(), None)
    assert res.accepted == [0, 1, 4, 5] and res.emitted == [7, 5, 6, 2]
    assert hybrid.source_counts(d, res.accepted) == {"pseudo": (3, 1), "lookup": (3, 3), "both": (1, 1)}
    assert hybrid.lookup_depth_accepted(d, res.accepted) == (3, 3)
    assert hybrid.lookup_depth_accepted(d, [0, 2]) == (3, 0)


def test_lookup_stats_and_length_policy():
    cost = StepCost(row=0.02, pseudo_row=0.04, fixed=0.3)
    stats = LookupStats()
    for _ in range(200):                                # chains of 4: always accepted through 3
        stats.record_match(True)
        stats.record(4, 3)
    assert stats.reached(1) > 0.95 and stats.reached(4) < 0.05
    assert best_lookup_length(no_drafts(), stats, 1, cost, 8) == 3
    plan = DraftPlan(tree=TREE, anchors=(0,), speedup=1.3, tokens_per_step=1.6)
    assert best_lookup_length(plan, stats, 1, cost, 8) == 3
    assert best_lookup_length(plan, stats, 1, cost, 2) == 2            # the row budget caps it
    bad = LookupStats()
    for _ in range(200):                                # lookups never right: no chain, even for free
        bad.record_match(True)
        bad.record(3, 0)
    assert best_lookup_length(no_drafts(), bad, 1, cost, 8) == 0
    assert best_lookup_length(plan, bad, 1, cost, 8) == 0
    none = LookupStats()
    for _ in range(200):                                # the matcher never finds anything: no rows
        none.record_match(False)
    assert best_lookup_length(no_drafts(), none, 1, cost, 8) == 0


def test_lookup_nodes_priced_as_tree_rows_at_batch_1_and_as_batch_rows_above():
    """At batch 1 a lookup node costs the calibrated tree row; above it, a whole batch row. With
    tree rows much cheaper than batch rows, the same measured chains get longer at batch 1."""
    cost = StepCost(row=0.01, pseudo_row=0.04, fixed=0.3, batch_row=0.08)
    assert lookup_row_cost(cost, 1) == 0.01 and lookup_row_cost(cost, 2) == lookup_row_cost(cost, 8) == 0.08
    stats = LookupStats()
    for i in range(450):                                # chains of 8, followed through depth i % 9
        stats.record_match(True)
        stats.record(8, i % 9)
    plan = DraftPlan(tree=TREE, anchors=(0,), speedup=1.3, tokens_per_step=1.6)
    at_1, at_2 = best_lookup_length(plan, stats, 1, cost, 8), best_lookup_length(plan, stats, 2, cost, 8)
    assert at_1 > at_2 >= 1
    cheap = StepCost(row=0.01, pseudo_row=0.04, fixed=0.3, batch_row=0.01)   # same price at batch 1
    assert at_1 == best_lookup_length(plan, stats, 1, cheap, 8) == 8
    dear = StepCost(row=0.08, pseudo_row=0.04, fixed=0.3, batch_row=0.08)    # batch-row price at batch 1
    assert best_lookup_length(plan, stats, 1, dear, 8) < at_1


def test_anchor_choice_on_lookup_chains_deeper_than_the_accuracy_table():
    """A lookup-only chain can be deeper than the checkpoint's accuracy table (a crash at batch 4
    in the benchmark): its nodes have no pseudo-row probability, so the root ends the path."""
    from vllm_ht.tree import end_probabilities, likely_end_nodes

    chain = hybrid.lookup_only([5, 6, 7, 8, 9, 10]).tree
    acc = [[0.5, 0.1], [0.4, 0.1], [0.3, 0.1]]
    assert end_probabilities(chain, acc).tolist() == [1.0, 0, 0, 0, 0, 0, 0]
    assert likely_end_nodes(chain, acc, 2)[0] == 0
