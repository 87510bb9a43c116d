"""Is Hidden Transfer faster in vLLM, at my batch size, by more than this machine's noise? Plain
vLLM, vLLM ngram (k=3) and vLLM+HT on the same prompts, plus a second plain engine as an A/A
control, each in its own engine process, over several rounds in rotating order.

    python benchmarks/throughput.py --batch-sizes 1,8 --max-tokens 64 --rounds 3 --json out.json

Design. A round starts one fresh engine per label (plain, the methods, plain-A/A) and each engine
runs every batch size; round r runs the labels in round 0's order rotated by r, so no method always
runs first or next to plain. Engines per run: rounds x (methods + 1), each paying its start-up
(about 60 s compiled on the 2-core dev VM), which the measurement excludes.
What is measured, per engine and batch size: every prompt runs once, in consecutive groups of
`batch size` concurrent requests (warm-up excluded). Output tokens/s is total output tokens over
wall time. A ratio is tokens/s over plain's at the same batch size in the same round; speedup is
the median ratio over rounds and spread its min-max. A cell (label, batch size, round) measuring
fewer than 300 output tokens is warned about on stderr. Verdict (benchmarks/stats.py):
  faster        every round's ratio > max(1, highest plain-A/A ratio at that batch size)
  slower        every round's ratio < min(1, lowest plain-A/A ratio at that batch size)
  within noise  otherwise; "n/a" with fewer than 2 rounds.
TTFT and TPOT are per-request means from vLLM's request stats (median over rounds); tau is the
mean accepted length (bonus included) from vLLM's spec-decode counters, pooled over rounds: it
averages over the steps that drafted only. tok/step is output tokens per request and step, drafting
or not (tokens / (tokens - accepted)), pooled: the one to compare drafting by (speed compares
methods), since ngram drafts only where it finds a match and HT in nearly every step;
identical_to_plain is the fraction of requests whose tokens equal the same round's plain vLLM's,
lowest over rounds (exact in fp32; in bf16 plain vLLM itself changes with the batch shape).
Every method runs in vLLM's default mode (compiled) unless --enforce-eager.
Writes a JSON (aggregated rows, per-round cells, hardware, versions, dtype, git commit), a PNG
beside it (per-round points, medians, A/A band) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# run as a script, the benchmarks package is found through REPO
from benchmarks.categories import category_rows, category_table  # noqa: E402
from benchmarks.report import plot, table  # noqa: E402
from benchmarks.stats import (  # noqa: E402
    AA, MIN_TOKENS, VERDICT_RULE, aggregate, cycle_labels, round_cells, round_order, short_cells)
from vllm_ht.runtime import preload_env  # noqa: E402  (vLLM's CPU runtime, the same for every method)

DEFAULT_PROMPTS = REPO / "benchmarks" / "prompts.jsonl"
DEFAULT_CHECKPOINT = REPO / "checkpoints" / "smollm2-135m-instruct"
METHODS = ("plain", "ngram", "ht", "ht-pseudo")      # ht: hybrid trees (pseudo rows + prompt lookup)
DEFAULT_METHODS = ("plain", "ngram", "ht")


def engine_command(args, label: str, out: Path) -> list[str]:
    """The offline engine's command line for one label (plain-A/A runs plain)."""
    method = "plain" if label == AA else "ht" if label == "ht-pseudo" else label
    cmd = [sys.executable, "-m", "vllm_ht.tools.offline", "--method", method, "--model", args.model,
           "--prompts", args.prompts, "--limit", str(args.num_prompts), "--max-tokens", str(args.max_tokens),
           "--dtype", args.dtype, "--batch-sizes", ",".join(map(str, args.batch_sizes)),
           "--tensor-parallel-size", str(args.tensor_parallel_size), "--out", str(out)]
    if args.enforce_eager:
        cmd.append("--enforce-eager")
    if args.single_process:
        cmd.append("--single-process")
    if args.ignore_eos:
        cmd.append("--ignore-eos")
    if method == "ht":
        if args.checkpoint:
            cmd += ["--checkpoint", args.checkpoint]
        if args.ht_num_nodes is not None:
            cmd += ["--num-nodes", str(args.ht_num_nodes)]
        if label == "ht-pseudo":                      # HT alone: pseudo-row drafts, no lookup branch
            cmd += ["--ht-options", json.dumps({"lookup": False})]
    return cmd


def run_method(args, label: str, round_index: int, workdir: Path, progress) -> dict:
    """One engine in a child process; the bar advances as each batch size finishes."""
    stem = f"{label.replace('/', '')}-round{round_index}"
    out, log = workdir / f"{stem}.json", workdir / f"{stem}.log"
    with open(log, "w") as log_file:
        proc = subprocess.Popen(engine_command(args, label, out), stdout=log_file, stderr=subprocess.PIPE,
                                text=True, cwd=REPO, env=preload_env(os.environ))
        for line in proc.stderr:
            log_file.write(line)
            if line.startswith("[offline]"):
                progress.update(1)
        code = proc.wait()
    if code != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"throughput: the {label} engine (round {round_index}) failed (exit {code}); "
                         f"log {log}:\n{tail}")
    return json.loads(out.read_text())


def environment(args) -> dict:
    import torch
    import vllm

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    return {"hardware": {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu}, "vllm_version": vllm.__version__,
            "torch_version": torch.__version__, "dtype": args.dtype, "git_commit": commit.stdout.strip() or None,
            "model": args.model, "checkpoint": args.checkpoint, "prompts": args.prompts,
            "num_prompts": args.num_prompts, "max_tokens": args.max_tokens, "enforce_eager": args.enforce_eager,
            "tensor_parallel_size": args.tensor_parallel_size, "single_process": args.single_process,
            "rounds": args.rounds,
            "verdict_rule": VERDICT_RULE, "date": time.strftime("%Y-%m-%d %H:%M"),
            "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:])}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF model folder (default: the prepared default model)")
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT) if (DEFAULT_CHECKPOINT / "config.json").is_file()
                   else None, help="HT checkpoint folder (default: the shipped one)")
    p.add_argument("--prompts", default=str(DEFAULT_PROMPTS),
                   help='jsonl of {"turns": [...]} (first turn) or {"prompt": ...} (default: benchmarks/prompts.jsonl)')
    p.add_argument("--num-prompts", type=int, help="prompts used (default: max(16, largest batch size))")
    p.add_argument("--batch-sizes", type=lambda v: [int(x) for x in v.split(",")], default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--methods", type=lambda v: v.split(","), default=list(DEFAULT_METHODS),
                   help="plain and its A/A control always run; list the others: ngram, ht (hybrid trees), "
                        "ht-pseudo (HT without the lookup branch) (default: plain,ngram,ht)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of one fresh engine per label (>= 2 for a verdict)")
    p.add_argument("--ht-num-nodes", type=int, help="fixed HT tree size (default: the per-batch policy)")
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-tokens tokens")
    p.add_argument("--enforce-eager", action="store_true", help="run every method eagerly")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--single-process", action="store_true",
                   help="each engine's core and worker in one process (vLLM's uni executor): shorter start-up, "
                        "not the layout `vllm serve` runs; for quick checks, not for reported numbers")
    p.add_argument("--json", default="throughput.json", help="output JSON; the PNG goes beside it")
    args = p.parse_args(argv)
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or not args.methods:
        p.error(f"--methods: choose from {','.join(METHODS)}, got {','.join(args.methods)}")
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    if args.single_process and args.tensor_parallel_size > 1:
        p.error("--single-process runs one worker: drop it for --tensor-parallel-size > 1")
    if min(args.batch_sizes) < 1:
        p.error("--batch-sizes must be positive")
    if not Path(args.prompts).is_file():
        p.error(f"--prompts {args.prompts}: no such file")
    args.num_prompts = args.num_prompts or max(16, max(args.batch_sizes))
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    from tqdm import tqdm

    from vllm_ht.prompts import load_prompts
    from vllm_ht.vllm.env import apply_cpu_defaults

    apply_cpu_defaults(args.tensor_parallel_size)
    if args.model is None:
        from vllm_ht.models import prepare_default_model

        args.model = str(prepare_default_model())
    available = len(load_prompts(args.prompts, args.num_prompts))
    if available < args.num_prompts:
        print(f"throughput: {args.prompts} has {available} prompts; using them all", file=sys.stderr)
        args.num_prompts = available
    if args.rounds < 2:
        print("throughput: one round gives no verdict (no spread to compare)", file=sys.stderr)
    labels = cycle_labels(args.methods)
    orders, cells, per_round = [], [], []  # per round: the engine order, its JSONs; all rounds: the cells
    with tempfile.TemporaryDirectory(prefix="vllm-ht-bench-") as tmp, \
            tqdm(total=args.rounds * len(labels) * len(args.batch_sizes), desc="benchmark", unit="run") as bar:
        for r in range(args.rounds):
            order, results = round_order(labels, r), {}
            for label in order:
                bar.set_postfix_str(f"round {r + 1}/{args.rounds} {label}")
                results[label] = run_method(args, label, r, Path(tmp), bar)
            orders.append(order)
            per_round.append(results)
            cells += round_cells(r, order, results, args.batch_sizes)
    for label, bs, tokens in short_cells(cells):
        print(f"throughput: warning: {label} at batch {bs} measured {tokens} output tokens in a round "
              f"(< {MIN_TOKENS}): raise --num-prompts or --max-tokens", file=sys.stderr)
    rows = [asdict(r) for r in aggregate(cells, labels)]
    rounds = [{"round": r, "order": order, "cells": [asdict(c) for c in cells if c.round == r]}
              for r, order in enumerate(orders)]
    meta = environment(args)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    categories = category_rows(per_round)
    sources = {label: res["runs"] for label, res in per_round[-1].items() if label.startswith("ht")}
    sources = {label: {bs: run.get("sources") for bs, run in runs.items()} for label, runs in sources.items()}
    out.write_text(json.dumps({**meta, "rows": rows, "categories": categories, "sources": sources,
                               "rounds": rounds}, indent=1))
    png = out.with_suffix(".png")
    plot(rows, [asdict(c) for c in cells], meta, png)
    hw = meta["hardware"]
    print(f"\n{hw['gpu'] or hw['cpu']} ({hw['cores']} cores), vLLM {meta['vllm_version']}, {args.dtype}, "
          f"{args.num_prompts} prompts x <= {args.max_tokens} tokens, {args.rounds} rounds, "
          f"commit {meta['git_commit']}")
    print(table(rows))
    print(f"verdict: {VERDICT_RULE}")
    if categories:
        print("\nper category, batch 1 (speedup: median over rounds of tokens/s vs the same round's plain)")
        print(category_table(categories))
    for label, per_bs in sources.items():
        for bs, src in per_bs.items():
            if src:
                parts = ", ".join(f"{k} {v['accepted']}/{v['drafted']} ({v['acceptance']:.0%})" for k, v in src.items())
                print(f"{label} batch {bs} draft nodes accepted by source (last round): {parts}")
    print(f"\nwrote {out} and {png}")


if __name__ == "__main__":
    main()
