"""The learning curve of a training run: held-out top-1 per depth against anchors seen.

`vllm-ht train` saves the projections at every `--save-every` step (`<run>/snapshots/step_N.pt`,
train.py); `vllm-ht eval-drafts --curve RUN` evaluates each snapshot on the held-out set and writes
`<run>/learning_curve.json` and `.png`. Snapshots evaluated before are read back from the JSON, so
a curve of a running (or resumed) training grows by the new snapshots only (for the same held-out set).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..config import HiddenTransferConfig
from ..projections import TransferProjections
from .evaluate import evaluate, ht_drafter
from .train import CURVE_FILE, SNAPSHOT_DIR, STATE_FILE


def run_config(run: Path, model_config) -> HiddenTransferConfig:
    """The HT config of a run (k, transfer layers, bias, fused layers) from its state.pt, for this model."""
    cfg = torch.load(run / STATE_FILE, weights_only=False)["cfg"]
    return HiddenTransferConfig.for_model(model_config, num_steps=cfg["num_steps"],
                                          transfer_layers=cfg["transfer_layers"], bias=cfg["bias"],
                                          fuse_layers=cfg.get("fuse_layers", []))


def learning_curve(bb, run: Path, seqs: list, progress: bool = True) -> list[dict]:
    """One row per snapshot, in step order: {"step", "anchors_seen", "top1": [per depth], "top5"}."""
    path = run / CURVE_FILE
    key = hashlib.sha1(json.dumps([s.ids for s in seqs]).encode()).hexdigest()   # which held-out set
    saved = json.loads(path.read_text()) if path.is_file() else {}
    done = {row["step"]: row for row in saved.get("rows", [])} if saved.get("key") == key else {}
    config = run_config(run, bb.model.config)
    for snap in sorted((run / SNAPSHOT_DIR).glob("step_*.pt")):
        state = torch.load(snap, weights_only=False)
        if state["step"] in done:
            continue
        projections = TransferProjections(config)
        projections.load_state_dict(state["projections"])
        res = evaluate(bb, config, {"ht": ht_drafter(bb, projections, config)}, seqs, progress=progress)["ht"]
        depths = range(1, res.num_steps + 1)
        done[state["step"]] = {"step": state["step"], "anchors_seen": state["anchors_seen"],
                               "top1": [round(res.topr(d, 1), 4) for d in depths],
                               "top5": [round(res.topr(d, 5), 4) for d in depths]}
        rows = [done[s] for s in sorted(done)]
        path.write_text(json.dumps({"key": key, "rows": rows}) + "\n")      # after every snapshot
    return [done[s] for s in sorted(done)]


def plot_learning_curve(rows: list[dict], path: Path) -> Path:
    import matplotlib.ticker

    from .plots import _save, plt

    fig, ax = plt.subplots(figsize=(6, 4))
    # the x axis is logarithmic: a start at 0 anchors (a run continued from a checkpoint without
    # provenance) has no place on it, and stays in the JSON only
    rows = [r for r in rows if r["anchors_seen"] > 0]
    anchors = [r["anchors_seen"] for r in rows]
    for d in range(len(rows[0]["top1"]) if rows else 0):
        ax.plot(anchors, [r["top1"][d] for r in rows], marker="o", label=f"depth {d + 1} top-1")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x / 1000:g}k"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(
        lambda x, _: f"{x / 1000:g}k" if str(int(x))[0] in "25" else ""))      # 20k, 50k, 200k, 500k ...
    return _save(fig, ax, "anchors seen in training", "top-1 on held-out responses", path)
