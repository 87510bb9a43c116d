"""Per-category view of a throughput run: tau, tokens per step and speedup per prompt category (the
prompts' "category" / "kind" field), from the engines' single-request chunks (batch 1: every chunk is one
request, so its time, tokens and drafts belong to one category). Batches of several requests mix
categories and are left out. Speedup per category and round: the method's tokens/s over the same
round's plain tokens/s on the same prompts; the row gives the median over rounds."""
from __future__ import annotations

from benchmarks.stats import AA, PLAIN, median
from vllm_ht.tools.offline import tokens_per_step


def category_rows(rounds: list[dict[str, dict]]) -> list[dict]:
    """rounds: per round, label -> the engine's JSON (vllm_ht.tools.offline). One row per
    (method, category): tokens/s, speedup (median over rounds), tau, tokens per step and the speedup
    per round."""
    per: dict[tuple[str, str], dict] = {}
    for r, results in enumerate(rounds):
        totals = {label: _totals(res) for label, res in results.items()}
        for label, cats in totals.items():
            for cat, t in cats.items():
                row = per.setdefault((label, cat), {"method": label, "category": cat, "tokens": 0, "seconds": 0.0,
                                                    "drafts": 0, "accepted": 0, "speedups": []})
                for k in ("tokens", "seconds", "drafts", "accepted"):
                    row[k] += t[k]
                base = totals.get(PLAIN, {}).get(cat)
                if base and base["seconds"] and t["seconds"]:
                    row["speedups"].append((t["tokens"] / t["seconds"]) / (base["tokens"] / base["seconds"]))
    rows = []
    for row in per.values():
        rows.append({"method": row["method"], "category": row["category"],
                     "output_tokens_per_s": row["tokens"] / row["seconds"] if row["seconds"] else None,
                     "speedup": median(row["speedups"]), "speedup_per_round": row["speedups"],
                     "mean_accepted_length": 1 + row["accepted"] / row["drafts"] if row["drafts"] else None,
                     "tokens_per_step": tokens_per_step(row["tokens"], row["accepted"]),
                     "output_tokens": row["tokens"]})
    return sorted(rows, key=lambda x: (x["category"], x["method"]))


def _totals(res: dict) -> dict[str, dict]:
    cats = res.get("categories") or []
    run = res["runs"].get("1") or res["runs"].get(1)
    out: dict[str, dict] = {}
    if run is None or not any(cats):
        return out
    for c in run.get("chunks", []):
        if c["size"] != 1 or c["start"] >= len(cats) or cats[c["start"]] is None:
            continue
        t = out.setdefault(cats[c["start"]], {"tokens": 0, "seconds": 0.0, "drafts": 0, "accepted": 0})
        t["tokens"] += c["output_tokens"]
        t["seconds"] += c["seconds"]
        t["drafts"] += c["num_drafts"]
        t["accepted"] += c["num_accepted"]
    return out


def category_table(rows: list[dict]) -> str:
    head = f"{'category':<12} {'method':<10} {'tok/s':>8} {'speedup':>8} {'tau':>5} {'tok/step':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["method"] == AA:
            continue
        sp = f"{r['speedup']:.2f}x" if r["speedup"] is not None else "-"
        tau = f"{r['mean_accepted_length']:.2f}" if r["mean_accepted_length"] is not None else "-"
        tps = f"{r['output_tokens_per_s']:.1f}" if r["output_tokens_per_s"] else "-"
        per_step = f"{r['tokens_per_step']:.2f}" if r.get("tokens_per_step") is not None else "-"
        lines.append(f"{r['category']:<12} {r['method']:<10} {tps:>8} {sp:>8} {tau:>5} {per_step:>8}")
    return "\n".join(lines)
