"""benchmarks/served_steps.py without an engine: the prediction a calibration makes for a served
step, and the summary that sets it against the measured steps (and fits costs to them)."""
import pytest

from benchmarks.served_steps import predicted_cost, summarize

COST = {"row": 0.08, "pseudo_row": 0.06, "fixed": 0.3, "context": 0.5, "batch_row": 0.07}


def test_a_step_without_rows_is_a_plain_step_and_rows_add_their_costs():
    assert predicted_cost(COST, 0, 0) == 1.0                       # no fixed cost without drafting
    assert predicted_cost(COST, 4, 3) == pytest.approx(1 + 0.3 + 0.32 + 0.18)
    assert predicted_cost(COST, 4, 3, context=1000) == pytest.approx(1 + 0.3 + 0.32 + 0.18 + 0.5)


def _steps(cost, mixes, p1=80.0):
    return [{"period": p1 * predicted_cost(cost, d, p), "drafts": d, "pseudo": p} for d, p in mixes]


def test_summary_recovers_the_costs_of_the_served_steps_and_flags_a_cheap_calibration():
    plain = [{"period": p, "drafts": 0, "pseudo": 0} for p in (79.0, 80.0, 81.0)]
    mixes = [(3, 9), (3, 9), (7, 9), (2, 3), (5, 6), (0, 0)]
    summary = summarize(plain, _steps(COST, mixes), COST)
    assert summary["plain_ms"] == 80.0 and summary["steps"] == 6
    assert summary["measured"] == pytest.approx(summary["predicted"])
    fitted = summary["served_fit"]
    for name in ("fixed", "row", "pseudo_row"):
        assert fitted[name] == pytest.approx(COST[name], abs=1e-9), name
    assert {(g["drafts"], g["pseudo"]): g["steps"] for g in summary["groups"]}[(3, 9)] == 2
    # a calibration that priced pseudo rows and the fixed cost at 0 predicts far less than was served
    cheap = {**COST, "pseudo_row": 0.0, "fixed": 0.0}
    assert summarize(plain, _steps(COST, mixes), cheap)["predicted"] < summary["measured"] - 0.5
