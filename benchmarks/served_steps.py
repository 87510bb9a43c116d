"""Does the calibration price the steps the policy really serves? One HT engine, a prompt set.

    python benchmarks/served_steps.py --prompts benchmarks/prompts_mixed.jsonl --limit 8 \
        --dtype float32 --enforce-eager --json out.json

The engine runs the prompts one at a time (batch 1) twice: with drafting off (plain steps: the HT
model without pseudo rows is the plain model) and under the default policy, as served (lookup
chains on). Every decode step is timed inside the worker (`vllm_ht/vllm/step_timing.py`). Printed:
- per (draft rows, pseudo rows) of a step: how many steps and their median period;
- the policy's steps in plain steps: measured (their mean period over the plain steps' mean)
  against what the engine's calibration predicts for the same rows (`predicted_cost`);
- the step costs fitted to the served steps themselves (least squares on the policy's steps).
Each prompt's steps are collected on their own, so no step period spans the gap to the next
prompt. A calibration whose cells do not cover what the policy serves shows up as measured >
predicted. On a 2-core AVX2 CPU (fp32, eager, 8 mixed prompts) a one-off script of this design,
written before this tool, recorded the policy's steps under a version-1 calibration file; this
tool's summary of those records: measured 2.19 plain steps, predicted 1.51 by that file
(docs/benchmarks.md). The prediction leaves out the context term (step records carry no context
length; at a few hundred tokens it adds under 0.2).

The run uses vLLM's recommended CPU runtime (tcmalloc + Intel OpenMP preloaded), as the
throughput benchmark does.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_CHECKPOINT = REPO / "checkpoints" / "smollm2-135m-instruct"


def predicted_cost(cost: dict, drafts: float, pseudo: float, context: float = 0.0) -> float:
    """One batch-1 step with these rows, in plain steps, under a StepCost's fields (1.0: no rows,
    no fixed cost); the model is the calibration's (`vllm_ht.calibration.step_cost`)."""
    from vllm_ht.calibration import step_cost

    return step_cost(cost, drafts, pseudo, context, share=float(bool(drafts or pseudo)))


def summarize(plain: list[dict], policy: list[dict], cost: dict | None) -> dict:
    """plain / policy: step_timing records of batch-1 decode steps. Per row mix the count and the
    median period; the policy's mean step in plain steps (mean over mean) against the prediction;
    costs fitted to its steps."""
    import numpy as np

    p1 = statistics.mean(r["period"] for r in plain)
    groups = defaultdict(list)
    for r in policy:
        groups[(r["drafts"], r.get("pseudo", 0))].append(r["period"])
    out = {"plain_ms": p1, "steps": len(policy),
           "groups": [{"drafts": d, "pseudo": p, "steps": len(v), "median_ms": statistics.median(v)}
                      for (d, p), v in sorted(groups.items())],
           "measured": statistics.mean(r["period"] for r in policy) / p1,
           "drafts": statistics.mean(r["drafts"] for r in policy),
           "pseudo": statistics.mean(r.get("pseudo", 0) for r in policy)}
    if cost is not None:
        out["predicted"] = statistics.mean(predicted_cost(cost, r["drafts"], r.get("pseudo", 0)) for r in policy)
    drafting = [r for r in policy if r["drafts"] or r.get("pseudo", 0)]
    if len({(r["drafts"], r.get("pseudo", 0)) for r in drafting}) >= 3:
        a = np.array([[1.0, r["drafts"], r.get("pseudo", 0)] for r in drafting])
        y = np.array([r["period"] / p1 - 1 for r in drafting])
        fixed, row, pseudo = np.linalg.lstsq(a, y, rcond=None)[0]
        out["served_fit"] = {"fixed": float(fixed), "row": float(row), "pseudo_row": float(pseudo)}
    return out


def engine_main(args) -> None:
    from vllm import LLM, SamplingParams

    from vllm_ht.prompts import load_prompts
    from vllm_ht.vllm import step_timing
    from vllm_ht.vllm.engine_args import ht_engine_kwargs

    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=2048, seed=0, enforce_eager=args.enforce_eager,
              **ht_engine_kwargs(args.model, checkpoint=args.checkpoint, num_nodes=None))
    llm.collective_rpc(step_timing.install)
    conversations = [[{"role": "user", "content": p}] for p in load_prompts(args.prompts, args.limit)]
    llm.chat(conversations[:1], SamplingParams(max_tokens=4), use_tqdm=False)         # warm-up
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    records = {}
    for label, plan in (("plain", (0, None, 0)), ("policy", (None, None, None))):
        llm.collective_rpc(step_timing.set_plan, args=plan)
        records[label] = []
        for conversation in conversations:
            llm.collective_rpc(step_timing.collect)   # per prompt: the last step's period stays open
            llm.chat([conversation], params, use_tqdm=False)
            records[label] += [r for r in llm.collective_rpc(step_timing.collect)[0] if r["decode"] and "period" in r]
        print(f"[served_steps] {label}: {len(records[label])} decode steps", file=sys.stderr, flush=True)
    cost = llm.collective_rpc(_drafter_cost)[0]
    Path(args.out).write_text(json.dumps({"records": records, "cost": cost}))


def _drafter_cost(worker) -> dict:
    from dataclasses import asdict

    return asdict(worker.model_runner.drafter.cost)


def main(argv=None) -> None:
    from vllm_ht.models import cache_dir
    from vllm_ht.runtime import preload_env

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(cache_dir() / "SmolLM2-135M-Instruct"))
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    parser.add_argument("--prompts", default=str(REPO / "benchmarks" / "prompts_mixed.jsonl"))
    parser.add_argument("--limit", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--json", help="write the summary here")
    parser.add_argument("--engine", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.engine:
        return engine_main(args)
    import tempfile

    env = {**preload_env(os.environ), "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}   # collective_rpc of the timer
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.json"
        cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--engine", "--out", str(raw)]
        if subprocess.run(cmd, env=env, cwd=REPO).returncode:
            sys.exit("served_steps: the engine failed (its log is above)")
        body = json.loads(raw.read_text())
    summary = summarize(body["records"]["plain"], body["records"]["policy"], body["cost"])
    summary["cost"] = body["cost"]
    print(f"plain step {summary['plain_ms']:.1f} ms; the policy's {summary['steps']} steps carried "
          f"{summary['drafts']:.2f} draft rows and {summary['pseudo']:.2f} pseudo rows on average")
    for g in summary["groups"]:
        print(f"  drafts {g['drafts']:>2} pseudo {g['pseudo']:>2}: {g['steps']:>4} steps, median {g['median_ms']:.1f} ms")
    print(f"policy step: measured {summary['measured']:.2f} plain steps, calibration predicts "
          f"{summary.get('predicted', float('nan')):.2f} (costs {body['cost']})")
    if "served_fit" in summary:
        print("fitted to the served steps: " + ", ".join(f"{k} {v:.3f}" for k, v in summary["served_fit"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
