"""Is Hidden Transfer faster in vLLM, at my batch size? Plain vLLM, vLLM ngram (k=3) and vLLM+HT
on the same prompts, each in its own engine (its own process), one row per (method, batch size).

    python benchmarks/throughput.py --batch-sizes 1,8 --max-tokens 64 --json out.json

What is measured, per method and batch size: every prompt runs once, in consecutive groups of
`batch size` concurrent requests (warm-up excluded). Output tokens/s is total output tokens over
wall time; speedup is against plain vLLM at the same batch size in the same run; TTFT and TPOT are
per-request means from vLLM's request stats; tau is the mean accepted length (bonus included) from
vLLM's spec-decode counters; identical_to_plain is the fraction of requests whose tokens equal
plain vLLM's (exact in fp32; in bf16 plain vLLM itself changes with the batch shape).
Every method runs in vLLM's default mode (compiled) unless --enforce-eager.
Writes a JSON (rows + hardware, versions, dtype, git commit), a PNG beside it, and prints a table.
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_PROMPTS = REPO / "benchmarks" / "prompts.jsonl"
DEFAULT_CHECKPOINT = REPO / "checkpoints" / "smollm2-135m-instruct"
METHODS = ("plain", "ngram", "ht")


def engine_command(args, method: str, out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "vllm_ht.vllm.offline", "--method", method, "--model", args.model,
           "--prompts", args.prompts, "--limit", str(args.num_prompts), "--max-tokens", str(args.max_tokens),
           "--dtype", args.dtype, "--batch-sizes", ",".join(map(str, args.batch_sizes)),
           "--tensor-parallel-size", str(args.tensor_parallel_size), "--out", str(out)]
    if args.enforce_eager:
        cmd.append("--enforce-eager")
    if args.ignore_eos:
        cmd.append("--ignore-eos")
    if method == "ht":
        if args.checkpoint:
            cmd += ["--checkpoint", args.checkpoint]
        if args.ht_num_nodes is not None:
            cmd += ["--num-nodes", str(args.ht_num_nodes)]
    return cmd


def run_method(args, method: str, workdir: Path, progress) -> dict:
    """One engine in a child process; the bar advances as each batch size finishes."""
    out, log = workdir / f"{method}.json", workdir / f"{method}.log"
    with open(log, "w") as log_file:
        proc = subprocess.Popen(engine_command(args, method, out), stdout=log_file, stderr=subprocess.PIPE,
                                text=True, cwd=REPO)
        for line in proc.stderr:
            log_file.write(line)
            if line.startswith("[offline]"):
                progress.update(1)
        code = proc.wait()
    if code != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"throughput: the {method} engine failed (exit {code}); log {log}:\n{tail}")
    return json.loads(out.read_text())


def rows_from(results: dict[str, dict], batch_sizes: list[int]) -> list[dict]:
    rows = []
    plain = results.get("plain")
    for method, res in results.items():
        for bs in batch_sizes:
            run = res["runs"][str(bs)]
            tps = run["output_tokens"] / run["seconds"]
            row = {"method": method, "batch_size": bs, "output_tokens_per_s": tps, "speedup": None,
                   "mean_accepted_length": run["mean_accepted_length"],
                   "acceptance_per_depth": run["acceptance_per_depth"], "identical_to_plain": None,
                   "ttft_ms": run.get("ttft_ms"), "tpot_ms": run.get("tpot_ms"), "output_tokens": run["output_tokens"],
                   "requests": len(run["outputs"]), "seconds": run["seconds"], "startup_s": res["startup_seconds"]}
            if plain is not None:
                base = plain["runs"][str(bs)]
                row["speedup"] = tps / (base["output_tokens"] / base["seconds"])
                same = [a == b for a, b in zip(run["outputs"], base["outputs"])]
                row["identical_to_plain"] = sum(same) / len(same)
            rows.append(row)
    return rows


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
            "tensor_parallel_size": args.tensor_parallel_size, "date": time.strftime("%Y-%m-%d %H:%M"),
            "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:])}


def table(rows: list[dict]) -> str:
    head = f"{'method':<7} {'batch':>5} {'tok/s':>8} {'speedup':>8} {'tau':>5} {'TTFT ms':>8} {'TPOT ms':>8} " \
           f"{'identical':>9}  acceptance per depth"
    lines = [head, "-" * len(head)]

    def fmt(v, spec):
        return format(v, spec) if v is not None else "-"
    for r in rows:
        depth = " ".join(f"{a:.2f}" for a in r["acceptance_per_depth"]) or "-"
        lines.append(f"{r['method']:<7} {r['batch_size']:>5} {r['output_tokens_per_s']:>8.1f} "
                     f"{fmt(r['speedup'], '>7.2f') + ('x' if r['speedup'] else ''):>8} "
                     f"{fmt(r['mean_accepted_length'], '>5.2f'):>5} {fmt(r['ttft_ms'], '>8.0f'):>8} "
                     f"{fmt(r['tpot_ms'], '>8.1f'):>8} {fmt(r['identical_to_plain'], '>9.0%'):>9}  {depth}")
    return "\n".join(lines)


def plot(rows: list[dict], meta: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method and r["speedup"] is not None]
        if mine:
            left.plot([r["batch_size"] for r in mine], [r["speedup"] for r in mine], marker="o", label=method)
        for r in rows:
            if r["method"] == method and r["acceptance_per_depth"]:
                depths = range(1, len(r["acceptance_per_depth"]) + 1)
                right.plot(depths, r["acceptance_per_depth"], marker="o", label=f"{method}, batch {r['batch_size']}")
    left.axhline(1.0, color="grey", lw=0.8, ls="--")
    left.set_xscale("log", base=2)
    left.set(xlabel="batch size (concurrent requests)", ylabel="output tokens/s vs plain vLLM",
             title=f"speedup ({meta['dtype']}, {meta['hardware']['gpu'] or 'CPU'})")
    right.set(xlabel="draft depth", ylabel="accepted drafts per verification step", title="acceptance per depth")
    right.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    for ax in (left, right):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    p.add_argument("--methods", type=lambda v: v.split(","), default=list(METHODS))
    p.add_argument("--ht-num-nodes", type=int, help="fixed HT tree size (default: the per-batch policy)")
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-tokens tokens")
    p.add_argument("--enforce-eager", action="store_true", help="run every method eagerly")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--json", default="throughput.json", help="output JSON; the PNG goes beside it")
    args = p.parse_args(argv)
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or not args.methods:
        p.error(f"--methods: choose from {','.join(METHODS)}, got {','.join(args.methods)}")
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
    methods = ["plain"] + [m for m in args.methods if m != "plain"] if "plain" in args.methods else args.methods
    results = {}
    with tempfile.TemporaryDirectory(prefix="vllm-ht-bench-") as tmp, \
            tqdm(total=len(methods) * len(args.batch_sizes), desc="benchmark", unit="run") as bar:
        for method in methods:
            bar.set_postfix_str(method)
            results[method] = run_method(args, method, Path(tmp), bar)
    rows = rows_from(results, args.batch_sizes)
    meta = environment(args)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**meta, "rows": rows}, indent=1))
    png = out.with_suffix(".png")
    plot(rows, meta, png)
    hw = meta["hardware"]
    print(f"\n{hw['gpu'] or hw['cpu']} ({hw['cores']} cores), vLLM {meta['vllm_version']}, {args.dtype}, "
          f"{args.num_prompts} prompts x <= {args.max_tokens} tokens, commit {meta['git_commit']}")
    print(table(rows))
    print(f"\nwrote {out} and {png}")


if __name__ == "__main__":
    main()
