"""benchmarks/stats.py without an engine: per-round ratios against the same round's plain, medians,
the A/A band and the verdict, on hand-made engine JSON (the shape vllm_ht.tools.offline writes)."""
from pathlib import Path

import pytest

from benchmarks.stats import (AA, PLAIN, aa_band, aggregate, cycle_labels, median, round_cells, round_order,
                              short_cells, verdict)


def engine(tps: float, batch_sizes=(1,), tokens: int = 400, outputs=None, drafts: int = 0, accepted: int = 0,
           depth=()) -> dict:
    """One engine's JSON: `tokens` output tokens at `tps` tokens/s for every batch size."""
    outputs = outputs if outputs is not None else [[1, 2, 3]] * 4
    run = {"outputs": outputs, "seconds": tokens / tps, "output_tokens": tokens, "num_drafts": drafts,
           "num_accepted": accepted, "mean_accepted_length": 1 + accepted / drafts if drafts else None,
           "acceptance_per_depth": list(depth), "ttft_ms": 10.0, "tpot_ms": 5.0}
    return {"method": "x", "startup_seconds": 60.0, "runs": {str(bs): dict(run) for bs in batch_sizes}}


def rows_for(tps_per_round: list[dict[str, float]]) -> dict[str, object]:
    """Rows keyed by label at batch size 1 from per-round tokens/s of each label."""
    labels = cycle_labels([m for m in tps_per_round[0] if m not in (PLAIN, AA)])
    cells = []
    for r, tps in enumerate(tps_per_round):
        order = round_order(labels, r)
        cells += round_cells(r, order, {label: engine(tps[label]) for label in order}, [1])
    return {row.method: row for row in aggregate(cells, labels)}


def test_cycle_labels_put_the_control_halfway_and_plain_first():
    assert cycle_labels(["plain", "ngram", "ht"]) == ["plain", "ngram", AA, "ht"]
    assert cycle_labels(["ht"]) == ["plain", AA, "ht"]
    assert cycle_labels(["plain"]) == ["plain", AA]


def test_round_order_rotates_so_plain_is_not_always_first():
    labels = ["plain", "ngram", AA, "ht"]
    orders = [round_order(labels, r) for r in range(4)]
    assert orders[1] == ["ngram", AA, "ht", "plain"]
    assert [o.index("plain") for o in orders] == [0, 3, 2, 1]
    assert round_order(labels, 5) == orders[1]   # deterministic, cyclic


def test_median_of_even_count_is_the_mean_of_the_middle_two():
    assert median([4.0, 1.0, 3.0, 2.0]) == 2.5
    assert median([3.0, None, 1.0]) == 2.0
    assert median([]) is None


def test_aa_band_always_contains_one():
    assert aa_band([0.97, 1.05]) == (0.97, 1.05)
    assert aa_band([1.02, 1.06]) == (1.0, 1.06)
    assert aa_band([0.9]) == (0.9, 1.0)
    assert aa_band([]) is None


@pytest.mark.parametrize("ratios, expected", [
    ([1.20, 1.25, 1.30], "faster"),          # every round above the band
    ([1.03, 1.20, 1.25], "within noise"),    # one round inside the A/A band
    ([0.80, 0.85, 0.90], "slower"),
    ([0.80, 0.85, 0.96], "within noise"),
    ([1.04, 1.05], "within noise"),          # a band edge is not "above"
])
def test_verdict_needs_every_round_outside_the_aa_band(ratios, expected):
    assert verdict("ht", ratios, (0.95, 1.04)) == expected


def test_verdict_labels_and_too_few_rounds():
    assert verdict(PLAIN, [1.0, 1.0], (0.9, 1.1)) == "baseline"
    assert verdict(AA, [1.1, 1.1], (0.9, 1.1)) == "control"
    assert verdict("ht", [2.0], (1.0, 1.0)) == "n/a"
    assert verdict("ht", [2.0, 2.0], None) == "n/a"


def test_ratios_are_against_plain_of_the_same_round_never_the_control():
    # round 1's machine is twice as fast; the control is always 1.5x plain (a pathological A/A)
    rows = rows_for([{PLAIN: 10.0, AA: 15.0, "ht": 12.0}, {PLAIN: 20.0, AA: 30.0, "ht": 24.0}])
    assert rows[PLAIN].speedup_per_round == [1.0, 1.0]
    assert rows[AA].speedup_per_round == pytest.approx([1.5, 1.5])
    assert rows["ht"].speedup_per_round == pytest.approx([1.2, 1.2])
    assert rows["ht"].output_tokens_per_s == pytest.approx(18.0)   # median tok/s over rounds
    assert (rows["ht"].aa_low, rows["ht"].aa_high) == pytest.approx((1.0, 1.5))
    assert rows["ht"].verdict == "within noise"                    # 1.2x, but plain-vs-plain gave 1.5x
    assert rows[PLAIN].verdict == "baseline" and rows[AA].verdict == "control"


def test_a_clear_speedup_is_faster_and_a_noisy_one_is_not():
    rounds = [{PLAIN: 10.0, AA: 10.3, "ngram": 10.5, "ht": 13.0},
              {PLAIN: 10.0, AA: 9.8, "ngram": 9.6, "ht": 12.5},
              {PLAIN: 10.0, AA: 10.1, "ngram": 11.5, "ht": 13.5}]
    rows = rows_for(rounds)
    assert rows["ht"].verdict == "faster"
    assert rows["ht"].speedup == pytest.approx(1.3)
    assert (rows["ht"].speedup_min, rows["ht"].speedup_max) == pytest.approx((1.25, 1.35))
    assert rows["ngram"].verdict == "within noise"                 # 0.96..1.15 overlaps 0.98..1.03
    slow = rows_for([{PLAIN: 10.0, AA: 10.2, "ht": 8.0}, {PLAIN: 10.0, AA: 9.9, "ht": 8.5}])
    assert slow["ht"].verdict == "slower"


def test_identical_to_plain_compares_with_the_same_rounds_plain():
    labels = cycle_labels(["ht"])
    cells = []
    for r, tokens in enumerate([[[1, 2], [3, 4]], [[5, 6], [7, 8]]]):   # plain differs between rounds
        ht_outputs = [tokens[0], [9, 9]] if r == 1 else tokens           # round 1: one request differs
        results = {PLAIN: engine(10.0, outputs=tokens), AA: engine(10.0, outputs=tokens),
                   "ht": engine(10.0, outputs=ht_outputs)}
        cells += round_cells(r, round_order(labels, r), results, [1])
    per_round = [c.identical_to_plain for c in cells if c.method == "ht"]
    assert per_round == [1.0, 0.5]
    rows = {row.method: row for row in aggregate(cells, labels)}
    assert rows["ht"].identical_to_plain == 0.5                      # lowest over rounds
    assert rows[AA].identical_to_plain == 1.0


def test_acceptance_is_pooled_over_rounds_weighted_by_drafts():
    labels = cycle_labels(["ht"])
    cells = []
    for r, (drafts, accepted, depth) in enumerate([(10, 10, [0.6, 0.4]), (30, 30, [1.0])]):
        results = {PLAIN: engine(10.0), AA: engine(10.0),
                   "ht": engine(10.0, drafts=drafts, accepted=accepted, depth=depth)}
        cells += round_cells(r, round_order(labels, r), results, [1])
    ht = {row.method: row for row in aggregate(cells, labels)}["ht"]
    assert ht.mean_accepted_length == pytest.approx(2.0)
    assert ht.tokens_per_step == pytest.approx(800 / (800 - 40))     # 400 tokens per round
    assert ht.acceptance_per_depth == pytest.approx([(6 + 30) / 40, 4 / 40])
    assert ht.num_drafts == 40


def test_rows_come_in_label_then_batch_order_with_cells_per_round():
    labels = cycle_labels(["ht"])
    cells = []
    for r in range(3):
        results = {label: engine(10.0 + r, batch_sizes=(1, 4)) for label in labels}
        cells += round_cells(r, round_order(labels, r), results, [4, 1])
    rows = aggregate(cells, labels)
    assert [(row.method, row.batch_size) for row in rows] == [(m, b) for m in labels for b in (1, 4)]
    assert all(row.rounds == 3 and len(row.speedup_per_round) == 3 for row in rows)
    assert {c.position for c in cells if c.method == PLAIN} == {0, 1, 2}


def test_short_cells_flag_pairs_under_300_tokens_in_any_round():
    labels = cycle_labels([])
    cells = round_cells(0, labels, {PLAIN: engine(10.0, tokens=300), AA: engine(10.0, tokens=512)}, [1])
    cells += round_cells(1, labels, {PLAIN: engine(10.0, tokens=400), AA: engine(10.0, tokens=299)}, [1])
    assert short_cells(cells) == [(AA, 1, 299)]


def test_the_control_engine_runs_plain():
    from benchmarks.throughput import engine_command, parse_args

    args = parse_args(["--model", "m", "--methods", "ht", "--checkpoint", "ck"])
    assert args.rounds == 3
    cmd = engine_command(args, AA, Path("out.json"))
    assert cmd[cmd.index("--method") + 1] == "plain" and "--checkpoint" not in cmd
    cmd = engine_command(args, "ht", Path("out.json"))
    assert cmd[cmd.index("--method") + 1] == "ht" and "--checkpoint" in cmd
    assert "--single-process" not in cmd                 # the served layout unless asked
    one = parse_args(["--model", "m", "--methods", "ht", "--single-process"])
    assert all("--single-process" in engine_command(one, label, Path("o.json")) for label in (AA, "ht"))


def test_category_rows_attribute_single_request_chunks_only():
    from benchmarks.categories import category_rows

    def engine(seconds, drafts, accepted):      # two prompts: a (10 tokens) and b (20 tokens); batch 2 mixes them
        chunks = [{"start": 0, "size": 1, "seconds": seconds[0], "output_tokens": 10, "num_drafts": drafts[0],
                   "num_accepted": accepted[0]},
                  {"start": 1, "size": 1, "seconds": seconds[1], "output_tokens": 20, "num_drafts": drafts[1],
                   "num_accepted": accepted[1]}]
        mixed = [{"start": 0, "size": 2, "seconds": 9.0, "output_tokens": 30, "num_drafts": 0, "num_accepted": 0}]
        return {"categories": ["a", "b"], "runs": {"1": {"chunks": chunks}, "2": {"chunks": mixed}}}

    rounds = [{"plain": engine([1.0, 2.0], [0, 0], [0, 0]), "ht": engine([0.5, 2.0], [4, 10], [4, 2])},
              {"plain": engine([1.0, 2.0], [0, 0], [0, 0]), "ht": engine([0.25, 4.0], [4, 10], [4, 2])}]
    rows = {(r["method"], r["category"]): r for r in category_rows(rounds)}
    assert rows[("ht", "a")]["speedup_per_round"] == [2.0, 4.0] and rows[("ht", "a")]["speedup"] == 3.0
    assert rows[("ht", "b")]["speedup_per_round"] == [1.0, 0.5]
    assert rows[("ht", "a")]["mean_accepted_length"] == 2.0            # 1 + 8 / 8
    assert rows[("ht", "b")]["mean_accepted_length"] == 1.2            # 1 + 4 / 20
    assert rows[("plain", "a")]["mean_accepted_length"] is None
    assert rows[("ht", "a")]["tokens_per_step"] == pytest.approx(20 / 12)   # 2 x 10 tokens in 2 x (10 - 4) steps
    assert rows[("plain", "a")]["tokens_per_step"] == 1.0
    assert rows[("ht", "a")]["output_tokens"] == 20                    # the batch-2 chunk is not attributed
