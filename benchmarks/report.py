"""What benchmarks/throughput.py shows: the table it prints and the PNG it writes beside its JSON.
The rows and cells are benchmarks/stats.py's (as dicts, the way they go into the JSON)."""
from __future__ import annotations

from pathlib import Path

from benchmarks.stats import AA, PLAIN


def _fmt(v, spec: str) -> str:
    return format(v, spec) if v is not None else "-"


def _range(lo, hi) -> str:
    return f"{lo:.2f}-{hi:.2f}" if lo is not None and hi is not None else "-"


def table(rows: list[dict]) -> str:
    """Median tok/s and speedup over the rounds, the speedup's spread (min-max), the A/A band at
    that batch size and the verdict; then tau, tokens per step, latencies, identity and acceptance
    (pooled)."""
    head = (f"{'method':<9} {'batch':>5} {'tok/s':>8} {'speedup':>8} {'spread':>9} {'A/A band':>9} "
            f"{'verdict':<12} {'tau':>5} {'tok/step':>8} {'TTFT ms':>8} {'TPOT ms':>8} {'identical':>9}  "
            "acceptance per depth")
    lines = [head, "-" * len(head)]
    for r in rows:
        depth = " ".join(f"{a:.2f}" for a in r["acceptance_per_depth"]) or "-"
        speedup = _fmt(r["speedup"], ".2f") + ("x" if r["speedup"] is not None else "")
        lines.append(f"{r['method']:<9} {r['batch_size']:>5} {r['output_tokens_per_s']:>8.1f} {speedup:>8} "
                     f"{_range(r['speedup_min'], r['speedup_max']):>9} {_range(r['aa_low'], r['aa_high']):>9} "
                     f"{r['verdict']:<12} {_fmt(r['mean_accepted_length'], '.2f'):>5} "
                     f"{_fmt(r.get('tokens_per_step'), '.2f'):>8} "
                     f"{_fmt(r['ttft_ms'], '.0f'):>8} {_fmt(r['tpot_ms'], '.1f'):>8} "
                     f"{_fmt(r['identical_to_plain'], '.0%'):>9}  {depth}")
    return "\n".join(lines)


def plot(rows: list[dict], cells: list[dict], meta: dict, path: Path) -> None:
    """Left: every round's ratio as a point, the median as a line, the A/A band shaded. Right:
    acceptance per depth (pooled over rounds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    band = sorted((r["batch_size"], r["aa_low"], r["aa_high"]) for r in rows
                  if r["method"] == PLAIN and r["aa_low"] is not None)
    if band:
        left.fill_between([b[0] for b in band], [b[1] for b in band], [b[2] for b in band], color="grey",
                          alpha=0.2, label="A/A band (plain vs plain)")
    for i, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
        if method == PLAIN:
            continue
        color = "grey" if method == AA else f"C{i}"
        mine = [r for r in rows if r["method"] == method and r["speedup"] is not None]
        points = [c for c in cells if c["method"] == method and c["speedup"] is not None]
        left.scatter([c["batch_size"] for c in points], [c["speedup"] for c in points], s=14, alpha=0.5,
                     color=color)
        if mine:
            left.plot([r["batch_size"] for r in mine], [r["speedup"] for r in mine], marker="o", color=color,
                      ls=":" if method == AA else "-", label=f"{method} (median; points: rounds)")
        for r in rows:
            if r["method"] == method and r["acceptance_per_depth"]:
                depths = range(1, len(r["acceptance_per_depth"]) + 1)
                right.plot(depths, r["acceptance_per_depth"], marker="o", label=f"{method}, batch {r['batch_size']}")
    left.axhline(1.0, color="black", lw=0.8, ls="--")
    left.set_xscale("log", base=2)
    left.set(xlabel="batch size (concurrent requests)", ylabel="output tokens/s vs plain vLLM, same round",
             title=f"speedup, {meta['rounds']} rounds ({meta['dtype']}, {meta['hardware']['gpu'] or 'CPU'})")
    right.set(xlabel="draft depth", ylabel="accepted drafts per verification step", title="acceptance per depth")
    right.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    for ax in (left, right):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
