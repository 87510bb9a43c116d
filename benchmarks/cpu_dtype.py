"""Does this CPU multiply bf16 natively? What an extra row of a step costs in bf16 and in fp32.

    python benchmarks/cpu_dtype.py --json benchmarks/results/cpu_dtype.json

Two parts, both against fp32 in the same run:
- matmul: torch's linear layer at the default model's shapes ([n, 576] x [576, 1536], the MLP's
  up projection), n = 1..32 rows, both dtypes, on every core; median of repeats. A CPU with native
  bf16 (AVX512-BF16, AMX-BF16, Arm BF16) keeps bf16 near fp32 or below it; one without converts, and
  the bf16 time grows with every row.
- engine: the step costs `vllm-ht calibrate` measured in vLLM for both dtypes, when both files
  exist (`vllm-ht calibrate --dtype bfloat16` and `--dtype float32`): plain step ms per batch size
  and the fitted cost of one draft row, in plain steps.
The detected dtype (vllm_ht/cpu_features.py) is printed with them.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
ROWS = (1, 2, 4, 8, 16, 32)


def time_linear(dtype, rows: int, repeats: int, calls: int) -> float:
    """Median microseconds of one [rows, 576] x [576, 1536] linear in `dtype`."""
    import torch

    w = torch.randn(1536, 576).to(dtype)
    x = torch.randn(rows, 576).to(dtype)
    for _ in range(calls):
        torch.nn.functional.linear(x, w)
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            torch.nn.functional.linear(x, w)
        samples.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(samples)


def engine_costs(model: str) -> dict:
    """Per dtype: plain ms per batch size and the fitted costs, from the calibration files."""
    from vllm_ht.calibration import calibration_path

    out = {}
    for dtype in ("bfloat16", "float32"):
        path = calibration_path(model, dtype)
        if path.exists():
            body = json.loads(path.read_text())
            short = min(m["context"] for m in body["measurements"])
            # version 2 files hold many plain cells per batch size (one before each HT cell): the
            # median of the batch-1 cells and of the plain sweep's (those priced against batch 1)
            cells = {}
            for m in body["measurements"]:
                if m["kind"] == "plain" and m["context"] == short and (m["batch"] == 1 or "plain_ms" in m
                                                                       or body.get("version", 1) < 2):
                    cells.setdefault(m["batch"], []).append(m["ms"])
            plain = {b: round(statistics.median(v), 1) for b, v in sorted(cells.items())}
            out[dtype] = {"file": str(path), "plain_ms": plain, "costs": body["costs"]}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="SmolLM2-135M-Instruct", help="model whose calibration files to read")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()

    import torch

    from vllm_ht.calibration import _cpu_name
    from vllm_ht.cpu_features import native_bf16, serving_dtype

    print(f"cpu: native bf16 = {native_bf16()}, serving dtype = {serving_dtype()}, torch ISA = "
          f"{torch.backends.cpu.get_cpu_capability()}, threads = {torch.get_num_threads()}")
    matmul = []
    print("| rows | fp32 us | bf16 us | bf16 / fp32 |\n|---|---|---|---|")
    for n in ROWS:
        f32 = time_linear(torch.float32, n, args.repeats, args.calls)
        b16 = time_linear(torch.bfloat16, n, args.repeats, args.calls)
        matmul.append({"rows": n, "fp32_us": round(f32, 1), "bf16_us": round(b16, 1), "ratio": round(b16 / f32, 2)})
        print(f"| {n} | {f32:.1f} | {b16:.1f} | {b16 / f32:.2f} |")
    engine = engine_costs(args.model)
    for dtype, e in engine.items():
        c = e["costs"]
        print(f"engine {dtype}: plain ms by batch {e['plain_ms']}; per draft row {c['row']:.3f}, per pseudo row "
              f"{c['pseudo_row']:.3f}, per HT step {c['fixed']:.3f}, per extra request {c['batch_row']:.3f} plain steps")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "native_bf16": native_bf16(), "serving_dtype": serving_dtype(),
            "torch_isa": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "processor": _cpu_name(), "matmul": matmul, "engine": engine}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
