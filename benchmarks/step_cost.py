"""What does an HT step cost, in plain vLLM decode steps? Per batch size and context length.

    python benchmarks/step_cost.py --contexts 100,1000,2000 --batch-sizes 1,2,4,8 --json out.json

Three engines, each in its own process, in this order: plain vLLM, vLLM+HT, plain vLLM again
(the A/A control: its ratio to the first plain run is this machine's drift). Every engine runs
the same requests: `batch` prompts of exactly `context` tokens (text from the shipped prompt
files, tokenized), greedy, `--decode-steps` output tokens each (ignore_eos). Workers are timed
from the inside (`vllm_ht/vllm/step_timing.py`): for each decode step (every request decoding)
the step period (execute_model to the next execute_model: scheduler, IPC and output processing
included), the runner's busy time, its CPU time, and time per phase.

Printed per (context, batch): plain step ms, HT step ms, the ratio HT / plain (the step cost in
plain steps), the A/A ratio, HT tokens per step, and the HT step's breakdown:
  rows       forward minus attention (the matmuls of real + pseudo rows; compiled)
  attention  the attention backend (real rows; pseudo rows; tree rows)
  host       HT's own host work: trees/masks/pseudo layout, input buffers, KV compaction,
             drafting (the pseudo rows' LM head rides along vLLM's, counted under vllm)
  sample     vLLM's sampler, plus HT's tree verification
  vllm       the rest of the step (vLLM's input preparation and metadata, the LM head on real rows,
             bookkeeping, scheduler, IPC, output processing)
  cpu/wall   CPU time over busy time (2.0 = both cores busy all the step; spin-waiting counts)
HT uses the default policy unless --num-nodes forces a tree (with --pseudo-nodes anchors).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_CHECKPOINT = REPO / "checkpoints" / "smollm2-135m-instruct"
TEXT_SOURCES = [REPO / "benchmarks" / "prompts.jsonl", REPO / "data" / "mt_bench_question.jsonl"]


def context_tokens(tokenizer, length: int, offset: int) -> list[int]:
    """`length` token ids of real text (the shipped prompt files, concatenated), starting at a
    per-request offset so requests differ."""
    texts = []
    for path in TEXT_SOURCES:
        for line in path.read_text().splitlines():
            row = json.loads(line)
            texts += row.get("turns") or [row.get("prompt", "")]
    ids = tokenizer.encode("\n\n".join(texts))
    start = (offset * 997) % max(len(ids) - length, 1)
    out = ids[start : start + length]
    while len(out) < length:
        out += ids[: length - len(out)]
    return out


def engine_main(args) -> None:
    """One engine (one method): every (context, batch) cell, timed from inside the worker."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_ht.vllm import step_timing

    kw = {}
    if args.engine == "ht":
        from vllm_ht.vllm.engine_args import ht_engine_kwargs

        kw = ht_engine_kwargs(args.model, checkpoint=args.checkpoint, num_nodes=args.num_nodes,
                              pseudo_nodes=args.pseudo_nodes)
    max_len = max(args.contexts) + args.decode_steps + 64
    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=max_len, seed=0, enforce_eager=args.enforce_eager,
              max_num_batched_tokens=max(max_len, 2048), **kw)
    tok = llm.get_tokenizer()
    llm.collective_rpc(step_timing.install)
    params = SamplingParams(temperature=0, max_tokens=args.decode_steps, ignore_eos=True)
    llm.generate([TokensPrompt(prompt_token_ids=context_tokens(tok, 64, 0))], SamplingParams(max_tokens=8),
                 use_tqdm=False)                                                      # warm-up
    cells = []
    for ctx in args.contexts:
        for bs in args.batch_sizes:
            prompts = [TokensPrompt(prompt_token_ids=context_tokens(tok, ctx, i)) for i in range(bs)]
            llm.collective_rpc(step_timing.collect)                                  # drop warm-up records
            kinds_before = llm.collective_rpc(step_timing.step_counts)[0]
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            wall = time.perf_counter() - t0
            records = llm.collective_rpc(step_timing.collect)[0]
            after = llm.collective_rpc(step_timing.step_counts)[0]
            counts = {k: v - kinds_before.get(k, 0) for k, v in after.items() if v - kinds_before.get(k, 0)}
            decode = [r for r in records if r["decode"] and r["reqs"] == bs and "period" in r]
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            cells.append({"context": ctx, "batch": bs, "wall_s": wall, "output_tokens": tokens,
                          "steps": len(records), "decode_steps": len(decode), "step_kinds": counts,
                          "records": decode})
            print(f"[step_cost] {args.engine}: context {ctx} batch {bs} done", file=sys.stderr, flush=True)
    Path(args.out).write_text(json.dumps({"engine": args.engine, "cells": cells}))


def summarize(cell: dict) -> dict:
    """Medians over a cell's decode steps (ms), and the HT breakdown."""
    recs = cell["records"]
    if not recs:
        return {}
    med = lambda key: statistics.median(r[key] for r in recs)                       # noqa: E731
    phase = lambda name: statistics.mean(r["phases"].get(name, 0.0) for r in recs)  # noqa: E731
    period = med("period")
    attention, forward = phase("attention"), phase("forward")
    host = phase("build") + phase("inputs") + phase("compact") + phase("propose")
    # verification beyond vLLM's sampler is inside "sample"; the sampler itself is vLLM's
    out = {"period_ms": period, "busy_ms": med("busy"), "cpu_per_wall": statistics.mean(r["cpu"] / r["busy"] for r in recs),
           "rows_ms": forward - attention - phase("build") - phase("inputs"), "attention_ms": attention,
           "host_ms": host, "sample_ms": phase("sample") - phase("compact"), "logits_ms": phase("logits"),
           "drafts_per_step": statistics.mean(r["drafts"] for r in recs), "rows_per_step": statistics.mean(r["rows"] for r in recs)}
    out["vllm_ms"] = period - out["rows_ms"] - attention - host - out["sample_ms"]
    return out


def report(results: dict) -> list[dict]:
    rows = []
    by = {name: {(c["context"], c["batch"]): c for c in res["cells"]} for name, res in results.items()}
    for key, ht in by["ht"].items():
        plain, again = by["plain"][key], by["plain_aa"][key]
        p, h, a = summarize(plain), summarize(ht), summarize(again)
        if not (p and h and a):
            continue
        steps = max(len(ht["records"]), 1)
        tokens_per_step = (ht["output_tokens"] - key[1]) / max(ht["steps"] - 1, 1)
        rows.append({"context": key[0], "batch": key[1], "plain_ms": p["period_ms"], "ht_ms": h["period_ms"],
                     "ratio": h["period_ms"] / p["period_ms"], "aa_ratio": a["period_ms"] / p["period_ms"],
                     "ht_tokens_per_step": tokens_per_step, "ht_decode_steps": steps,
                     "ht_step_kinds": ht["step_kinds"], "plain": p, "ht": h, "plain_aa": a})
    return rows


def table(rows: list[dict]) -> str:
    head = ("| context | batch | plain ms | HT ms | HT/plain | A/A | HT tok/step | HT rows | HT attn | HT host "
            "| HT sample | HT vllm+ | HT cpu/wall | plain cpu/wall |\n|" + "---|" * 14)
    lines = [head]
    for r in rows:
        h, p = r["ht"], r["plain"]
        lines.append(f"| {r['context']} | {r['batch']} | {r['plain_ms']:.1f} | {r['ht_ms']:.1f} | {r['ratio']:.2f} "
                     f"| {r['aa_ratio']:.2f} | {r['ht_tokens_per_step']:.2f} | {h['rows_ms']:.1f} | {h['attention_ms']:.1f} "
                     f"| {h['host_ms']:.1f} | {h['sample_ms']:.1f} | {h['vllm_ms']:.1f} | {h['cpu_per_wall']:.2f} "
                     f"| {p['cpu_per_wall']:.2f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Left: HT step / plain step per batch size, one line per context (A/A dotted). Right: where a
    batch-1 step's time goes, plain vs HT, per context."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for ctx in sorted({r["context"] for r in rows}):
        mine = sorted((r for r in rows if r["context"] == ctx), key=lambda r: r["batch"])
        line = left.plot([r["batch"] for r in mine], [r["ratio"] for r in mine], marker="o", label=f"context {ctx}")
        left.plot([r["batch"] for r in mine], [r["aa_ratio"] for r in mine], ls=":", color=line[0].get_color())
    left.axhline(1.0, color="grey", lw=0.8)
    batches = sorted({r["batch"] for r in rows})
    left.set_xscale("log", base=2)
    left.set_xticks(batches, [str(b) for b in batches])
    left.set(xlabel="batch size", ylabel="HT step / plain step", title="step cost (dotted: A/A plain)")
    left.legend()
    parts = ("rows_ms", "attention_ms", "host_ms", "sample_ms", "vllm_ms")
    ones = sorted((r for r in rows if r["batch"] == 1), key=lambda r: r["context"])
    labels, bottoms = [], None
    for i, r in enumerate(ones):
        for j, name in enumerate(("plain", "ht")):
            x, bottom = 2 * i + j, 0.0
            for k, part in enumerate(parts):
                val = max(r[name][part], 0.0)
                right.bar(x, val, bottom=bottom, color=f"C{k}", label=part[:-3] if x == 0 else None)
                bottom += val
            labels.append(f"{name}\n{r['context']}")
    right.set_xticks(range(len(labels)), labels)
    right.set(ylabel="ms per step", title="batch 1: where the time goes")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="default: the prepared default model")
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    p.add_argument("--contexts", type=lambda v: [int(x) for x in v.split(",")], default=[100, 1000, 2000])
    p.add_argument("--batch-sizes", type=lambda v: [int(x) for x in v.split(",")], default=[1, 2, 4, 8])
    p.add_argument("--decode-steps", type=int, default=48, help="output tokens per request")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--num-nodes", type=int, help="force an HT tree of N drafts (default: the policy's)")
    p.add_argument("--pseudo-nodes", type=int)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--json", help="write rows + environment here")
    p.add_argument("--engine", choices=["plain", "ht"], help=argparse.SUPPRESS)   # child mode
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    from vllm_ht.runtime import preload_env
    from vllm_ht.vllm.env import apply_cpu_defaults

    apply_cpu_defaults()
    if args.model is None:
        from vllm_ht.models import default_model_dir

        args.model = str(default_model_dir())
    if args.engine:
        return engine_main(args)
    env = {**preload_env(os.environ), "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}   # collective_rpc of our timer
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, engine in (("plain", "plain"), ("ht", "ht"), ("plain_aa", "plain")):
            out = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, __file__, "--engine", engine, "--out", str(out)] + (argv if argv is not None else sys.argv[1:])
            log = Path(tmp) / f"{name}.log"
            with open(log, "w") as f:
                code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO).returncode
            if code != 0:
                raise SystemExit(f"step_cost: the {name} engine failed:\n{log.read_text()[-3000:]}")
            results[name] = json.loads(out.read_text())
            print(f"[step_cost] {name} done", file=sys.stderr, flush=True)
    rows = report(results)
    print(table(rows))
    if args.json:
        meta = {"argv": sys.argv[1:], "dtype": args.dtype, "num_nodes": args.num_nodes, "pseudo_nodes": args.pseudo_nodes,
                "cpu": os.cpu_count(), "ld_preload": env.get("LD_PRELOAD", "")}
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        plot(rows, Path(args.json).with_suffix(".png"))


if __name__ == "__main__":
    main()
