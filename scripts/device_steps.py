"""Stage 4 of the device check: what plain and tree steps cost on this GPU, fitted to the policy's StepCost.

Model: `device_llama.RandomLlama` (bf16, 1B and 8B shapes). Step kinds, B requests, C cached tokens each:
  plain        one row per request; then greedy argmax of its logits
  tree N       root + N draft nodes per request (the best template for N under the default accuracy
               table, depth <= 3); argmax of every row, then `compact_kv` of the accepted path: the
               rank-0 nodes (2 for N = 4, 3 for 8 and 16)
  tree N + A   the same plus A anchors x 3 pseudo rows per request (the anchors most likely to end
               the accepted path), joining at the middle layer; top-8 of the pseudo rows' logits
Each step is built on the host the way the runner builds it (`vllm_ht.vllm.step.HTStep`: masks,
pseudo layout), copied into persistent device buffers (pinned staging, non-blocking), run, and
waited for (an engine reads its sampled tokens every step). Run eagerly and, on CUDA, replayed
from a CUDA graph captured for that configuration. Per configuration, medians over the timed steps:
  prepare_ms  host: building the step's metadata
  launch_ms   host: issuing the copies and the kernels (eager) or the replay (graph), no waiting
  device_ms   CUDA events around copies + step (on CPU: = the step's wall time)
  step_ms     wall: prepare + launch + waiting for the step to finish (what the fit uses)

StepCost (vllm_ht/policy.py), fitted as `vllm_ht.calibration.fit_costs` fits calibration cells
priced against the plain sweep (cells without their own `plain_ms`), in units of p1 = step_ms
of a plain step at B = 1 and the smallest context:
  batch_row   least squares through 0 of plain(B, C0) / p1 - 1 against B - 1
  fixed, row, pseudo_row, context
              least squares with coefficients >= 0 of (tree(B, C, N, A) - plain(B, C)) / p1
              against 1, B * N, B * 3A, B * C / 1000 (plain at the same B and C)
Three fits: "eager" (both eager), "graph" (both replayed: a GPU build that captures fixed tree
templates), "eager_tree_vs_graph_plain" (eager tree steps against captured plain steps: what a GPU
build pays if only plain steps are captured). calibration.py itself is not imported: it needs
numpy, which the GPU machine may lack.
"""
from __future__ import annotations

import functools
import time
from dataclasses import asdict, dataclass

import torch
from device_common import capture_graph, synchronize
from device_llama import SHAPES, RandomLlama, StepTensors

from vllm_ht.kernels import compact_kv
from vllm_ht.policy import StepCost
from vllm_ht.tree import TokenTree, accuracy_table, best_template, likely_end_nodes
from vllm_ht.vllm.step import HTStep

DEPTH = 3        # pseudo rows per anchor: HiddenTransferConfig.num_steps' default
GPU_PLAN = {"models": ("llama-1b", "llama-8b"), "batch": (1, 8, 32), "contexts": (512, 2048),
            "nodes": (4, 8, 16), "anchors": 4, "warmup": 3, "iters": 10}
DRY_PLAN = {"models": ("tiny-a", "tiny-b"), "batch": (1, 4), "contexts": (24, 72), "nodes": (4, 8),
            "anchors": 2, "warmup": 1, "iters": 3}
ACCURACY = accuracy_table(None, DEPTH)


@dataclass(frozen=True)
class StepSpec:
    batch: int
    context: int
    nodes: int = 0       # draft nodes per request (0: a plain decode step)
    anchors: int = 0     # anchors per request, DEPTH pseudo rows each (0: none)


@functools.cache
def tree_and_anchors(nodes: int, anchors: int) -> tuple[TokenTree | None, list[int]]:
    """The policy's part, done once per configuration as the runner does: the template for N nodes
    and its A likeliest end nodes."""
    if not nodes:
        return None, []
    tree = TokenTree.from_paths(best_template(ACCURACY, nodes))
    return tree, likely_end_nodes(tree, ACCURACY, anchors) if anchors else []


def build_step(spec: StepSpec, block_table: torch.Tensor, block_size: int, vocab: int,
               transfer_layer: int) -> StepTensors:
    """The host tensors of one step (see StepTensors). block_table [B, pages] int32."""
    b, ctx = spec.batch, spec.context
    tree, anchor_rows = tree_and_anchors(spec.nodes, spec.anchors)
    n = tree.num_nodes if tree else 1
    step = HTStep.build([n] * b, {i: tree for i in range(b)} if tree else {})
    local = tree.depths if tree else torch.zeros(1, dtype=torch.long)
    positions = (ctx + local).repeat(b)                                          # [T] rope positions
    slot_pos = ctx + torch.arange(n).repeat(b)                                   # [T] cache positions
    seq = torch.arange(b).repeat_interleave(n)
    slots = block_table[seq, slot_pos // block_size].long() * block_size + slot_pos % block_size
    empty_l, empty_i = torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.int32)
    anchors, order, joint_sl, joint_mask = empty_l, empty_l, torch.zeros(b + 1, dtype=torch.int32), \
        torch.zeros(0, 1, dtype=torch.int32)
    if spec.anchors:
        step.add_pseudo_rows({i: anchor_rows for i in range(b)}, depth=DEPTH, start=b * n, positions=positions,
                             joins={transfer_layer: list(range(DEPTH))})
        p = step.pseudo
        positions = torch.cat([positions, p.positions])
        anchors, order, joint_sl = p.anchors, p.window_rows, p.window_start_loc
        joint_mask = p.joint_masks[transfer_layer]
    src, dst, msl = empty_i, empty_i, torch.zeros(b + 1, dtype=torch.int32)
    if tree:       # accepted: the rank-0 path, up to 3 nodes, moved next to the root
        path = [i for i, p in enumerate(tree.paths, start=1) if all(r == 0 for r in p)][:DEPTH]
        src = (ctx + torch.tensor(path).repeat(b)).to(torch.int32)
        dst = (ctx + torch.arange(1, len(path) + 1).repeat(b)).to(torch.int32)
        msl = torch.arange(b + 1, dtype=torch.int32) * len(path)
    return StepTensors(
        tokens=torch.randint(0, vocab, (positions.shape[0],)), positions=positions, slots=slots,
        block_table=block_table[:b].contiguous(), context_lens=torch.full((b,), ctx, dtype=torch.int32),
        query_start_loc=(torch.arange(b + 1) * n).to(torch.int32), mask=step.real_mask_bits,
        anchors=anchors, order=order, joint_start_loc=joint_sl, joint_mask=joint_mask,
        src=src, dst=dst, move_start_loc=msl)


def measure(model: RandomLlama, spec: StepSpec, block_table: torch.Tensor, graph: bool, plan: dict,
            device: torch.device) -> dict:
    """Median timings of `plan["iters"]` steps after `plan["warmup"]` (see the module docstring)."""
    cuda = device.type == "cuda"
    make = lambda: build_step(spec, block_table, model.block_size, model.shape.vocab, model.transfer_layer)
    first = make()
    dev = first.to(device)
    staging = first.pinned_twin() if cuda else None     # host -> pinned -> device, as vLLM's input buffers
    pseudo, n = spec.anchors > 0, first.num_real

    def step() -> None:
        logits = model.forward(dev, pseudo)
        logits[:n].argmax(-1)                         # greedy verification's target tokens
        if pseudo:
            logits[n:].topk(8, dim=-1)                # the pseudo rows' drafts for the next tree
        if spec.nodes:
            compact_kv(model.layer_caches, dev.block_table, dev.src, dev.dst, dev.move_start_loc)

    run = step
    if graph:
        cuda_graph = capture_graph(step)
        run = cuda_graph.replay
    samples = []
    for i in range(plan["warmup"] + plan["iters"]):
        synchronize(device)
        t0 = time.perf_counter()
        host = make()
        t1 = time.perf_counter()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        if staging is None:
            dev.copy_(host)
        else:
            staging.copy_(host)
            dev.copy_(staging)
        run()
        if cuda:
            end.record()
        t2 = time.perf_counter()
        synchronize(device)
        t3 = time.perf_counter()
        if i >= plan["warmup"]:
            samples.append((t1 - t0, t2 - t1, start.elapsed_time(end) / 1e3 if cuda else t3 - t1, t3 - t0))
    med = [sorted(x)[len(x) // 2] * 1e3 for x in zip(*samples)]
    return {"batch": spec.batch, "context": spec.context, "nodes": spec.nodes, "anchors": spec.anchors,
            "pseudo_rows": spec.anchors * DEPTH, "rows": first.tokens.shape[0], "mode": "graph" if graph else "eager",
            "prepare_ms": round(med[0], 4), "launch_ms": round(med[1], 4), "device_ms": round(med[2], 4),
            "step_ms": round(med[3], 4)}


def nonneg_lstsq(a: torch.Tensor, y: torch.Tensor) -> list[float]:
    """Least squares with every coefficient >= 0 (drop the most negative one, refit), as calibration.py."""
    active = list(range(a.shape[1]))
    while True:
        coef = torch.zeros(a.shape[1], dtype=torch.float64)
        if active:
            coef[active] = torch.linalg.lstsq(a[:, active], y[:, None]).solution[:, 0]
        negative = [i for i in active if coef[i] < 0]
        if not negative:
            return coef.tolist()
        active.remove(min(negative, key=lambda i: coef[i]))


def fit_step_cost(plain: list[dict], tree: list[dict]) -> dict | None:
    """plain, tree: `measure` results of one model -> StepCost fields + unit_ms, points, rms residual;
    None without a plain step at B = 1 or with fewer than 3 usable tree steps."""
    c0 = min((m["context"] for m in plain), default=None)
    at = {(m["batch"], m["context"]): m["step_ms"] for m in plain}
    if (1, c0) not in at:
        return None
    p1 = at[(1, c0)]
    xy = [(b - 1, ms / p1 - 1) for (b, c), ms in at.items() if c == c0 and b > 1]
    batch_row = max(sum(x * y for x, y in xy) / sum(x * x for x, _ in xy), 0.0) if xy else 0.0
    usable = [m for m in tree if (m["batch"], m["context"]) in at]
    if len(usable) < 3:
        return None
    a = torch.tensor([[1.0, m["batch"] * m["nodes"], m["batch"] * m["pseudo_rows"], m["batch"] * m["context"] / 1e3]
                      for m in usable], dtype=torch.float64)
    y = torch.tensor([(m["step_ms"] - at[(m["batch"], m["context"])]) / p1 for m in usable], dtype=torch.float64)
    fixed, row, pseudo_row, context = nonneg_lstsq(a, y)
    cost = StepCost(row=row, pseudo_row=pseudo_row, fixed=fixed, context=context, batch_row=batch_row)
    residual = a @ torch.tensor([fixed, row, pseudo_row, context], dtype=torch.float64) - y
    return {**asdict(cost), "unit_ms": p1, "points": len(usable), "rms_residual": float(residual.pow(2).mean().sqrt())}


def fits(results: list[dict]) -> dict:
    pick = lambda mode, plain: [m for m in results if m["mode"] == mode and (m["nodes"] == 0) == plain]
    out = {"eager": fit_step_cost(pick("eager", True), pick("eager", False))}
    if any(m["mode"] == "graph" for m in results):
        out["graph"] = fit_step_cost(pick("graph", True), pick("graph", False))
        out["eager_tree_vs_graph_plain"] = fit_step_cost(pick("graph", True), pick("eager", False))
    return out


def run(ctx) -> None:
    """Stage 4: per model, plain steps first (the fit's unit), then tree steps; fitted after each model."""
    plan = DRY_PLAN if ctx.dry_run else GPU_PLAN
    modes = (False, True) if ctx.cuda else (False,)
    ctx.record.update(plan={k: v for k, v in plan.items()}, depth=DEPTH,
                      graph="captured per configuration" if ctx.cuda else "skipped: no CUDA", models={})
    for name in plan["models"]:
        if ctx.out_of_time():
            ctx.skip(f"model {name}")
            continue
        shape = SHAPES[name]
        pages = (max(plan["contexts"]) + max(plan["nodes"]) + 1 + 15) // 16
        num_blocks = max(plan["batch"]) * pages
        start = time.monotonic()
        model = RandomLlama(shape, num_blocks, max(plan["contexts"]) + 64, ctx.device)
        table = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(0)).to(torch.int32)
        table = table.view(max(plan["batch"]), pages)
        entry = ctx.record["models"][name] = {"shape": asdict(shape), "init_s": round(time.monotonic() - start, 2),
                                              "steps": []}
        specs = [StepSpec(b, c) for c in plan["contexts"] for b in plan["batch"]]
        specs += [StepSpec(b, c, n, a) for c in plan["contexts"] for b in plan["batch"] for n in plan["nodes"]
                  for a in (0, plan["anchors"])]
        for i, spec in enumerate(specs):
            if ctx.out_of_time():
                ctx.skip(f"{name}: {len(specs) - i} step configurations")
                break
            for graph in modes:
                entry["steps"].append(measure(model, spec, table, graph, plan, ctx.device))
        entry["step_cost"] = fits(entry["steps"])
        ctx.save()
        del model
        if ctx.cuda:
            torch.cuda.empty_cache()
