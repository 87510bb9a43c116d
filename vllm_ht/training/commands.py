"""`vllm-ht train` and `vllm-ht eval-drafts`: argument parsing and the glue between the pieces."""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch


def _default_data(model: str, name: str) -> str:
    from ..models import cache_dir

    return str(cache_dir() / "data" / Path(model).name / name)


def add_parsers(sub, model_dir_help: str) -> None:
    t = sub.add_parser("train", help="train the transfer projections (self-distilled data, KL loss)")
    t.add_argument("--model", help=model_dir_help)
    t.add_argument("--data", help="training jsonl from `vllm-ht make-data` (default: the cache's train.jsonl)")
    t.add_argument("--eval-data", help="held-out jsonl (`make-data --eval`) for calibration (default: mtbench.jsonl)")
    t.add_argument("--out", required=True, help="checkpoint folder (resumes from its state.pt)")
    t.add_argument("--num-steps", type=int, default=3, help="k: drafts per step")
    t.add_argument("--transfer-layers", help="one layer for all steps (e.g. 15) or one per step (e.g. 12,15,18)")
    t.add_argument("--bias", action="store_true")
    t.add_argument("--fuse-layers", help="fused projection input: also map the states of these lower layers "
                                         "(e.g. 5,10) and add them (training and eval-drafts only; not served)")
    t.add_argument("--steps", type=int, default=2000)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--anchors", type=int, default=64, help="anchors sampled per sequence per step")
    t.add_argument("--max-len", type=int, default=384)
    t.add_argument("--max-sequences", type=int, metavar="N",
                   help="train on the data file's first N lines only (a file still being made, or a fixed subset)")
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--warmup", type=int, default=50)
    t.add_argument("--medusa", action="store_true", help="also train the Medusa-1 baseline on the same batches")
    t.add_argument("--save-every", type=int, default=100)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--no-resume", action="store_true")
    t.add_argument("--init-from", metavar="CHECKPOINT",
                   help="a new run starts from this checkpoint's projections (and Medusa heads) with a fresh "
                        "optimiser and schedule; its anchors count on top of the checkpoint's")
    t.add_argument("--eval-limit", type=int, default=None, help="calibrate on the first N held-out sequences")
    t.add_argument("--save-dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    t.add_argument("--real-cache", metavar="DIR",
                   help="keep the frozen model's real pass per sequence in DIR and read it back in later epochs "
                        "(~14 KB per token in bf16 for the default model at layer 15: 7 GB for 500k tokens)")
    t.add_argument("--real-cache-dtype", default="bfloat16", choices=["float32", "bfloat16"],
                   help="storage of the cached real pass: bfloat16 halves the disk and rounds the values the "
                        "steps read (the loss moves slightly); float32 gives uncached training's numbers")

    e = sub.add_parser("eval-drafts", help="per-depth draft accuracy on held-out data; transfer-layer sweep")
    e.add_argument("--model", help=model_dir_help)
    e.add_argument("--checkpoint", help="HT checkpoint (default: identity projections)")
    e.add_argument("--data", help="held-out jsonl (default: the cache's mtbench.jsonl)")
    e.add_argument("--limit", type=int, default=None)
    e.add_argument("--sweep-layers", help="comma list: train a short run per transfer layer, then evaluate")
    e.add_argument("--sweep-steps", type=int, default=150)
    e.add_argument("--sweep-lr", type=float, default=3e-3)
    e.add_argument("--sweep-batch-size", type=int, default=8)
    e.add_argument("--sweep-max-len", type=int, default=384)
    e.add_argument("--sweep-num-steps", type=int, default=3, help="k for every run of the sweep")
    e.add_argument("--sweep-data", help="training jsonl for the sweep (default: the cache's train.jsonl)")
    e.add_argument("--out", help="folder for the JSON + PNG (default: the checkpoint folder or ./eval)")
    e.add_argument("--first-tokens", type=int, metavar="N",
                   help="also report on the first N response tokens only (what a run of N-token answers decodes)")
    e.add_argument("--curve", metavar="RUN",
                   help="a training run's folder: held-out top-1 per depth of each saved snapshot against anchors "
                        "seen (RUN/learning_curve.json + .png; snapshots evaluated before are reused)")
    e.add_argument("--json", action="store_true")


def _int_list(arg: str | None, flag: str) -> list[int]:
    try:
        return [int(x) for x in arg.split(",")] if arg else []
    except ValueError:
        raise SystemExit(f"{flag} {arg!r}: give comma-separated layer numbers, e.g. 5,10") from None


def _layers(arg: str | None, k: int) -> list[int] | None:
    if not arg:
        return None
    vals = [int(x) for x in arg.split(",")]
    return vals * k if len(vals) == 1 else vals


def calibrate(trainer, eval_path: str, limit: int | None, progress: bool = True) -> dict:
    """Evaluate the trained drafters, store templates + accuracy in the HT config, return metrics."""
    from ..tree import calibrate_templates
    from .data import load_sequences
    from .evaluate import BUDGETS, evaluate, ht_drafter, medusa_drafter

    seqs = load_sequences(eval_path, trainer.cfg.max_len + 256)[:limit]
    drafters = {"ht": ht_drafter(trainer.bb, trainer.projections, trainer.ht_config)}
    if trainer.medusa is not None:
        drafters["medusa"] = medusa_drafter(trainer.medusa)
    res = evaluate(trainer.bb, trainer.ht_config, drafters, seqs, progress=progress)
    ht = res["ht"]
    acc = ht.conditional_accuracy()
    templates = {**calibrate_templates(acc, BUDGETS), **ht.calibrated_templates()}
    trainer.ht_config = replace(trainer.ht_config, tree_templates=templates, topr_accuracy=acc)
    return {name: r.summary() for name, r in res.items()}


def train_command(args: argparse.Namespace, model: str) -> int:
    from .train import TrainConfig, Trainer

    cfg = TrainConfig(model=model, data=args.data or _default_data(model, "train.jsonl"), out=args.out,
                      num_steps=args.num_steps, transfer_layers=_layers(args.transfer_layers, args.num_steps),
                      bias=args.bias, fuse_layers=_int_list(args.fuse_layers, "--fuse-layers"),
                      steps=args.steps, batch_size=args.batch_size, anchors=args.anchors,
                      max_len=args.max_len, lr=args.lr, warmup=args.warmup, medusa=args.medusa,
                      save_every=args.save_every, seed=args.seed, save_dtype=args.save_dtype,
                      real_cache=args.real_cache, real_cache_dtype=args.real_cache_dtype,
                      init_from=args.init_from, max_sequences=args.max_sequences)
    trainer = Trainer(cfg)
    t0 = time.perf_counter()
    out = trainer.run(resume=not args.no_resume)
    metrics = calibrate(trainer, args.eval_data or _default_data(model, "mtbench.jsonl"), args.eval_limit)
    prov = dict(trainer.ht_config.provenance, eval=metrics, wall_seconds=round(time.perf_counter() - t0, 1))
    trainer.export(prov)
    (Path(out) / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    from .report import render

    (Path(out) / "README.md").write_text(render(Path(out), command="vllm-ht " + " ".join(sys.argv[1:])
                                                if len(sys.argv) > 1 else None))
    print(json.dumps(metrics, indent=1))
    print(out)
    return 0


def _sweep(args, model: str, out: Path) -> dict:
    from .train import TrainConfig, Trainer

    rows = {}
    for layer in [int(x) for x in args.sweep_layers.split(",")]:
        cfg = TrainConfig(model=model, data=args.sweep_data or _default_data(model, "train.jsonl"),
                          out=str(out / f"sweep-layer{layer}"), num_steps=args.sweep_num_steps,
                          transfer_layers=[layer] * args.sweep_num_steps, steps=args.sweep_steps,
                          batch_size=args.sweep_batch_size, max_len=args.sweep_max_len, lr=args.sweep_lr,
                          warmup=max(1, args.sweep_steps // 10), save_every=args.sweep_steps)
        trainer = Trainer(cfg)
        trainer.run()
        rows[layer] = calibrate(trainer, args.data or _default_data(model, "mtbench.jsonl"), args.limit)["ht"]
    return rows


def eval_command(args: argparse.Namespace, model: str) -> int:
    from transformers import AutoModelForCausalLM

    from ..backbone import Backbone
    from ..checkpoint import load_checkpoint
    from ..config import HiddenTransferConfig
    from ..projections import TransferProjections
    from .data import load_sequences
    from .evaluate import evaluate, ht_drafter, medusa_drafter
    from .medusa import MedusaHeads
    from .plots import plot_depth_accuracy, plot_layer_sweep
    from .train import MEDUSA_FILE

    out = Path(args.out or args.checkpoint or args.curve or "eval")
    out.mkdir(parents=True, exist_ok=True)
    if args.sweep_layers:
        rows = _sweep(args, model, out)
        (out / "layer_sweep.json").write_text(json.dumps(rows, indent=1) + "\n")
        plot_layer_sweep(rows, out / "layer_sweep.png")
        print("layer  " + "  ".join(f"top1@{d + 1}" for d in range(args.sweep_num_steps)) + "  tau@16")
        for layer, r in rows.items():
            print(f"{layer:5d}  " + "  ".join(f"{a:.3f} " for a in r["top1"]) + f" {r['tau'].get(16, 0):.3f}")
        print(out / "layer_sweep.png")
        return 0
    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval().requires_grad_(False)
    bb = Backbone(m)
    if args.curve:
        from .curve import learning_curve, plot_learning_curve

        run = Path(args.curve)
        rows = learning_curve(bb, run, load_sequences(args.data or _default_data(model, "mtbench.jsonl"), 640)[: args.limit])
        print("step  anchors    " + "  ".join(f"top1@{d + 1}" for d in range(len(rows[0]["top1"]) if rows else 0)))
        for r in rows:
            print(f"{r['step']:5d}  {r['anchors_seen']:8d}  " + "  ".join(f"{a:.3f} " for a in r["top1"]))
        print(plot_learning_curve(rows, run / "learning_curve.png"))
        return 0
    if args.checkpoint:
        cfg, proj = load_checkpoint(args.checkpoint)
        cfg.check_model(m.config)
    else:
        cfg = HiddenTransferConfig.for_model(m.config)
        proj = TransferProjections(cfg)
    drafters = {"ht": ht_drafter(bb, proj, cfg)}
    if args.checkpoint and (Path(args.checkpoint) / MEDUSA_FILE).is_file():
        drafters["medusa"] = medusa_drafter(MedusaHeads.load(str(Path(args.checkpoint) / MEDUSA_FILE)))
    seqs = load_sequences(args.data or _default_data(model, "mtbench.jsonl"), 640)[: args.limit]
    res = evaluate(bb, cfg, drafters, seqs)
    summary = {name: r.summary() for name, r in res.items()}
    if args.first_tokens:
        head = res["ht"].head(args.first_tokens)
        summary[f"ht_first{args.first_tokens}"] = dict(head.summary(), decoded_tau_with_config_templates={
            n: round(head.decoded_tau([tuple(p) for p in t]), 4) for n, t in sorted(cfg.tree_templates.items())})
    (out / "eval_drafts.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot_depth_accuracy(res, out / "acceptance_per_depth.png")
    if args.json:
        print(json.dumps(summary))
        return 0
    for name, r in res.items():
        print(f"{name}: {r.ranks.shape[0]} anchors")
        print("depth  " + "  ".join(f"top{n:<3d}" for n in (1, 2, 3, 5, 10)))
        for d in range(1, r.num_steps + 1):
            print(f"{d:5d}  " + "  ".join(f"{r.topr(d, n):.3f} " for n in (1, 2, 3, 5, 10)))
        print("expected tau per node budget: " + ", ".join(f"{n}: {t:.2f}" for n, t in summary[name]["tau"].items()))
    if args.first_tokens:
        first = summary[f"ht_first{args.first_tokens}"]
        print(f"ht, first {args.first_tokens} response tokens only: top-1 per depth "
              + " / ".join(f"{a:.3f}" for a in first["top1"]) + "; greedy decoding replayed with the config's "
              "templates, tau per node budget: "
              + ", ".join(f"{n}: {t:.2f}" for n, t in first["decoded_tau_with_config_templates"].items()))
    print(out / "acceptance_per_depth.png")
    return 0
