"""benchmarks/throughput.py end to end on a tiny workload: real engines (plain, its A/A control and
HT, fp32, eager, 2 rounds), the JSON rows, per-round cells and metadata, the table and the PNG."""
import json
import statistics
import subprocess
import sys

import pytest
from e2e_helpers import REPO, trained_checkpoint

AA = "plain-A/A"


@pytest.mark.timeout(1800)  # six engines: (plain, A/A, HT) x 2 rounds
def test_throughput_benchmark_writes_rows_rounds_table_and_plot(model_dir, tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--model", str(model_dir),
           "--checkpoint", str(trained_checkpoint()), "--methods", "plain,ht", "--batch-sizes", "1,2",
           "--num-prompts", "4", "--max-tokens", "12", "--ignore-eos", "--dtype", "float32", "--enforce-eager",
           "--ht-num-nodes", "4", "--rounds", "2", "--single-process", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1700, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for key in ("hardware", "vllm_version", "dtype", "git_commit", "verdict_rule"):
        assert result[key], key
    assert result["rounds"] and len(result["rounds"]) == 2
    rows = {(r["method"], r["batch_size"]): r for r in result["rows"]}
    assert set(rows) == {(m, b) for m in ("plain", AA, "ht") for b in (1, 2)}
    for r in rows.values():
        assert r["output_tokens"] == 4 * 12 and r["output_tokens_per_s"] > 0
        assert r["ttft_ms"] > 0 and r["tpot_ms"] > 0
    # rotated order, and every ratio is against plain of the same round
    assert [rnd["order"] for rnd in result["rounds"]] == [["plain", AA, "ht"], [AA, "ht", "plain"]]
    check_rows_against_cells(result)
    assert (tmp_path / "bench.png").stat().st_size > 10_000
    assert "measured 48 output tokens" in proc.stderr      # 4 x 12 < 300: the short-window warning
    for word in ("speedup", "A/A band", "verdict", AA, "ht"):
        assert word in proc.stdout, word


def check_rows_against_cells(result: dict) -> None:
    """A benchmark JSON's rows against its own per-round cells: each cell's tokens/s is its tokens over
    its seconds and its speedup the ratio to plain's cell of that round; a row's tokens/s is the median
    of its cells', its ratios are its cells', its A/A band is the A/A rows' ratios (with 1); plain and
    the A/A control never draft; every other engine's outputs equal plain's (fp32), and HT drafts."""
    rows = {(r["method"], r["batch_size"]): r for r in result["rows"]}
    cells: dict[tuple, list[dict]] = {}
    for rnd in result["rounds"]:
        tps = {(c["method"], c["batch_size"]): c["output_tokens_per_s"] for c in rnd["cells"]}
        assert len(tps) == len(rows) and all(c["round"] == rnd["round"] for c in rnd["cells"])
        for c in rnd["cells"]:
            assert c["output_tokens_per_s"] == pytest.approx(c["output_tokens"] / c["seconds"])
            assert c["speedup"] == pytest.approx(tps[c["method"], c["batch_size"]] / tps["plain", c["batch_size"]])
            cells.setdefault((c["method"], c["batch_size"]), []).append(c)
    for (method, bs), r in rows.items():
        mine = cells[method, bs]
        assert r["rounds"] == len(result["rounds"]) == len(mine)
        assert r["output_tokens_per_s"] == pytest.approx(statistics.median(c["output_tokens_per_s"] for c in mine))
        assert r["speedup_per_round"] == pytest.approx([c["speedup"] for c in mine])
        assert r["speedup"] == pytest.approx(statistics.median(r["speedup_per_round"]))
        aa = [c["speedup"] for c in cells[AA, bs]]
        assert (r["aa_low"], r["aa_high"]) == pytest.approx((min(1.0, *aa), max(1.0, *aa)))
        tokens, accepted = sum(c["output_tokens"] for c in mine), sum(c["num_accepted"] for c in mine)
        assert r["tokens_per_step"] == pytest.approx(tokens / (tokens - accepted))   # every step, drafting or not
        if method in ("plain", AA):
            assert r["num_drafts"] == 0 and r["mean_accepted_length"] is None, (method, bs)
            assert r["tokens_per_step"] == 1.0
            assert r["verdict"] == ("baseline" if method == "plain" else "control")
        if method != "plain":
            assert r["identical_to_plain"] == 1.0 and all(c["identical_to_plain"] == 1.0 for c in mine), (method, bs)
        if method == "ht":
            assert r["num_drafts"] > 0 and r["mean_accepted_length"] > 1.0 and r["acceptance_per_depth"]
            assert r["tokens_per_step"] > 1.0
            assert r["verdict"] in ("faster", "slower", "within noise")
