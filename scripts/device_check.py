"""Device check: the project's GPU-facing parts on a CUDA machine that has only torch and triton.

    python scripts/device_check.py [--out DIR] [--stages 0,1,2,3,4] [--dry-run] [--budget-s N]

Needs torch, triton and this repository's files, nothing else: no vLLM, no transformers, no numpy
(it imports only `vllm_ht.kernels`, `vllm_ht.tree`, `vllm_ht.policy` and `vllm_ht.vllm.step`, none
of which import vLLM; tests/test_device_check.py runs it with vLLM and transformers blocked).
Stages (each in its own module beside this one):
  0 environment   versions, device, SM count, memory, device-to-device copy bandwidth
  1 correctness   Triton kernels vs torch references (device_kernels.py)
  2 graph         the kernels captured in a CUDA graph, inputs changed in place (device_graph.py)
  3 roofline      tree attention GB/s vs copy bandwidth, and torch SDPA (device_roofline.py)
  4 step_costs    a random-weight Llama (1B, 8B shapes): plain and tree steps, eager and graph,
                  fitted to the policy's StepCost (device_steps.py, device_llama.py)
Output: DIR/device_check.json, rewritten after every stage (and every few cases inside one), so
a run cut short still leaves what it measured; at the end a readable report, printed and written
to DIR/device_check.txt. Each stage gets a share of --budget-s (default 420 s, about 7 minutes on
an H200) and stops starting new work when it is used up ("truncated": true, with what it skipped).
A stage that raises is recorded as failed with its traceback, and the next stage runs.
--dry-run: every stage on the CPU at tiny shapes, Triton in its interpreter (TRITON_INTERPRET=1
set here before anything imports triton); CUDA graphs are skipped (the in-place rounds run
eagerly) and bandwidth is a host copy. Under a minute on two cores.
Exit code: 0 when every stage ran and every check passed; 1 when a check failed or a stage
raised; 2 without CUDA and without --dry-run.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import platform
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("environment", "correctness", "graph", "roofline", "step_costs")
SHARES = {"environment": 0.04, "correctness": 0.22, "graph": 0.08, "roofline": 0.22, "step_costs": 0.44}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="device_check_results", help="folder for device_check.json / .txt")
    p.add_argument("--stages", default="0,1,2,3,4", help="comma-separated stage numbers")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreter")
    p.add_argument("--budget-s", type=float, default=None, help="time budget (default 420, dry run 120)")
    args = p.parse_args(argv)
    args.stages = sorted({int(s) for s in args.stages.split(",") if s.strip()})
    if not args.stages or not set(args.stages) <= set(range(len(STAGES))):
        p.error(f"--stages takes numbers 0..{len(STAGES) - 1}")
    args.budget_s = args.budget_s or (120.0 if args.dry_run else 420.0)
    return args


def environment(ctx) -> None:
    """Stage 0. copy_gbps counts bytes read plus bytes written per second (a copy does both)."""
    import torch
    import triton
    from device_common import copy_gbps

    r = ctx.record
    r.update(python=platform.python_version(), torch=torch.__version__, triton=triton.__version__,
             cuda_runtime=torch.version.cuda, triton_interpret=os.environ.get("TRITON_INTERPRET", ""),
             cpu_count=os.cpu_count(), platform=platform.platform())
    if ctx.cuda:
        props = torch.cuda.get_device_properties(ctx.device)
        free, total = torch.cuda.mem_get_info(ctx.device)
        r.update(device_name=props.name, sm_count=props.multi_processor_count,
                 capability=f"{props.major}.{props.minor}", memory_gib=round(total / 2**30, 1),
                 free_gib=round(free / 2**30, 1))
    else:
        r.update(device_name="cpu (dry run)", sm_count=None)
    r.update(copy_gbps(ctx.device))


def stage_function(name: str):
    """The stage's `run(ctx)`, its module imported only now (an import error fails that stage alone)."""
    if name == "environment":
        return environment
    module = {"correctness": "device_kernels", "graph": "device_graph", "roofline": "device_roofline",
              "step_costs": "device_steps"}[name]
    return importlib.import_module(module).run


def jsonable(x):
    """Non-finite floats as strings (strict JSON has no NaN / Infinity)."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x


def save(results: dict, out: Path) -> None:
    tmp = out / "device_check.json.tmp"
    tmp.write_text(json.dumps(jsonable(results), indent=1, default=str))
    os.replace(tmp, out / "device_check.json")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"      # before anything imports triton
    sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]
    import torch
    from device_common import StageContext
    from device_report import report

    if args.dry_run:
        torch.set_num_threads(1)       # small CPU ops: threads only spin against each other
    if not args.dry_run and not torch.cuda.is_available():
        print("device_check: no CUDA device; run with --dry-run for the CPU rehearsal", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [STAGES[i] for i in args.stages]
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")   # noqa: UP017 (datetime.UTC: 3.11+)
    results = {"tool": "scripts/device_check.py", "started": started,
               "dry_run": args.dry_run, "device": str(device), "budget_s": args.budget_s,
               "stages": {name: {"stage": STAGES.index(name), "status": "pending"} for name in names}}
    t0, done = time.monotonic(), 0.0
    total_share = sum(SHARES[n] for n in names)
    for name in names:
        share = args.budget_s * SHARES[name] / total_share
        done += share
        record = results["stages"][name]
        ctx = StageContext(device=device, dry_run=args.dry_run, record=record, results=results,
                           deadline=max(t0 + done, time.monotonic() + 0.3 * share), save=lambda: save(results, out))
        record["status"] = "running"
        save(results, out)
        start = time.monotonic()
        try:
            stage_function(name)(ctx)
            record["status"] = "ok"
        except Exception as e:  # noqa: BLE001  (a stage's failure is a result: record it, go on)
            record.update(status="failed", error=repr(e)[:500], traceback=traceback.format_exc()[-3000:])
            if device.type == "cuda":
                with contextlib.suppress(RuntimeError):   # a sticky CUDA error fails this too
                    torch.cuda.empty_cache()               # after an out-of-memory error, for the next stage
        record["seconds"] = round(time.monotonic() - start, 2)
        save(results, out)
    failed_checks = sum(r.get("checks_failed", 0) for r in results["stages"].values())
    failed_stages = [n for n, r in results["stages"].items() if r["status"] != "ok"]
    results.update(seconds=round(time.monotonic() - t0, 1), checks_failed=failed_checks, stages_failed=failed_stages,
                   exit_code=1 if failed_checks or failed_stages else 0)
    save(results, out)
    text = report(results)
    (out / "device_check.txt").write_text(text)
    print(text)
    return results["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
