"""Per-step timings inside a vLLM worker, for `benchmarks/step_cost.py`, `benchmarks/served_steps.py`
and `vllm-ht calibrate`.

Installed into a running engine's workers through vLLM's `LLM.collective_rpc` (it runs a function
with the worker as its first argument), so plain vLLM and HT are timed by the same code. Every
engine step is one `execute_model` + `sample_tokens` pair; a record holds, per step:
  period   ms from this step's execute_model to the next one's (scheduler, IPC and output
           processing included: what a user's step costs)
  busy     ms inside the runner (execute_model + sample_tokens)
  cpu      CPU ms of this process over `busy` (all threads; > busy when OpenMP threads run or spin)
  phases   ms per timed method (inclusive): forward, attention, logits, sample, and for HT
           build (trees, masks, pseudo layout), inputs (pseudo rows' buffers), compact, propose
  rows, reqs, decode   scheduled rows, requests, and whether every request was decoding
  drafts, pseudo       draft rows and pseudo rows in the step (pseudo: HT only)
"""
from __future__ import annotations

import functools
import time
from collections import defaultdict

RUNNER_PHASES = {"_model_forward": "forward", "_sample": "sample", "_build_step": "build",
                 "_with_pseudo_rows": "inputs", "_compact": "compact", "propose_draft_token_ids": "propose"}


class StepTimer:
    def __init__(self) -> None:
        self.records: list[dict] = []
        self.phases: dict[str, float] = defaultdict(float)
        self._open: dict | None = None

    def timed(self, name: str, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.phases[name] += (time.perf_counter() - t0) * 1000
        return wrapper

    def step_start(self, scheduler_output) -> None:
        now = time.perf_counter()
        if self._open is not None and self.records and self.records[-1] is self._open:
            self._open["period"] = (now - self._open["t0"]) * 1000
        n = scheduler_output.num_scheduled_tokens
        spec = scheduler_output.scheduled_spec_decode_tokens
        decode = bool(n) and all(rows == 1 + len(spec.get(r) or ()) for r, rows in n.items())
        self.phases = defaultdict(float)
        self._open = {"t0": now, "cpu0": time.process_time(), "rows": sum(n.values()), "reqs": len(n),
                      "decode": decode, "drafts": sum(len(v or ()) for v in spec.values())}

    def step_end(self) -> None:
        rec = self._open
        if rec is None or "busy" in rec:
            return
        rec["busy"] = (time.perf_counter() - rec["t0"]) * 1000
        rec["cpu"] = (time.process_time() - rec["cpu0"]) * 1000
        rec["phases"] = dict(self.phases)
        self.records.append(rec)

    def take(self) -> list[dict]:
        out = [{k: v for k, v in r.items() if k not in ("t0", "cpu0")} for r in self.records]
        self.records, self._open = [], None
        return out


def install(worker) -> bool:
    """collective_rpc target: wrap the worker's runner (and its attention impls) with a StepTimer."""
    runner = worker.model_runner
    if getattr(runner, "_step_timer", None) is not None:
        return True
    timer = runner._step_timer = StepTimer()
    execute, sample = runner.execute_model, runner.sample_tokens

    def execute_model(scheduler_output, *args, **kwargs):
        timer.step_start(scheduler_output)
        out = execute(scheduler_output, *args, **kwargs)
        if out is not None:                 # no sample_tokens follows (empty step, pooling, PP)
            timer.step_end()
        return out

    def sample_tokens(*args, **kwargs):
        try:
            return sample(*args, **kwargs)
        finally:
            timer.step_end()

    runner.execute_model, runner.sample_tokens = execute_model, sample_tokens
    for method, phase in RUNNER_PHASES.items():
        if hasattr(runner, method):
            setattr(runner, method, timer.timed(phase, getattr(runner, method)))
    if hasattr(runner, "_build_step"):                 # HT: how many pseudo rows each step carried
        build = runner._build_step

        def build_step(*args, **kwargs):
            step = build(*args, **kwargs)
            if timer._open is not None:
                timer._open["pseudo"] = step.pseudo.num_rows if step.pseudo is not None else 0
            return step

        runner._build_step = build_step
    model = runner.model
    model.compute_logits = timer.timed("logits", model.compute_logits)
    from vllm.model_executor.layers.attention import Attention

    for module in model.modules():
        if isinstance(module, Attention):
            module.impl.forward = timer.timed("attention", module.impl.forward)
    return True


def collect(worker) -> list[dict]:
    """collective_rpc target: the records since the last call (and forget them)."""
    timer = getattr(worker.model_runner, "_step_timer", None)
    return timer.take() if timer is not None else []


KEEP = "keep"


def set_plan(worker, num_nodes: int | None, pseudo_nodes: int | None, lookup_nodes: int | None | str = KEEP) -> bool:
    """collective_rpc target (HT engines): force a tree of `num_nodes` drafts (0: plain steps, no
    chains either) with `pseudo_nodes` anchors, or None for the policy; `lookup_nodes` fixes the
    lookup chains (0: none, None: the policy's, KEEP: as they are); forgets cached plans."""
    drafter = worker.model_runner.drafter
    drafter.options.num_nodes, drafter.options.pseudo_nodes = num_nodes, pseudo_nodes
    if lookup_nodes != KEEP:
        drafter.options.lookup_nodes = lookup_nodes
    _forget_plans(drafter)
    return True


def set_cost(worker, costs: dict) -> bool:
    """collective_rpc target (HT engines): price the policy's plans with these StepCost fields from
    now on (`vllm-ht calibrate` checks its fit against the plan it makes); forgets cached plans."""
    from ..policy import StepCost

    drafter = worker.model_runner.drafter
    drafter.cost = StepCost(**costs)
    _forget_plans(drafter)
    return True


def _forget_plans(drafter) -> None:
    """The drafter's cached plans (per batch size and context) and anchors were made under the old
    options or costs."""
    drafter._plans.clear()
    drafter._anchors.clear()


def step_counts(worker) -> dict:
    """collective_rpc target: HT steps by kind (plain, tree, pseudo, padded), {} for plain vLLM."""
    return dict(getattr(worker.model_runner, "ht_step_counts", {}))
