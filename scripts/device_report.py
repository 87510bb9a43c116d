"""The device check's readable report, from its JSON (device_check.py's `results`)."""
from __future__ import annotations


def table(headers: list[str], rows: list[list]) -> str:
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _fmt(c) -> str:
    if c is None:
        return "-"
    if isinstance(c, float):
        return f"{c:.3g}" if abs(c) < 1e4 else f"{c:.0f}"
    return str(c)


def _summary(name: str, r: dict) -> str:
    if r.get("status") == "failed":
        return r.get("error", "")[:90]
    if name == "environment":
        return f"{r.get('device_name')}, {r.get('sm_count')} SMs, copy {r.get('copy_gbps')} GB/s (read+write)"
    if name in ("correctness", "graph", "roofline"):
        n, bad = r.get("checks_run", 0), r.get("checks_failed", 0)
        return f"{n - bad}/{n} checks passed" + ("  TRUNCATED" if r.get("truncated") else "")
    if name == "step_costs":
        return f"{len(r.get('models', {}))} model shapes; graph: {r.get('graph')}" + \
            ("  TRUNCATED" if r.get("truncated") else "")
    return ""


def _correctness(r: dict) -> list[str]:
    out = []
    worst = {}
    for c in r.get("attention", []):
        worst[c["dtype"]] = max(worst.get(c["dtype"], 0.0), c["max_err_over_tol"])
    if worst:
        out.append("worst |err| / tolerance per dtype (<= 1 passes): "
                   + ", ".join(f"{d} {w:.3g}" for d, w in sorted(worst.items())))
    bad = [c["name"] for c in r.get("attention", []) if not c["ok"]]
    bad += [f"compact {c['kind']} {c['dtype']}" for c in r.get("compact", []) if not c["ok"]]
    if bad:
        out.append("FAILED: " + ", ".join(bad))
    return out


def _roofline(r: dict) -> list[str]:
    rows = [[p["batch"], p["context"], p["rows"], p.get("splits"), p["kernel_us"], p["kernel_gbps"],
             p["pct_of_copy"], p["sdpa_us"], p["sdpa_over_kernel"], "yes" if p["sdpa_agrees"] else "NO"]
            for p in r.get("points", [])]
    head = f"tree attention, {r.get('dtype')} {r.get('heads')}, block size {r.get('block_size')} " \
           f"(copy rate {r.get('copy_gbps')} GB/s)"
    return [head, table(["B", "ctx", "rows", "splits", "kernel us", "GB/s", "% copy", "SDPA us", "SDPA/kernel",
                         "agree"], rows)] if rows else []


def _steps(r: dict) -> list[str]:
    out = []
    for name, m in r.get("models", {}).items():
        steps = m.get("steps", [])
        for mode in ("eager", "graph"):
            mine = [s for s in steps if s["mode"] == mode]
            if not mine:
                continue
            cols = sorted({(s["batch"], s["context"]) for s in mine})
            kinds = sorted({(s["nodes"], s["anchors"]) for s in mine})
            grid = {(s["nodes"], s["anchors"], s["batch"], s["context"]): s for s in mine}
            label = lambda n, a: "plain" if not n else f"tree {n}" + (f" + {a}x3 pseudo" if a else "")
            rows = [[label(n, a)] + [grid[(n, a) + c]["step_ms"] if (n, a) + c in grid else None for c in cols]
                    for n, a in kinds]
            out += [f"{name}, {mode}: step ms (host prepare + launch + wait) per B x ctx",
                    table(["step"] + [f"B{b} c{c}" for b, c in cols], rows)]
            host = lambda s: f"{s['prepare_ms']:.2g}/{s['launch_ms']:.2g}"
            rows = [[label(n, a)] + [host(grid[(n, a) + c]) if (n, a) + c in grid else None for c in cols]
                    for n, a in kinds]
            out += [f"{name}, {mode}: host ms, prepare / launch",
                    table(["step"] + [f"B{b} c{c}" for b, c in cols], rows)]
        fits = m.get("step_cost") or {}
        rows = [[k] + ([f.get(x) for x in ("unit_ms", "batch_row", "fixed", "row", "pseudo_row", "context",
                                             "rms_residual")] if f else ["not enough data"] + [None] * 6)
                for k, f in fits.items()]
        if rows:
            out += [f"{name}: StepCost (units of a B=1 plain step)",
                    table(["fit", "unit ms", "batch_row", "fixed", "row", "pseudo_row", "context/1k", "rms resid"],
                          rows)]
    return out


def report(results: dict) -> str:
    stages = results["stages"]
    env = stages.get("environment", {})
    where = "dry run, CPU" if results["dry_run"] else env.get("device_name", results["device"])
    lines = [(f"device check ({where}): torch {env.get('torch', '?')}, triton {env.get('triton', '?')}, "
              f"python {env.get('python', '?')}, started {results.get('started')}"),
             table(["stage", "status", "seconds", "summary"],
                   [[n, r.get("status"), r.get("seconds"), _summary(n, r)] for n, r in stages.items()])]
    for name, part in (("correctness", _correctness), ("roofline", _roofline), ("step_costs", _steps)):
        if name in stages:
            lines += [""] + part(stages[name])
    for c in stages.get("graph", {}).get("cases", []):
        if not c.get("ok"):
            lines.append(f"graph case FAILED: {c}"[:300])
    for n, r in stages.items():
        if r.get("status") == "failed":
            lines += ["", f"{n} failed:", r.get("traceback", "")[-1500:]]
    lines += ["", (f"checks failed: {results.get('checks_failed')}, stages failed: {results.get('stages_failed')}, "
                   f"{results.get('seconds')} s, exit code {results.get('exit_code')}")]
    return "\n".join(lines)
