"""benchmarks/throughput.py end to end on a tiny workload: real engines (plain, its A/A control and
HT, fp32, eager, 2 rounds), the JSON rows, per-round cells and metadata, the table and the PNG."""
import json
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
           "--ht-num-nodes", "4", "--rounds", "2", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1700, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for key in ("hardware", "vllm_version", "dtype", "git_commit", "verdict_rule"):
        assert result[key], key
    assert result["rounds"] and len(result["rounds"]) == 2
    rows = {(r["method"], r["batch_size"]): r for r in result["rows"]}
    assert set(rows) == {(m, b) for m in ("plain", AA, "ht") for b in (1, 2)}
    for (method, _), r in rows.items():
        assert r["output_tokens"] == 4 * 12 and r["output_tokens_per_s"] > 0
        assert r["identical_to_plain"] == 1.0             # fp32: HT and the control are lossless
        assert r["ttft_ms"] > 0 and r["tpot_ms"] > 0
        assert r["rounds"] == 2 and r["speedup"] == pytest.approx(sum(r["speedup_per_round"]) / 2)
        assert r["aa_low"] <= 1.0 <= r["aa_high"]
        if method == "plain":
            assert r["speedup_per_round"] == [1.0, 1.0] and r["verdict"] == "baseline"
        elif method == AA:
            assert r["mean_accepted_length"] is None and r["verdict"] == "control"
        else:
            assert r["mean_accepted_length"] > 1.0 and r["acceptance_per_depth"]
            assert r["verdict"] in ("faster", "slower", "within noise")
    # rotated order, and every ratio is against plain of the same round
    assert [rnd["order"] for rnd in result["rounds"]] == [["plain", AA, "ht"], [AA, "ht", "plain"]]
    for rnd in result["rounds"]:
        tps = {(c["method"], c["batch_size"]): c["output_tokens_per_s"] for c in rnd["cells"]}
        assert len(tps) == 6 and all(c["round"] == rnd["round"] for c in rnd["cells"])
        for c in rnd["cells"]:
            assert c["speedup"] == pytest.approx(tps[c["method"], c["batch_size"]] / tps["plain", c["batch_size"]])
    assert (tmp_path / "bench.png").stat().st_size > 10_000
    assert "measured 48 output tokens" in proc.stderr      # 4 x 12 < 300: the short-window warning
    for word in ("speedup", "A/A band", "verdict", AA, "ht"):
        assert word in proc.stdout, word
