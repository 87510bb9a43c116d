"""PNG plots: draft accuracy per depth (HT vs Medusa) and the transfer-layer sweep."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def plot_depth_accuracy(results: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results.items():
        depths = list(range(1, r.num_steps + 1))
        ax.plot(depths, [r.topr(d, 1) for d in depths], marker="o", label=f"{name} top-1")
        ax.plot(depths, [r.topr(d, 5) for d in depths], marker="s", linestyle="--", label=f"{name} top-5")
    ax.set_ylim(0, 1)
    return _save(fig, ax, "depth (draft step)", "accuracy on held-out responses", path)


def plot_layer_sweep(rows: dict, path: Path) -> Path:
    layers = sorted(rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    for s in range(2):
        ax.plot(layers, [rows[layer]["top1"][s] for layer in layers], marker="o", label=f"step {s + 1} top-1")
    return _save(fig, ax, "transfer layer", "top-1 accuracy (held-out)", path)


def _save(fig, ax, xlabel: str, ylabel: str, path: Path) -> Path:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
