"""Measured step costs: fitting `StepCost` to timed vLLM steps, and the file the plugin reads.

`vllm-ht calibrate` (vllm_ht/tools/calibrate.py) times decode steps of one engine on the user's
hardware: plain steps at several batch sizes, and HT steps with several forced trees. Each
measurement is the mean step period (ms) of `batch` requests, with, per request and step, the
draft rows and pseudo rows the steps carried, at a mean context length, and the share s of its
steps that carried any (default 1). Costs are in units of one single-request plain decode step
(p1). The fit (least squares, costs clipped at 0):
    plain   p(B) / p1 - 1                 = batch_row * (B - 1)
    HT      (h - p(B)) / p1               = s * fixed + B * (row * drafts + pseudo_row * pseudo
                                                             + s * context * ctx / 1000)
where an HT cell measured right after its own plain cell (plain_ms) uses that cell for p(B), and
p(B) divided by the sweep's p(B) / p1 for p1. At the long context that unit is the plain step at
that context, as the policy prices a plain step as 1 at every context.
Example: p(1) = 20 ms, p(4) = 23 ms -> batch_row = 0.05; an HT step at B = 1 with 3 drafts and 4
pseudo rows at 30 ms, one with 1 draft and 2 pseudo rows at 26 ms, and a third point pinning fixed.

The file: `$VLLM_HT_CACHE/calibration/<model folder name>-<dtype>.json` (default cache
~/.cache/vllm_ht), holding the fitted costs, the raw measurements and the hardware it ran on.
"""
from __future__ import annotations

import json
import platform
import re
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .models import cache_dir
from .policy import StepCost


# 2: cells that vary pseudo rows apart from draft rows, each priced against its own plain cell,
#    and the policy check (vllm_ht/tools/calibrate.py). Version-1 cells raised both together and
#    could not tell them apart: on a 2-core AVX2 CPU such a file priced pseudo rows and the fixed
#    step cost at 0.
VERSION = 2


def calibration_path(model: str, dtype: str) -> Path:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(str(model).rstrip("/")).name or "model")
    return cache_dir() / "calibration" / f"{name}-{str(dtype).removeprefix('torch.')}.json"


def fit_costs(plain: dict[int, float], ht: list[dict]) -> StepCost:
    """plain: batch size -> ms per plain decode step; ht: dicts with batch, ms, drafts, pseudo
    (per request and step), context (mean tokens), optionally ht_share (the share of the cell's
    steps with rows beyond plain decoding; default 1) and plain_ms (a plain step at the same batch
    size and context, measured right before it: the cell is then priced against it)."""
    if 1 not in plain:
        raise ValueError("calibration needs a plain step at batch size 1 (the unit of cost)")
    p1 = plain[1]
    xs = [b - 1 for b in plain if b > 1]
    ys = [plain[b] / p1 - 1 for b in plain if b > 1]
    batch_row = max(float(np.dot(xs, ys) / np.dot(xs, xs)), 0.0) if xs else 0.0
    if len(ht) < 3:
        raise ValueError(f"calibration needs at least 3 HT measurements, got {len(ht)}")
    a = np.array([[m.get("ht_share", 1.0), m["batch"] * m["drafts"], m["batch"] * m["pseudo"],
                   m.get("ht_share", 1.0) * m["batch"] * m["context"] / 1000] for m in ht])
    y = np.array([_extra(m, plain, batch_row) for m in ht])
    fixed, row, pseudo, context = _nonneg_lstsq(a, y)
    return StepCost(row=row, pseudo_row=pseudo, fixed=fixed, context=context, batch_row=batch_row)


def _extra(m: dict, plain: dict[int, float], batch_row: float) -> float:
    """An HT cell's extra over a plain step, in single-request plain steps: against its own plain
    cell when it has one (then that cell also sets the unit, plain_ms / (p(B) / p1) of the sweep:
    the machine's speed drifts between cells), else against the plain sweep."""
    sweep = _plain_at(plain, m["batch"], batch_row)
    base = m.get("plain_ms", sweep)
    return (m["ms"] - base) / (base * plain[1] / sweep)


def step_cost(cost: dict, drafts: float, pseudo: float, context: float = 0.0, share: float = 1.0) -> float:
    """A batch-1 step in plain steps under StepCost fields, as the fit models it: the fixed and
    context terms on the share of steps with rows, the row terms per row."""
    return 1.0 + share * (cost["fixed"] + cost["context"] * context / 1000) + cost["row"] * drafts \
        + cost["pseudo_row"] * pseudo


def _plain_at(plain: dict[int, float], batch: int, batch_row: float) -> float:
    return plain[batch] if batch in plain else plain[1] * (1 + batch_row * (batch - 1))


def _nonneg_lstsq(a: np.ndarray, y: np.ndarray) -> list[float]:
    """Least squares with every coefficient >= 0 (drop a negative one, refit; few columns)."""
    active = list(range(a.shape[1]))
    while True:
        coef = np.zeros(a.shape[1])
        if active:
            coef[active] = np.linalg.lstsq(a[:, active], y, rcond=None)[0]
        negative = [i for i in active if coef[i] < 0]
        if not negative:
            return [float(c) for c in coef]
        active.remove(min(negative, key=lambda i: coef[i]))


def save(path: Path, cost: StepCost, measurements: dict, meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"version": VERSION, "costs": asdict(cost), "measurements": measurements,
            "hardware": {"machine": platform.machine(), "processor": _cpu_name()}, **meta}
    path.write_text(json.dumps(body, indent=1))


def is_current(path: Path) -> bool:
    """Whether a calibration file exists and was made by this version's measurement design."""
    try:
        return json.loads(Path(path).read_text()).get("version", 1) >= VERSION
    except (OSError, ValueError, AttributeError, TypeError):
        return False


def load_costs(path: Path) -> dict | None:
    """The fitted StepCost fields from a calibration file, or None if there is none (or it is
    unreadable: the plugin then falls back to the defaults and says so)."""
    try:
        costs = json.loads(Path(path).read_text())["costs"]
        StepCost(**costs)          # validates
        return costs
    except (OSError, ValueError, KeyError, TypeError):
        return None


def additional_config(cost: StepCost) -> str:
    """The equivalent --additional-config for these costs."""
    return json.dumps({"vllm_ht": {"row_cost": round(cost.row, 4), "pseudo_row_cost": round(cost.pseudo_row, 4),
                                   "step_overhead": round(cost.fixed, 4), "context_cost": round(cost.context, 4),
                                   "batch_row_cost": round(cost.plain_row, 4)}})


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
