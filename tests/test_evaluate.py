import pytest
import torch

from vllm_ht.training.evaluate import MAX_RANK, DraftEval


def test_path_frequencies_templates_and_tau_by_hand():
    # 4 anchors, k=2: rank tuples (0,0) (0,1) (1,0) (miss, -)
    ev = DraftEval(torch.tensor([[0, 0], [0, 1], [1, 0], [MAX_RANK, 3]]))
    assert ev.freq == {(0,): 0.5, (0, 0): 0.25, (0, 1): 0.25, (1,): 0.25, (1, 0): 0.25}
    assert ev.topr(1, 1) == 0.5 and ev.topr(1, 2) == 0.75 and ev.topr(2, 1) == 2 / 4
    assert ev.best_template(1) == [(0,)]
    assert ev.expected_tau([(0,), (0, 0)]) == 1.75
    assert ev.expected_tau(ev.best_template(5)) == 2.5     # every observed path
    table = ev.conditional_accuracy()
    assert table[0][:2] == [0.5, 0.25]
    assert table[1][:2] == [round(2 / 3, 4), round(1 / 3, 4)]  # given depth 1 in reach (3 anchors)


def test_anchor_without_target_is_ignored():
    ev = DraftEval(torch.tensor([[0, -1], [-1, -1]]))
    assert ev.topr(1, 1) == 1.0 and ev.topr(2, 1) == 0.0


def test_decoded_tau_replays_greedy_decoding():
    # one sequence of 5 anchors; template {(0,), (0,0)}
    ev = DraftEval(torch.tensor([[0, 0], [5, 5], [5, 5], [0, 3], [5, 5]]), seq_lens=[5])
    # anchor 0 accepts 2 (emits 3) -> anchor 3 accepts 1 (emits 2) -> done: 5 tokens / 2 steps
    assert ev.decoded_tau([(0,), (0, 0)]) == 2.5
    assert ev.expected_tau([(0,), (0, 0)]) == pytest.approx(1 + 2 / 5 + 1 / 5)   # every position alike


def test_head_keeps_the_first_anchors_of_every_sequence():
    ev = DraftEval(torch.tensor([[0, 0], [5, 5], [0, 3], [1, 0], [MAX_RANK, 0]]), seq_lens=[3, 2])
    head = ev.head(2)
    assert head.ranks.tolist() == [[0, 0], [5, 5], [1, 0], [MAX_RANK, 0]]
    assert head.seq_lens == [2, 2]
    assert head.topr(1, 1) == 0.25
    # replay: seq 1 accepts (0, 0) at anchor 0, seq 2 accepts (1,); each step's tokens are capped at
    # the 2 that remain before the cut
    assert head.decoded_tau([(0,), (0, 0), (1,)]) == (2 + 2) / 2
    assert ev.decoded_tau([(0,), (0, 0), (1,)]) == (3 + 2) / 2      # uncut: 3 tokens fit in seq 1
