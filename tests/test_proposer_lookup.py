"""When the drafter gives a request a prompt-lookup chain, and how long (HTProposer.lookup_room /
lookup_length), without an engine: the pseudo tree's plan, the options and the row budget decide
the room; the cost model decides the length within it, chains alone included."""
from types import SimpleNamespace

import pytest

from vllm_ht.options import HTOptions
from vllm_ht.policy import DraftPlan, LookupStats, StepCost, no_drafts
from vllm_ht.tree import TokenTree
from vllm_ht.vllm.proposer import HTProposer

COST = StepCost(row=0.085, pseudo_row=0.06, fixed=0.35, context=0.0, batch_row=0.075)


def drafter(**options) -> HTProposer:
    d = object.__new__(HTProposer)            # no vLLM config: only what the lookup decisions read
    d.options, d.cost, d.refusal = HTOptions(**options), COST, None
    d.lookup, d.lookup_stats = SimpleNamespace(), LookupStats()
    return d


def copying(stats: LookupStats, steps: int = 40) -> LookupStats:
    """A text the matcher keeps finding, and chains followed 4 nodes deep."""
    for _ in range(steps):
        stats.record_match(True)
        stats.record(8, 4)
    return stats


def missing(stats: LookupStats, steps: int = 40) -> LookupStats:
    for _ in range(steps):
        stats.record_match(False)
    return stats


def tree_plan(nodes: int = 3) -> DraftPlan:
    tree = TokenTree.from_paths([[0] * d for d in range(1, nodes + 1)])
    return DraftPlan(tree=tree, anchors=(0,), speedup=1.1, tokens_per_step=1.5)


def test_a_chain_alone_where_the_pseudo_tree_does_not_pay_if_the_text_is_copied():
    d = drafter()
    copying(d.lookup_stats)
    assert d.lookup_room(no_drafts(), 1) == 8
    assert d.lookup_length(no_drafts(), 1) > 0
    assert d.lookup_room(no_drafts(), 4) > 0 and d.lookup_length(no_drafts(), 4) == 0   # measured losses there
    assert d.lookup_length(tree_plan(1), 4) > 0                                        # beside a tree: priced
    d = drafter()
    missing(d.lookup_stats)
    assert d.lookup_room(no_drafts(), 1) == 8          # the matcher still runs (room), ...
    assert d.lookup_length(no_drafts(), 1) == 0        # ... but a chain would not pay


def test_the_room_follows_the_options_the_budget_and_a_refusal():
    plan = tree_plan(3)
    assert drafter().lookup_room(plan, 1) == 8                      # 31 nodes less the tree's 3, capped at 8
    assert drafter(num_nodes=0).lookup_room(no_drafts(), 1) == 0    # --ht-num-nodes 0: no drafts of any kind
    assert drafter(lookup_nodes=0).lookup_room(plan, 1) == 0
    assert drafter(lookup_nodes=3).lookup_length(plan, 1) == 3      # fixed length, no cost model
    # pseudo rows off with a fixed tree size: chains alone, as before
    assert drafter(pseudo=False, num_nodes=8).lookup_room(no_drafts(), 1) == 8
    assert drafter().lookup_room(plan, 16) == 0                     # 32 rows / 16 requests: 1 node each, the tree has 3
    d = drafter()
    d.refusal = "self-check failed"
    assert d.lookup_room(plan, 1) == 0
    d = drafter()
    d.lookup = None                                                 # lookup off in the options
    assert d.lookup_room(plan, 1) == 0


@pytest.mark.parametrize("options,batch", [({}, 1), ({"pseudo": False}, 1), ({"pseudo": False}, 4)])
def test_a_chain_alone_pays_the_fixed_step_cost(options, batch):
    """Where a chain alone is priced (batch 1; any batch with pseudo rows off, chains then being the
    only source), it pays at the calibrated fixed step cost and not at a high one; beside a tree
    (which pays that cost already) the same chain still does."""
    d = drafter(**options)
    copying(d.lookup_stats)
    assert d.lookup_length(no_drafts(), batch) > 0
    d.cost = StepCost(row=0.085, pseudo_row=0.06, fixed=5.0, context=0.0, batch_row=0.075)
    assert d.lookup_length(no_drafts(), batch) == 0
    assert d.lookup_length(tree_plan(1), batch) > 0
