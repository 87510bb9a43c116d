"""benchmarks/throughput.py end to end on a tiny workload: real engines (plain and HT, fp32, eager),
the JSON rows and metadata the issue asks for, the table and the PNG."""
import json
import subprocess
import sys

from e2e_helpers import REPO, trained_checkpoint


def test_throughput_benchmark_writes_rows_table_and_plot(model_dir, tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--model", str(model_dir),
           "--checkpoint", str(trained_checkpoint()), "--methods", "plain,ht", "--batch-sizes", "1,2",
           "--num-prompts", "4", "--max-tokens", "12", "--ignore-eos", "--dtype", "float32", "--enforce-eager",
           "--ht-num-nodes", "4", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for key in ("hardware", "vllm_version", "dtype", "git_commit"):
        assert result[key], key
    rows = {(r["method"], r["batch_size"]): r for r in result["rows"]}
    assert set(rows) == {("plain", 1), ("plain", 2), ("ht", 1), ("ht", 2)}
    for (method, _), r in rows.items():
        assert r["output_tokens"] == 4 * 12 and r["output_tokens_per_s"] > 0
        assert r["identical_to_plain"] == 1.0             # fp32: HT is lossless
        assert r["ttft_ms"] > 0 and r["tpot_ms"] > 0
        if method == "plain":
            assert r["speedup"] == 1.0 and r["mean_accepted_length"] is None
        else:
            assert r["mean_accepted_length"] > 1.0 and r["acceptance_per_depth"]
    assert (tmp_path / "bench.png").stat().st_size > 10_000
    assert "speedup" in proc.stdout and "ht" in proc.stdout
