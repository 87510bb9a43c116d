"""Plots a device check's results: what an HT step costs next to a plain step, and how close the
tree-attention kernel gets to the GPU's copy rate.

    python scripts/device_plot.py RESULTS/device_check.json [--out RESULTS/device_check.png]

Left panel (stage 4): each tree step's wall time over the plain step's at the same batch and
context, both replayed from CUDA graphs (eager in a dry run), at the smallest context, per model and
batch. Right panel (stage 3): the kernel's KV read rate as a share of the device-to-device copy
rate, per batch and tree rows, at the largest context. Needs matplotlib (the project's venv has
it; the GPU image has it too).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def step_ratios(results: dict) -> tuple[dict, int, str]:
    """({model: {batch: [(label, tree step ms / plain step ms)]}}, context, mode) from stage 4, at
    the smallest context, graph-replayed where the run captured graphs (a dry run has none)."""
    models = results["stages"]["step_costs"]["models"]
    all_steps = [s for m in models.values() for s in m["steps"]]
    context = min(s["context"] for s in all_steps)
    mode = "graph" if any(s["mode"] == "graph" for s in all_steps) else "eager"
    out: dict = {}
    for model, m in models.items():
        steps = [s for s in m["steps"] if s["context"] == context and s["mode"] == mode]
        plain = {s["batch"]: s["step_ms"] for s in steps if s["nodes"] == 0}
        per_batch: dict = {}
        for s in steps:
            if s["nodes"] == 0 or s["batch"] not in plain:
                continue
            label = f"tree {s['nodes']}" + (f" + {s['pseudo_rows']} pseudo" if s["pseudo_rows"] else "")
            per_batch.setdefault(s["batch"], []).append((label, s["step_ms"] / plain[s["batch"]]))
        out[model] = per_batch
    return out, context, mode


def roofline_shares(results: dict) -> tuple[dict, int]:
    """({rows: [(batch, % of copy rate)]}, context) from stage 3, at its largest context."""
    points = results["stages"]["roofline"]["points"]
    context = max(p["context"] for p in points)
    out: dict = {}
    for p in points:
        if p["context"] == context:
            out.setdefault(p["rows"], []).append((p["batch"], p["pct_of_copy"]))
    return out, context


def plot(results: dict, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios, context, mode = step_ratios(results)
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    labels = sorted({lab for per in ratios.values() for rows in per.values() for lab, _ in rows},
                    key=lambda s: (int(s.split()[1]), "pseudo" in s))
    groups = [(model, batch) for model, per in ratios.items() for batch in sorted(per)]
    width = 0.8 / max(1, len(labels))
    for i, label in enumerate(labels):
        ys = [dict(ratios[m][b]).get(label, float("nan")) for m, b in groups]
        left.bar([g + (i - (len(labels) - 1) / 2) * width for g in range(len(groups))], ys, width, label=label)
    left.axhline(1.0, color="black", lw=0.8)
    left.set_xticks(range(len(groups)), [f"{m}\nB={b}" for m, b in groups], fontsize=8)
    left.set_ylabel(f"step time / plain step (both {'graph-replayed' if mode == 'graph' else 'eager'})")
    left.set_title(f"HT step cost, plain-torch Llama, context {context}")
    if labels:
        left.legend(fontsize=7, ncol=2)

    shares, roof_context = roofline_shares(results)
    for rows, pts in sorted(shares.items()):
        pts.sort()
        right.plot([b for b, _ in pts], [s for _, s in pts], marker="o", label=f"{rows} query rows")
    right.set_xscale("log", base=2)
    right.set_xlabel("batch (sequences)")
    right.set_ylabel("KV read rate, % of device copy rate")
    roof = results["stages"]["roofline"]
    right.set_title(f"tree_paged_attention, {roof.get('dtype', '?')} {roof.get('heads', '?')}, context {roof_context}")
    if shares:
        right.legend(fontsize=8)
    env = results["stages"]["environment"]
    fig.suptitle(f"device check on {env.get('device_name', '?')} ({results.get('started', '')[:10]})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path, help="a device_check.json")
    p.add_argument("--out", type=Path, default=None, help="PNG path (default: beside the JSON)")
    args = p.parse_args()
    results = json.loads(args.results.read_text())
    print(plot(results, args.out or args.results.with_suffix(".png")))


if __name__ == "__main__":
    main()
