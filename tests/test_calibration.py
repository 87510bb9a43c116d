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


def test_a_cell_priced_against_its_own_plain_cell_ignores_drift():
    """The machine got 20% faster after the plain sweep: cells priced against the sweep read a
    cheaper HT step (here fixed and pseudo_row fall), cells priced against the plain cell measured
    right before them recover the true costs."""
    plain, ht = synthetic(TRUE)
    drifted = [{**m, "ms": 0.8 * m["ms"], "plain_ms": 0.8 * plain[m["batch"]]} for m in ht]
    fitted = fit_costs(plain, drifted)
    for name in ("row", "pseudo_row", "fixed", "context"):
        assert getattr(fitted, name) == pytest.approx(getattr(TRUE, name), abs=1e-6), name
    unpaired = fit_costs(plain, [{k: v for k, v in m.items() if k != "plain_ms"} for m in drifted])
    assert unpaired.fixed < TRUE.fixed - 0.1


def test_calibration_cells_vary_pseudo_rows_apart_from_draft_rows():
    """At batch 1 the cell design runs each of at least three tree sizes with few and with many
    anchors (>= 3x as many, so >= 3x the pseudo rows at the same draft rows), and every HT cell
    follows a plain cell of its own batch size and context, so the fit can price both kinds of row
    and the drift between cells."""
    from vllm_ht.tools.calibrate import HT_TREES_AT_1, cell_plan

    by_tree = {}
    for drafts, anchors in HT_TREES_AT_1:
        by_tree.setdefault(drafts, []).append(anchors)
    ratios = [max(a) / min(a) for a in by_tree.values() if len(a) > 1]
    assert len(ratios) >= 3 and min(ratios) >= 3
    jobs = cell_plan([1, 2, 4], 128, 1024)
    for i, (kind, b, ctx, n, a, priced) in enumerate(jobs):
        if kind == "ht":
            assert priced and jobs[i - 1][:3] == ("plain", b, ctx), jobs[i - 1]
        elif priced:                    # the plain sweep: batch B against batch 1 just before
            assert b > 1 and jobs[i - 1][:3] == ("plain", 1, 128)
    assert sorted(b for k, b, _, _, _, priced in jobs if k == "plain" and priced) == [2, 4]
    assert {(b, ctx) for k, b, ctx, *_ in jobs if k == "ht"} >= {(1, 128), (2, 128), (4, 128), (1, 1024)}


def test_the_fit_from_cells_and_the_policy_check():
    """`fit` reads the cells as `calibrate` records them: the unit is the median of the batch-1
    plain cells (one of them an outlier here), batch rows come from the sweep's adjacent pairs, each
    HT cell is priced against its own plain cell (the machine's speed differs per cell) and pays
    the fixed cost on its share of steps with rows. `check_policy` sets the first fit in the engine
    before running the served plan, prices that plan (a lookup cell where 60% of steps drafted)
    with it, and refits with the cell."""
    from vllm_ht.tools.calibrate import check_policy, fit

    truth = StepCost(row=0.08, pseudo_row=0.05, fixed=0.2, context=0.5, batch_row=0.05)

    def plain(b, ctx, speed=1.0):
        return {"kind": "plain", "num_nodes": 0, "pseudo_nodes": None, "batch": b, "context": ctx,
                "ms": speed * P1 * (1 + truth.plain_row * (b - 1)), "drafts": 0.0, "pseudo": 0.0}

    def ht(b, ctx, drafts, pseudo, speed=1.0, share=1.0, kind="ht"):
        base = plain(b, ctx, speed)["ms"]
        extra = share * truth.fixed + b * (truth.row * drafts + truth.pseudo_row * pseudo
                                           + share * truth.context * ctx / 1000)
        return {"kind": kind, "num_nodes": drafts, "pseudo_nodes": 1, "batch": b, "context": ctx, "drafts": drafts,
                "pseudo": pseudo, "ht_share": share, "ms": base + speed * P1 * extra, "plain_ms": base}

    cells = [plain(1, 128), {**plain(2, 128), "plain_ms": P1}, plain(1, 128, 1.1),
             {**plain(4, 128, 1.1), "plain_ms": 1.1 * P1}, plain(1, 128)]
    cells += [ht(1, 128, 1, 3), ht(1, 128, 2, 9, 0.9), ht(1, 128, 8, 6, share=0.7), ht(1, 128, 8, 27, 1.2),
              ht(2, 128, 2, 3, 1.1), ht(1, 1024, 3, 6)]
    fitted = fit(cells, 128)
    for name in ("row", "pseudo_row", "fixed", "context", "plain_row"):
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), abs=1e-6), name

    events = []
    served = ht(1, 128, 2.4, 0.0, speed=0.95, share=0.6, kind="policy")
    check = check_policy(cells, 128, lambda costs: events.append(("cost", costs)),
                         lambda: events.append("plain") or plain(1, 128, 0.95), lambda: events.append("policy") or served)
    assert [e if isinstance(e, str) else e[0] for e in events] == ["cost", "plain", "policy", "cost"]
    assert events[0][1] == check["first_fit"] and events[-1][1] == check["refit"]
    assert check["drafting"] and check["predicted"] == pytest.approx(check["measured"], abs=1e-6)
    assert check["measured"] == pytest.approx(served["ms"] / (0.95 * P1))
    assert cells[-1]["kind"] == "policy" and check["refit"]["fixed"] == pytest.approx(truth.fixed)
    # a plan without drafts ran plain steps: reported, not fit (its ratio would pull `fixed` down)
    count = len(cells)
    idle = {**plain(1, 128), "kind": "policy", "ht_share": 0.0}
    check = check_policy(cells, 128, lambda costs: None, lambda: plain(1, 128), lambda: idle)
    assert not check["drafting"] and check["predicted"] == check["measured"] == 1.0
    assert len(cells) == count and check["refit"]["fixed"] == pytest.approx(truth.fixed)


def test_summarize_means_rows_and_the_share_of_steps_with_rows():
    from vllm_ht.tools.calibrate import summarize

    recs = [{"period": 100.0, "drafts": 4, "pseudo": 6}, {"period": 90.0, "drafts": 0, "pseudo": 3},
            {"period": 70.0, "drafts": 0, "pseudo": 0}, {"period": 100.0, "drafts": 4, "pseudo": 6}]
    cell = summarize(recs, 2, 128)
    assert cell["ms"] == 90.0 and cell["ht_share"] == 0.75 and cell["steps"] == 4
    assert cell["drafts"] == 1.0 and cell["pseudo"] == pytest.approx(15 / 8)        # per request (batch 2)


def test_an_older_calibration_file_is_not_current(tmp_path):
    from vllm_ht.calibration import is_current

    path = tmp_path / "c.json"
    assert not is_current(path)
    save(path, TRUE, {}, {})
    assert is_current(path)
    path.write_text('{"costs": {"row": 0.1, "pseudo_row": 0.0, "fixed": 0.0, "context": 0.0, "batch_row": 0.05}}')
    assert not is_current(path) and load_costs(path) is not None
    path.write_text('{"version": "2", "costs": {}}')                  # malformed: not current, no crash
    assert not is_current(path)
