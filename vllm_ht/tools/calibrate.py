"""`vllm-ht calibrate`: time plain and HT decode steps in vLLM on this machine, fit StepCost, save.

One HT engine (compiled unless --enforce-eager, as `vllm serve` runs), timed from inside its
worker (vllm_ht/vllm/step_timing.py). Its trees are switched at run time: no drafts (plain steps: the HT
model with no pseudo rows is the plain model), then forced trees. Measured cells (`cell_plan`):
  plain   every batch size at a short context, each next to a batch-1 plain cell
  HT      batch 1: trees of 1-16 drafts, each with few and with many anchors, so draft rows and
          pseudo rows vary apart (`HT_TREES_AT_1`); batch 2..: 2 drafts, 1 anchor, and up to batch
          4 also 6 drafts, 2 anchors; batch 1 at the long context (3 drafts, 2 anchors: the context term).
          Lookup chains are off in these cells, so their draft rows are the tree's.
Every HT cell follows a plain cell at the same batch size and context, and is priced against it
(`plain_ms`): the machine's speed drifts between cells (plain steps at batch 1 measured 81-101 ms
within one calibration on a 2-core VM), and a drift between a plain sweep and the HT cells read as
a cheaper HT step. A cell's step time is the mean step period, with the mean rows per step and the
share of steps that carried any (`ht_share`: in a forced-tree cell some steps carry pseudo rows
only; in a served cell some carry nothing), as the policy prices a step.

The fit's check: the policy then plans with the fitted costs, one cell runs that plan as served
(lookup chains on), the predicted and measured step costs are printed, and the cell joins a second
fit when it drafted. The fit and the file are in vllm_ht/calibration.py.
"""
from __future__ import annotations

import inspect
import os
import statistics
import time
from dataclasses import asdict

from tqdm import tqdm

# (drafts, anchors) at batch 1. Each anchor carries min(k, depth) pseudo rows. Pairs with few and
# many anchors per tree keep the pseudo-row term apart from the draft-row term: cells where both
# rose together fit a pseudo row at cost 0 (fixed 0 too), the policy then gave every tree node an
# anchor, and its served steps cost 2.2 plain steps against a predicted 1.5 (2-core AVX2 CPU).
HT_TREES_AT_1 = ((1, 1), (2, 1), (2, 3), (4, 1), (4, 5), (8, 2), (8, 9), (16, 3), (16, 12))
HT_TREE_BATCHED = (2, 1)


def cell_plan(batch_sizes: list[int], short: int, long: int) -> list[tuple]:
    """The cells in the order they run: (kind, batch, context, drafts, anchors, priced). `priced`:
    the cell is priced against the plain cell right before it: every HT cell (a plain cell of its
    own batch size and context) and the plain sweep's cells above batch 1 (a batch-1 cell). The
    plain cells that precede HT cells are not priced themselves."""
    jobs = []
    for b in batch_sizes:
        jobs += [("plain", 1, short, 0, None, False)] + ([("plain", b, short, 0, None, True)] if b > 1 else [])
    ht = [(1, short, n, a) for n, a in HT_TREES_AT_1]
    ht += [(b, short, *HT_TREE_BATCHED) for b in batch_sizes if b > 1]
    ht += [(b, short, 6, 2) for b in batch_sizes if 1 < b <= 4]          # tree rows at batch > 1
    ht += [(1, long, 3, 2)]
    for b, ctx, n, a in ht:
        jobs += [("plain", b, ctx, 0, None, False), ("ht", b, ctx, n, a, True)]
    return jobs


def _text_tokens(tokenizer, length: int, offset: int) -> list[int]:
    """Real text (Python's own argparse source; always installed) of exactly `length` tokens."""
    import argparse

    ids = tokenizer.encode(inspect.getsource(argparse))
    start = (offset * 331) % max(len(ids) - length, 1)
    return (ids[start : start + length] * (length // max(len(ids), 1) + 2))[:length]


def calibrate(model: str, checkpoint: str | None, dtype: str, batch_sizes: list[int], short: int, long: int,
              steps: int, enforce_eager: bool) -> tuple:
    """(cells, startup seconds, engine dtype, policy check): every cell of `cell_plan`, each HT one
    with the `plain_ms` of the plain cell before it; the check is `check_policy`'s."""
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")     # collective_rpc of the timer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from ..vllm import step_timing
    from ..vllm.engine_args import ht_engine_kwargs

    kw = ht_engine_kwargs(model, checkpoint=checkpoint, num_nodes=None)
    t0 = time.perf_counter()
    llm = LLM(model=model, dtype=dtype, max_model_len=long + steps + 64, seed=0, enforce_eager=enforce_eager,
              max_num_seqs=max(batch_sizes), **kw)
    startup = time.perf_counter() - t0
    tok = llm.get_tokenizer()
    llm.collective_rpc(step_timing.install)
    params = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True)

    def cell(batch: int, context: int, drafts: int | None, anchors: int | None, lookup: int | None = 0) -> dict:
        llm.collective_rpc(step_timing.set_plan, args=(drafts, anchors, lookup))
        prompts = [TokensPrompt(prompt_token_ids=_text_tokens(tok, context, i)) for i in range(batch)]
        llm.collective_rpc(step_timing.collect)
        llm.generate(prompts, params, use_tqdm=False)
        recs = [r for r in llm.collective_rpc(step_timing.collect)[0]
                if r["decode"] and r["reqs"] == batch and "period" in r]
        if not recs:
            raise RuntimeError(f"calibration: no steady decode step at batch {batch}, context {context}")
        return summarize(recs, batch, context)

    cell(1, 64, 0, None)                                                        # warm-up
    cell(1, 64, 4, 2)
    results = []
    for kind, b, ctx, n, a, priced in tqdm(cell_plan(batch_sizes, short, long), desc="calibrate", unit="cell"):
        r = {"kind": kind, "num_nodes": n, "pseudo_nodes": a, **cell(b, ctx, n, a)}
        if priced:
            r["plain_ms"] = results[-1]["ms"]
        results.append(r)
    check = check_policy(results, short, lambda costs: llm.collective_rpc(step_timing.set_cost, args=(costs,)),
                         lambda: cell(1, short, 0, None), lambda: cell(1, short, None, None, None))
    llm.collective_rpc(step_timing.set_plan, args=(None, None, None))
    return results, startup, str(llm.llm_engine.model_config.dtype).removeprefix("torch."), check


def summarize(recs: list[dict], batch: int, context: int) -> dict:
    """One cell from its steady decode steps: mean period; draft / pseudo rows per request and
    step; the share of steps with any rows beyond plain decoding (those pay the fixed HT cost)."""
    return {"batch": batch, "context": context, "ms": statistics.mean(r["period"] for r in recs),
            "drafts": statistics.mean(r["drafts"] for r in recs) / batch,
            "pseudo": statistics.mean(r.get("pseudo", 0) for r in recs) / batch,
            "ht_share": statistics.mean(float(bool(r["drafts"] or r.get("pseudo", 0))) for r in recs),
            "steps": len(recs)}


def check_policy(results: list[dict], short: int, set_cost, plain_cell, policy_cell) -> dict:
    """Fit, let the engine's policy plan with the fit at batch 1, run that plan as served after a
    plain cell, and refit with it: {predicted, measured (plain steps per step), drafting, cell,
    costs of both fits}. A drafting cell is appended to `results` (one that does not draft ran
    plain steps, and is only reported)."""
    from ..calibration import step_cost

    first = fit(results, short)
    set_cost(asdict(first))
    plain = plain_cell()
    served = {"kind": "policy", "num_nodes": None, "pseudo_nodes": None, **policy_cell(), "plain_ms": plain["ms"]}
    drafting = served["ht_share"] > 0
    predicted = step_cost(asdict(first), served["drafts"], served["pseudo"], served["context"], served["ht_share"])
    if drafting:                       # a plan without drafts runs plain steps: nothing to refit
        results.append(served)
    second = fit(results, short)
    set_cost(asdict(second))
    return {"predicted": predicted, "measured": served["ms"] / plain["ms"], "drafting": drafting, "cell": served,
            "first_fit": asdict(first), "refit": asdict(second)}


def fit(results: list[dict], short: int):
    """StepCost from the cells: batch-1 plain cells at the short context give the unit (median),
    plain cells above batch 1 the batch-row term (each against the batch-1 cell before it), HT and
    policy cells the rest (each against its own plain cell)."""
    from ..calibration import fit_costs

    plain_cells = [r for r in results if r["kind"] == "plain" and r["context"] == short]
    p1 = statistics.median(r["ms"] for r in plain_cells if r["batch"] == 1)
    plain = {1: p1}
    for b in sorted({r["batch"] for r in plain_cells if r["batch"] > 1 and "plain_ms" in r}):
        plain[b] = p1 * statistics.median(r["ms"] / r["plain_ms"] for r in plain_cells
                                          if r["batch"] == b and "plain_ms" in r)
    return fit_costs(plain, [r for r in results if r["kind"] in ("ht", "policy")])
