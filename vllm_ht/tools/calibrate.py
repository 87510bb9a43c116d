"""`vllm-ht calibrate`: time plain and HT decode steps in vLLM on this machine, fit StepCost, save.

One HT engine (compiled unless --enforce-eager, as `vllm serve` runs), timed from inside its
worker (vllm_ht/vllm/step_timing.py). Its trees are switched at run time: no drafts (plain steps: the HT
model with no pseudo rows is the plain model), then forced trees. Measured cells:
  plain   every batch size at a short context, and batch 1 at a long one
  HT      batch 1: 1, 3, 6 and 16 drafts (1, 2, 3, 3 anchors); batch 2..: 2 drafts, 1 anchor,
          and up to batch 4 also 6 drafts, 2 anchors; batch 1 at the long context (3 drafts,
          2 anchors: the context term)
The fit and the file are in vllm_ht/calibration.py.
"""
from __future__ import annotations

import inspect
import os
import statistics
import time

from tqdm import tqdm

HT_TREES_AT_1 = ((1, 1), (3, 2), (6, 3), (16, 3))      # (drafts, anchors): up to the policy's big trees
HT_TREE_BATCHED = (2, 1)


def _text_tokens(tokenizer, length: int, offset: int) -> list[int]:
    """Real text (Python's own argparse source; always installed) of exactly `length` tokens."""
    import argparse

    ids = tokenizer.encode(inspect.getsource(argparse))
    start = (offset * 331) % max(len(ids) - length, 1)
    return (ids[start : start + length] * (length // max(len(ids), 1) + 2))[:length]


def calibrate(model: str, checkpoint: str | None, dtype: str, batch_sizes: list[int], short: int, long: int,
              steps: int, enforce_eager: bool) -> tuple:
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

    def cell(batch: int, context: int, drafts: int, anchors: int | None) -> dict:
        llm.collective_rpc(step_timing.set_plan, args=(drafts, anchors))
        prompts = [TokensPrompt(prompt_token_ids=_text_tokens(tok, context, i)) for i in range(batch)]
        llm.collective_rpc(step_timing.collect)
        llm.generate(prompts, params, use_tqdm=False)
        recs = [r for r in llm.collective_rpc(step_timing.collect)[0]
                if r["decode"] and r["reqs"] == batch and "period" in r]
        if not recs:
            raise RuntimeError(f"calibration: no steady decode step at batch {batch}, context {context}")
        return {"batch": batch, "context": context, "ms": statistics.mean(r["period"] for r in recs),
                "drafts": statistics.mean(r["drafts"] for r in recs) / batch,
                "pseudo": statistics.mean(r.get("pseudo", 0) for r in recs) / batch, "steps": len(recs)}

    cell(1, 64, 0, None)                                                        # warm-up
    jobs = [("plain", b, short, 0, None) for b in batch_sizes] + [("plain", 1, long, 0, None)]
    jobs += [("ht", 1, short, n, a) for n, a in HT_TREES_AT_1]
    jobs += [("ht", b, short, *HT_TREE_BATCHED) for b in batch_sizes if b > 1]
    jobs += [("ht", b, short, 6, 2) for b in batch_sizes if 1 < b <= 4]     # tree rows at batch > 1
    jobs += [("ht", 1, long, 3, 2)]
    results = []
    for kind, b, ctx, n, a in tqdm(jobs, desc="calibrate", unit="cell"):
        results.append({"kind": kind, "num_nodes": n, "pseudo_nodes": a, **cell(b, ctx, n, a)})
    llm.collective_rpc(step_timing.set_plan, args=(None, None))
    return results, startup, str(llm.llm_engine.model_config.dtype).removeprefix("torch.")


def fit(results: list[dict], short: int):
    from ..calibration import fit_costs

    plain = {r["batch"]: r["ms"] for r in results if r["kind"] == "plain" and r["context"] == short}
    plain_long = {r["batch"]: r["ms"] for r in results if r["kind"] == "plain" and r["context"] != short}
    ht = []
    for r in results:
        if r["kind"] == "ht":
            same = plain if r["context"] == short else plain_long
            ht.append({**r, **({"plain_ms": same[r["batch"]]} if r["batch"] in same else {})})
    return fit_costs(plain, ht)
