"""What does a training step cost, uncached and read from the real-pass cache?

    python benchmarks/train_step.py [--model DIR] [--steps 4]

Three trainers on the same batches (the shipped checkpoint's config: k=3, transfer layer 15,
batch 8, 64 anchors, sequences of ~70 + ~200 tokens of random ids; timing does not depend on the
ids), one after the other in this process: uncached; uncached with the teacher's LM head on every
(anchor, step) row as before `unique_teacher_logprobs`; then with `--real-cache` in bf16 over two
epochs (the first fills the cache, the second reads it). Prints the median seconds per step and
the ratio to the uncached run. The cache is small here and read back from the OS page cache; a
whole data set's cache is read from disk. Run it alone: two cores cannot time and do anything else.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

import vllm_ht.training.train as train_mod
from vllm_ht.models import default_model_dir
from vllm_ht.training.loss import teacher_logprobs
from vllm_ht.training.train import TrainConfig, Trainer, unique_teacher_logprobs


def _data(path: Path, n: int) -> None:
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(n):
            ids = [rng.randint(100, 40000) for _ in range(rng.randint(40, 120) + rng.randint(150, 260))]
            cut = rng.randint(40, 120)
            f.write(json.dumps({"prompt_ids": ids[:cut], "response_ids": ids[cut:]}) + "\n")


def _teacher_per_row(bb, final, tpos, valid):
    """The teacher log-probs as before the dedup: one LM-head row per (anchor, step)."""
    return teacher_logprobs(bb, final[torch.arange(final.shape[0])[:, None, None], tpos][valid])


def _epochs(trainer: Trainer, steps: int) -> list[float]:
    times = []
    for _ in range(2 * steps):
        t0 = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (default: `vllm-ht prepare-model`'s)")
    p.add_argument("--steps", type=int, default=4, help="steps per epoch (the data holds steps x 8 sequences)")
    args = p.parse_args()
    model = str(args.model or default_model_dir())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _data(tmp / "data.jsonl", 8 * args.steps)
        rows = {}
        runs = (("uncached", {}, unique_teacher_logprobs),
                ("uncached, teacher/row", {}, _teacher_per_row),   # before: the LM head on every teacher row
                ("real-pass cache (bf16)", {"real_cache": str(tmp / "cache")}, unique_teacher_logprobs))
        for i, (name, extra, teacher) in enumerate(runs):
            cfg = TrainConfig(model=model, data=str(tmp / "data.jsonl"), out=str(tmp / f"run{i}"),
                              transfer_layers=[15, 15, 15], steps=1000, **extra)
            trainer = Trainer(cfg)
            with mock.patch.object(train_mod, "unique_teacher_logprobs", teacher):
                times = _epochs(trainer, args.steps)
            rows[name] = (statistics.median(times[: args.steps]), statistics.median(times[args.steps :]))
            if trainer.real_cache is not None:       # epoch 1 wrote every sequence, epoch 2 read them all
                cache = trainer.real_cache
                assert cache.misses == 8 * args.steps and cache.hits == 8 * args.steps, (cache.misses, cache.hits)
                print(f"real-pass cache: {cache.misses} sequences written, {cache.hits} read")
        base = rows["uncached"][1]
        print(f"{'':24} {'epoch 1 s/step':>15} {'epoch 2 s/step':>15} {'epoch 2 vs uncached':>20}")
        for name, (first, second) in rows.items():
            print(f"{name:24} {first:15.2f} {second:15.2f} {second / base:19.2f}x")


if __name__ == "__main__":
    main()
