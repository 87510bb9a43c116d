"""Run one vLLM engine (plain, ngram or Hidden Transfer) over a prompt file; JSON out.

    python -m vllm_ht.tools.offline --method ht --checkpoint DIR --prompts FILE --limit 20 \
        --max-tokens 64 --dtype float32 --batch-size 1 --out out.json

One engine per process (vLLM's CPU engine spawns workers; separate processes keep methods from
sharing state). --single-process keeps vLLM's engine core and its one worker in this process (vLLM's
`uni` executor, VLLM_ENABLE_V1_MULTIPROCESSING=0): the same model runner, worker and HT code, ~35 s
less start-up per engine on 2 cores (two fewer Python processes importing vLLM). The tests use it
wherever the process layout is not what they test; `vllm serve`, tensor parallelism and the
compiled e2e keep vLLM's multiprocessing layout. Used by the end-to-end tests and the throughput
benchmark. Acceptance comes from vLLM's own spec-decode counters: a verification step that accepts a path of depth a counts
positions 0..a-1, so per-position counts are per-depth counts for trees too.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def engine_kwargs(args) -> dict:
    if args.method == "ht":
        from ..vllm.engine_args import ht_engine_kwargs

        return ht_engine_kwargs(args.model, checkpoint=args.checkpoint, num_nodes=args.num_nodes,
                                row_budget=args.row_budget, pseudo_nodes=args.pseudo_nodes,
                                tensor_parallel_size=args.tensor_parallel_size,
                                cpu_cache_layout=None if args.cpu_cache_layout == "auto" else args.cpu_cache_layout,
                                options=json.loads(args.ht_options) if args.ht_options else None,
                                ) | ({"worker_cls": args.worker_cls} if args.worker_cls else {})
    if args.method == "ngram":
        return {"speculative_config": {"method": "ngram", "num_speculative_tokens": 3,
                                       "prompt_lookup_max": 3, "prompt_lookup_min": 1}}
    return {}


def spec_metrics(llm) -> dict:
    """vLLM's cumulative spec-decode counters: drafts, draft tokens, accepted, accepted per position."""
    vals: dict = {}
    for m in llm.get_metrics():
        if m.name.startswith("vllm:spec_decode"):
            vals[m.name.removeprefix("vllm:spec_decode_")] = getattr(m, "values", None) or getattr(m, "value", 0)
    drafts = vals.get("num_drafts", 0) or 0
    accepted = vals.get("num_accepted_tokens", 0) or 0
    per_pos = vals.get("num_accepted_tokens_per_pos", []) or []
    return {"num_drafts": drafts, "num_draft_tokens": vals.get("num_draft_tokens", 0), "num_accepted": accepted,
            "per_pos": list(per_pos)}


def run(args) -> dict:
    if args.single_process:
        # read by vLLM when the engine starts (vllm/envs.py); vLLM 0.32's CPU platform turns the `uni`
        # executor back into `mp` unless it is "0" (vllm/platforms/cpu.py)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams

    from ..prompts import load_prompts

    prompts = load_prompts(args.prompts, args.limit)
    if args.repeat:  # the same prompt many times: sampling statistics
        prompts = prompts[:1] * args.repeat
    kw = engine_kwargs(args)
    kw.setdefault("enforce_eager", args.enforce_eager)
    if args.single_process:
        kw["distributed_executor_backend"] = "uni"
    t0 = time.perf_counter()
    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len, seed=0,
              disable_log_stats=False, tensor_parallel_size=args.tensor_parallel_size, **kw)
    startup = time.perf_counter() - t0
    conversations = [[{"role": "user", "content": p}] for p in prompts]

    overrides = _request_params(args.request_params)

    def params(i: int):
        kw = dict(temperature=args.temperature, max_tokens=args.max_tokens, ignore_eos=args.ignore_eos,
                  seed=None if args.seed is None else args.seed + i, logprobs=args.logprobs,
                  repetition_penalty=args.repetition_penalty)
        return SamplingParams(**{**kw, **(overrides[i % len(overrides)] if overrides else {})})

    llm.chat(conversations[:1], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up, not timed
    runs = {}
    for batch_size in args.batch_sizes:
        before, kinds_before = spec_metrics(llm), _step_kinds(llm, args)
        sources_before = _source_counts(llm, args)
        outputs, latencies, t1 = [], [], time.perf_counter()
        choices = []         # every completion of each request (n > 1)
        chunks = []          # per llm.chat call: its prompts, time, tokens and drafts (per-category views)
        for start in range(0, len(conversations), batch_size):
            chunk = conversations[start : start + batch_size]
            c0, m0 = time.perf_counter(), spec_metrics(llm)
            outs = llm.chat(chunk, [params(start + i) for i in range(len(chunk))], use_tqdm=False)
            m1 = spec_metrics(llm)
            outputs += [list(o.outputs[0].token_ids) for o in outs]
            choices += [[list(c.token_ids) for c in o.outputs] for o in outs]
            latencies += [_latency(o) for o in outs]
            chunks.append({"start": start, "size": len(chunk), "seconds": time.perf_counter() - c0,
                           "output_tokens": sum(len(o.outputs[0].token_ids) for o in outs),
                           "num_drafts": (m1["num_drafts"] or 0) - (m0["num_drafts"] or 0),
                           "num_accepted": (m1["num_accepted"] or 0) - (m0["num_accepted"] or 0)})
        seconds = time.perf_counter() - t1
        after = spec_metrics(llm)
        drafts = (after["num_drafts"] or 0) - (before["num_drafts"] or 0)
        acc = (after["num_accepted"] or 0) - (before["num_accepted"] or 0)
        runs[batch_size] = {"outputs": outputs, "choices": choices, "seconds": seconds, "output_tokens": sum(map(len, outputs)),
                            "mean_accepted_length": 1 + acc / drafts if drafts else None,
                            # every completion of n > 1 is a request of its own to vLLM's counters
                            "tokens_per_step": tokens_per_step(sum(len(c) for cs in choices for c in cs), acc),
                            "num_drafts": drafts, "num_accepted": acc,
                            "acceptance_per_depth": _depth_delta(before, after, drafts),
                            "ttft_ms": _mean([ttft for ttft, _ in latencies]),
                            "tpot_ms": _mean([tpot for _, tpot in latencies]),
                            "step_kinds": _delta(kinds_before, _step_kinds(llm, args)),
                            "sources": _sources(_delta(sources_before, _source_counts(llm, args))),
                            "chunks": chunks}
        print(f"[offline] {args.method}: batch {batch_size} done", file=sys.stderr, flush=True)
    return {"method": args.method, "dtype": args.dtype, "startup_seconds": startup, "runs": runs,
            "kv_layout": llm.collective_rpc("ht_kv_layout")[0] if args.method == "ht" else None,
            "self_check": llm.collective_rpc("ht_self_check")[0] if args.method == "ht" else None,
            "categories": _categories(args, len(prompts))}


def _categories(args, count: int) -> list:
    from ..prompts import load_categories

    return [None] * count if args.repeat else load_categories(args.prompts, count)


def _request_params(path: str | None) -> list[dict]:
    """--request-params: a JSON list of SamplingParams keyword sets, request i takes entry i % len
    (a "structured_outputs" dict becomes vLLM's StructuredOutputsParams, logit_bias keys ints)."""
    if not path:
        return []
    from vllm.sampling_params import StructuredOutputsParams

    rows = json.loads(Path(path).read_text())
    out = []
    for r in rows:
        r = dict(r)
        if isinstance(r.get("structured_outputs"), dict):
            r["structured_outputs"] = StructuredOutputsParams(**r["structured_outputs"])
        if isinstance(r.get("logit_bias"), dict):                  # JSON keys are strings; token ids are ints
            r["logit_bias"] = {int(k): v for k, v in r["logit_bias"].items()}
        out.append(r)
    return out


def _source_counts(llm, args) -> dict:
    """Draft nodes by source so far, from the first rank (every rank verifies the same trees)."""
    return llm.collective_rpc("ht_source_counts")[0] if args.method == "ht" else {}


def _step_kinds(llm, args) -> dict:
    """HT steps by kind so far (the worker counts them), summed over workers; {} for other methods."""
    if args.method != "ht":
        return {}
    total: dict = {}
    for counts in llm.collective_rpc("ht_step_counts"):
        for kind, n in counts.items():
            total[kind] = total.get(kind, 0) + n
    return total


def _sources(counts: dict) -> dict:
    """Per draft source: nodes drafted, accepted, and the accepted share."""
    out = {}
    for name in ("pseudo", "lookup", "both"):
        drafted, accepted = counts.get(name + "_drafted", 0), counts.get(name + "_accepted", 0)
        if drafted:
            out[name] = {"drafted": drafted, "accepted": accepted, "acceptance": accepted / drafted}
    return out


def _delta(before: dict, after: dict) -> dict:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


def _latency(output) -> tuple[float | None, float | None]:
    """(time to first token, time per later output token) of one request, in ms, from vLLM's
    per-request stats (engine-core timestamps)."""
    m = getattr(output, "metrics", None)
    if m is None or not getattr(m, "first_token_ts", 0):
        return None, None
    n = getattr(m, "num_generation_tokens", 0)
    tpot = (m.last_token_ts - m.first_token_ts) / (n - 1) * 1000 if n > 1 else None
    return m.first_token_latency * 1000, tpot


def tokens_per_step(output_tokens: int, accepted: int) -> float | None:
    """Tokens a request gains per step it runs in, drafting or not: each step that emits emits one
    token plus those it accepted (the prefill's step emits the first), so requests with T output
    tokens in all ran T - accepted such steps. Pooled over a batch it is per request and step.

    vLLM's mean acceptance length (`mean_accepted_length`, 1 + accepted / drafts) averages over the
    steps that drafted only; for a method that drafts in only some steps (vLLM's ngram drafts
    only where it finds a match) it says how good its drafts were, not how many steps it saved.
    This is the measure to compare methods by. It runs slightly high: vLLM counts a last step's
    accepted tokens before it cuts the output at EOS or max_tokens (vllm/v1/core/sched/scheduler.py,
    update_from_output), so tokens thrown away there still count as accepted (a few % at 64 tokens).
    benchmarks/step_cost.py's `ht_tokens_per_step` is another measure: decode steps only."""
    steps = output_tokens - accepted
    return output_tokens / steps if output_tokens and steps > 0 else None


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _depth_delta(before: dict, after: dict, drafts: int) -> list[float]:
    b, a = before["per_pos"], after["per_pos"]
    b = list(b) + [0] * (len(a) - len(b))
    return [(x - y) / drafts for x, y in zip(a, b) if x - y] if drafts else []


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--method", choices=["plain", "ngram", "ht"], default="plain")
    p.add_argument("--checkpoint")
    p.add_argument("--num-nodes", type=int)
    p.add_argument("--row-budget", type=int)
    p.add_argument("--pseudo-nodes", type=int, help="tree nodes carrying pseudo rows (default: all)")
    p.add_argument("--cpu-cache-layout", choices=["auto", "rows"], default="auto",
                   help="HT on CPU: 'auto' keeps vLLM's own KV packing where readable (causal steps then run "
                        "vLLM's attention kernel); 'rows' forces the plain layout")
    p.add_argument("--ht-options", help="further HT options as JSON (additional_config['vllm_ht'])")
    p.add_argument("--prompts", required=True)
    p.add_argument("--limit", type=int)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch-sizes", type=lambda v: [int(x) for x in v.split(",")], default=[1],
                   help="comma list: each runs all prompts, in chunks of that many concurrent requests")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--logprobs", type=int, help="request top logprobs (a chain-only feature: no drafts)")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--repeat", type=int, help="use the first prompt this many times")
    p.add_argument("--request-params", help="JSON file: a list of SamplingParams keyword sets, request i takes "
                                            "entry i %% len (overrides the flags above)")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--single-process", action="store_true",
                   help="engine core and worker in this process (vLLM's uni executor): faster start-up, tensor "
                        "parallel size 1 only")
    p.add_argument("--worker-cls", help="(tests) a worker class in place of HT's, e.g. one whose runner pads batches")
    p.add_argument("--out", required=True)
    return p


if __name__ == "__main__":
    from ..vllm.env import apply_cpu_defaults

    parser = build_parser()
    a = parser.parse_args()
    if a.single_process and a.tensor_parallel_size > 1:
        parser.error("--single-process runs one worker: drop it for --tensor-parallel-size > 1")
    apply_cpu_defaults(a.tensor_parallel_size)
    Path(a.out).write_text(json.dumps(run(a)))
