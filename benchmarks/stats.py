"""The statistics of benchmarks/throughput.py: per-round ratios against the same round's plain
engine, their median and spread across rounds, and a verdict that a speedup must earn against an
A/A control. Pure functions on the engines' JSON (vllm_ht/tools/offline.py); no engine runs here.

Glossary
  label     a method as the benchmark names it: "plain", "plain-A/A" (a second, independent plain
            engine: the control), "ngram", "ht".
  round     every label runs once, each in a fresh engine process, in the order round_order() gives.
  cell      one (label, round, batch size) measurement: output tokens over wall time.
  ratio     a cell's tokens/s over the tokens/s of "plain" at the same batch size in the same round
            (never over plain-A/A: the control is measured, it is not a baseline).
  spread    min..max of a label's ratios over the rounds.
  A/A band  [min(1, lowest A/A ratio), max(1, highest A/A ratio)] at that batch size: how far apart
            two engines running the same computation land on this machine.

Verdict rule, per label and batch size (needs >= 2 rounds; fewer give "n/a"):
  faster        every round's ratio is above the A/A band   (min ratio > band high)
  slower        every round's ratio is below the A/A band   (max ratio < band low)
  within noise  otherwise: at least one round overlaps what plain-vs-plain already produces
"plain" itself is "baseline" and "plain-A/A" is "control".
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from vllm_ht.tools.offline import tokens_per_step

PLAIN, AA = "plain", "plain-A/A"
MIN_TOKENS = 300  # output tokens per cell and round below which tokens/s is mostly start/stop noise
VERDICT_RULE = ("faster if every round's ratio > max(1, max A/A ratio); slower if every round's ratio "
                "< min(1, min A/A ratio); else within noise (>= 2 rounds)")


@dataclass
class Cell:
    """One (label, round, batch size) measurement, with its ratio to the same round's plain."""

    method: str
    round: int
    position: int                     # index in that round's engine order
    batch_size: int
    output_tokens: int
    seconds: float
    output_tokens_per_s: float
    speedup: float | None             # over plain, same round and batch size (None without plain)
    identical_to_plain: float | None  # fraction of requests equal to plain's of the same round
    num_drafts: int
    num_accepted: int
    mean_accepted_length: float | None
    acceptance_per_depth: list[float]
    ttft_ms: float | None
    tpot_ms: float | None
    requests: int
    startup_s: float


@dataclass
class Row:
    """One (label, batch size) over all rounds: medians, the spread and the verdict."""

    method: str
    batch_size: int
    output_tokens_per_s: float        # median over rounds
    speedup: float | None             # median of the per-round ratios
    speedup_min: float | None
    speedup_max: float | None
    aa_low: float | None              # the A/A band at this batch size
    aa_high: float | None
    verdict: str
    mean_accepted_length: float | None  # pooled: 1 + all accepted / all drafts
    tokens_per_step: float | None       # pooled: all tokens / (all tokens - all accepted), drafting or not
    acceptance_per_depth: list[float]   # pooled, weighted by drafts
    identical_to_plain: float | None    # lowest over rounds
    ttft_ms: float | None               # median over rounds
    tpot_ms: float | None
    output_tokens: int                  # fewest over rounds
    requests: int
    seconds: float                      # median over rounds
    startup_s: float                    # median over rounds
    num_drafts: int                     # all rounds
    rounds: int
    speedup_per_round: list[float | None] = field(default_factory=list)


def cycle_labels(methods: list[str]) -> list[str]:
    """Round 0's engine order: plain first, the other methods, plain-A/A halfway around the cycle
    (so the control is as far from its baseline as a method is). ["ngram", "ht"] ->
    ["plain", "ngram", "plain-A/A", "ht"]."""
    labels = [PLAIN] + [m for m in dict.fromkeys(methods) if m not in (PLAIN, AA)]
    labels.insert((len(labels) + 1) // 2, AA)
    return labels


def round_order(labels: list[str], r: int) -> list[str]:
    """Round r runs the labels rotated left by r: [a, b, c], r=1 -> [b, c, a]; r=3 -> [a, b, c]."""
    k = r % len(labels)
    return labels[k:] + labels[:k]


def round_cells(r: int, order: list[str], results: dict[str, dict], batch_sizes: list[int]) -> list[Cell]:
    """The cells of round r from each label's engine JSON (vllm_ht.tools.offline: runs keyed by the
    batch size, as a string once it went through JSON)."""
    def run_of(res: dict, bs: int) -> dict:
        return res["runs"][str(bs)] if str(bs) in res["runs"] else res["runs"][bs]

    cells = []
    for label in order:
        res = results[label]
        for bs in batch_sizes:
            run = run_of(res, bs)
            tps = run["output_tokens"] / run["seconds"]
            speedup = identical = None
            if PLAIN in results:
                base = run_of(results[PLAIN], bs)
                speedup = tps / (base["output_tokens"] / base["seconds"])
                same = [a == b for a, b in zip(run["outputs"], base["outputs"])]
                identical = sum(same) / len(same) if same else None
            cells.append(Cell(method=label, round=r, position=order.index(label), batch_size=bs,
                              output_tokens=run["output_tokens"], seconds=run["seconds"], output_tokens_per_s=tps,
                              speedup=speedup, identical_to_plain=identical, num_drafts=run.get("num_drafts") or 0,
                              num_accepted=run.get("num_accepted") or 0,
                              mean_accepted_length=run["mean_accepted_length"],
                              acceptance_per_depth=list(run["acceptance_per_depth"]), ttft_ms=run.get("ttft_ms"),
                              tpot_ms=run.get("tpot_ms"), requests=len(run["outputs"]),
                              startup_s=res["startup_seconds"]))
    return cells


def median(values) -> float | None:
    """Median of the values that are not None (mean of the middle two for an even count)."""
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def aa_band(aa_ratios: list[float]) -> tuple[float, float] | None:
    """The A/A band: the A/A ratios' range widened to include 1.0. [0.97, 1.05] -> (0.97, 1.05);
    [1.02, 1.06] -> (1.0, 1.06). None without A/A ratios."""
    if not aa_ratios:
        return None
    return min(1.0, *aa_ratios), max(1.0, *aa_ratios)


def verdict(label: str, ratios: list[float], band: tuple[float, float] | None) -> str:
    """The rule of the module docstring."""
    if label == PLAIN:
        return "baseline"
    if label == AA:
        return "control"
    if band is None or len(ratios) < 2:
        return "n/a"
    if min(ratios) > band[1]:
        return "faster"
    if max(ratios) < band[0]:
        return "slower"
    return "within noise"


def aggregate(cells: list[Cell], labels: list[str]) -> list[Row]:
    """One Row per (label, batch size): plain, plain-A/A, then the others in the order of `labels`;
    batch sizes ascending within a label."""
    labels = [PLAIN, AA] + [label for label in labels if label not in (PLAIN, AA)]
    groups: dict[tuple[str, int], list[Cell]] = {}
    for c in cells:
        groups.setdefault((c.method, c.batch_size), []).append(c)
    rows = []
    for (label, bs), mine in sorted(groups.items(), key=lambda kv: (labels.index(kv[0][0]), kv[0][1])):
        mine.sort(key=lambda c: c.round)
        ratios = [c.speedup for c in mine if c.speedup is not None]
        band = aa_band([c.speedup for c in groups.get((AA, bs), []) if c.speedup is not None])
        drafts = sum(c.num_drafts for c in mine)
        depth = max((len(c.acceptance_per_depth) for c in mine), default=0)
        pooled = [sum(c.acceptance_per_depth[d] * c.num_drafts for c in mine if d < len(c.acceptance_per_depth))
                  / drafts for d in range(depth)] if drafts else []
        identical = [c.identical_to_plain for c in mine if c.identical_to_plain is not None]
        rows.append(Row(
            method=label, batch_size=bs, output_tokens_per_s=median(c.output_tokens_per_s for c in mine),
            speedup=median(ratios), speedup_min=min(ratios, default=None), speedup_max=max(ratios, default=None),
            aa_low=band[0] if band else None, aa_high=band[1] if band else None, verdict=verdict(label, ratios, band),
            mean_accepted_length=1 + sum(c.num_accepted for c in mine) / drafts if drafts else None,
            tokens_per_step=tokens_per_step(sum(c.output_tokens for c in mine), sum(c.num_accepted for c in mine)),
            acceptance_per_depth=pooled, identical_to_plain=min(identical, default=None),
            ttft_ms=median(c.ttft_ms for c in mine), tpot_ms=median(c.tpot_ms for c in mine),
            output_tokens=min(c.output_tokens for c in mine), requests=mine[0].requests,
            seconds=median(c.seconds for c in mine), startup_s=median(c.startup_s for c in mine),
            num_drafts=drafts, rounds=len(mine), speedup_per_round=[c.speedup for c in mine]))
    return rows


def short_cells(cells: list[Cell], minimum: int = MIN_TOKENS) -> list[tuple[str, int, int]]:
    """(label, batch size, fewest output tokens in a round) for every pair that measured fewer than
    `minimum` output tokens in some round."""
    fewest: dict[tuple[str, int], int] = {}
    for c in cells:
        key = (c.method, c.batch_size)
        fewest[key] = min(fewest.get(key, c.output_tokens), c.output_tokens)
    return [(label, bs, n) for (label, bs), n in fewest.items() if n < minimum]
