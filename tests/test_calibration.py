"""Step-cost calibration without an engine: the fit recovers known costs, refuses too little data,
never goes negative, and the file round-trips into the policy's StepCost (explicit options win)."""
import pytest

from vllm_ht.calibration import additional_config, calibration_path, fit_costs, load_costs, save
from vllm_ht.options import HTOptions
from vllm_ht.policy import StepCost

P1 = 20.0
TRUE = StepCost(row=0.05, pseudo_row=0.02, fixed=0.25, context=0.1, batch_row=0.04)


def synthetic(cost: StepCost):
    plain = {b: P1 * (1 + cost.plain_row * (b - 1)) for b in (1, 2, 4, 8)}
    cells = [(1, 1, 1, 128), (1, 3, 4, 128), (1, 6, 9, 128), (2, 2, 2, 128), (4, 2, 2, 128), (1, 3, 4, 1024)]
    ht = []
    for b, drafts, pseudo, ctx in cells:
        extra = cost.fixed + b * (cost.row * drafts + cost.pseudo_row * pseudo + cost.context * ctx / 1000)
        ht.append({"batch": b, "drafts": drafts, "pseudo": pseudo, "context": ctx, "ms": plain[b] + P1 * extra})
    return plain, ht


def test_fit_recovers_the_costs_that_made_the_timings():
    fitted = fit_costs(*synthetic(TRUE))
    for name in ("row", "pseudo_row", "fixed", "context", "plain_row"):
        assert getattr(fitted, name) == pytest.approx(getattr(TRUE, name), abs=1e-6), name


def test_fit_clips_a_negative_term_and_refits():
    plain, ht = synthetic(StepCost(row=0.05, pseudo_row=0.0, fixed=0.25, context=0.0, batch_row=0.04))
    ht[1]["ms"] -= 0.2 * P1                     # an outlier that pulls the pseudo term below zero
    fitted = fit_costs(plain, ht)
    assert min(fitted.row, fitted.pseudo_row, fitted.fixed, fitted.context) >= 0


def test_fit_needs_batch_one_and_three_ht_cells():
    plain, ht = synthetic(TRUE)
    with pytest.raises(ValueError, match="batch size 1"):
        fit_costs({2: 21.0}, ht)
    with pytest.raises(ValueError, match="at least 3"):
        fit_costs(plain, ht[:2])


def test_file_round_trip_and_explicit_options_win(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_HT_CACHE", str(tmp_path))
    path = calibration_path("/models/SmolLM2-135M-Instruct/", "torch.bfloat16")
    assert path == tmp_path / "calibration" / "SmolLM2-135M-Instruct-bfloat16.json"
    assert load_costs(path) is None                                   # none yet
    save(path, TRUE, {"cells": []}, {"model": "m"})
    costs = load_costs(path)
    assert StepCost(**costs) == TRUE
    merged = HTOptions(step_overhead=0.5).cost_with(costs)
    assert merged.fixed == 0.5 and merged.row == TRUE.row
    assert HTOptions().cost_with(None) == StepCost()                  # no file: the defaults
    path.write_text("{not json")
    assert load_costs(path) is None
    assert '"step_overhead": 0.25' in additional_config(TRUE)
