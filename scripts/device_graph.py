"""Stage 2 of the device check: the kernels inside a CUDA graph, with new inputs written in place.

A graph replays fixed addresses and fixed launch grids. The kernels' grids depend only on tensor
shapes (rows, sequences, KV heads; the split count too), never on index values, so a step can
be captured once at a padded size and replayed with new values. Per case:
  1. persistent buffers at capacity: B sequences x up to MAX_ROWS rows, PADDING rows after them,
     up to MAX_WINDOW window keys (two mask words), a paged lbnhc cache;
  2. one eager call under torch.cuda.set_sync_debug_mode("error"): the wrapper must not sync
     (a graph could not capture it, and an engine step would stall on it);
  3. capture one call in torch.cuda.CUDAGraph;
  4. ROUNDS times: draw new rows / windows / contexts per sequence (zeros included), new start
     locations, block table, masks, queries, window keys and (every other round) cache values,
     copy them into the buffers in place, NaN-poison `out`, replay (under sync debug "error"),
     and compare to the torch reference on the same buffers (`device_kernels.compare`: real rows
     within tolerance, padding rows untouched).
kv_compact the same way: fixed move capacity, new moves each round (only move_start_loc says how
many are real), compared exactly to `kv_compact_ref`.
Without CUDA (the dry run) steps 2-3 are skipped ("graph": "skipped: no CUDA") and each round
calls the kernel eagerly on the same buffers, so the in-place bookkeeping is still checked.
"""
from __future__ import annotations

import contextlib

import torch
from device_common import capture_graph
from device_kernels import DTYPES, HEAD_SHAPES, compact_layers, compare, random_moves

from vllm_ht.kernels.reference import kv_compact_ref, tree_paged_attention_ref
from vllm_ht.kernels.testing import make_problem, start_loc

ROUNDS = 4
PADDING = 5


@contextlib.contextmanager
def no_syncs(enabled: bool):
    """Any host-device synchronisation inside raises (CUDA only)."""
    if not enabled:
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


class Captured:
    """fn captured in a CUDA graph and replayed under sync debug "error", or fn itself on CPU."""

    def __init__(self, fn, cuda: bool):
        self.fn = fn
        self.graph = capture_graph(fn) if cuda else None

    def __call__(self) -> None:
        if self.graph is None:
            self.fn()
        else:
            with no_syncs(True):
                self.graph.replay()
            torch.cuda.synchronize()


def attention_case(dtype: str, heads: str, num_splits: int | None, device: torch.device, dry_run: bool) -> dict:
    from vllm_ht.kernels.tree_attention import tree_paged_attention

    cuda = device.type == "cuda"
    num_seqs, max_rows, max_window, max_ctx = (2, 4, 40, 37) if dry_run else (8, 16, 48, 900)
    num_heads, num_kv_heads, head_dim = HEAD_SHAPES[heads]
    cap = make_problem([max_rows] * num_seqs, [max_ctx] * num_seqs, [max_window] * num_seqs, num_heads=num_heads,
                       num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=DTYPES[dtype], layout="lbnhc",
                       device=device, seed=11)
    rows_cap = num_seqs * max_rows + PADDING
    query = torch.zeros(rows_cap, num_heads, head_dim, dtype=cap.query.dtype, device=device)
    mask = torch.zeros(rows_cap, cap.window_mask.shape[1], dtype=torch.int32, device=device)
    out = torch.full_like(query, float("nan"))
    kv, table, ctx_lens, wk, wv = cap.kv_cache, cap.block_table, cap.context_lens, cap.window_key, cap.window_value
    qsl, wsl = torch.zeros_like(cap.query_start_loc), torch.zeros_like(cap.window_start_loc)
    args = lambda: (query, kv, table, ctx_lens, qsl, wk, wv, wsl, mask, cap.scale)
    call = lambda: tree_paged_attention(*args(), out, num_splits=num_splits)
    g = torch.Generator().manual_seed(3)

    def new_inputs(r: int) -> int:
        rows = torch.randint(0, max_rows + 1, (num_seqs,), generator=g)
        rows[0] = max(int(rows[0]), 1)                                     # never an all-empty step
        windows = torch.randint(0, max_window + 1, (num_seqs,), generator=g)
        qsl.copy_(start_loc(rows.tolist()))
        wsl.copy_(start_loc(windows.tolist()))
        ctx_lens.copy_(torch.randint(0, max_ctx + 1, (num_seqs,), generator=g, dtype=torch.int32))
        table.copy_(torch.randperm(kv.shape[0], generator=g)[: table.numel()].view(table.shape).to(torch.int32))
        mask.copy_(torch.randint(-2**31, 2**31, tuple(mask.shape), generator=g, dtype=torch.int32))
        query.copy_(torch.randn(tuple(query.shape), generator=g).to(query.dtype))
        wk.copy_(torch.randn(tuple(wk.shape), generator=g).to(wk.dtype))
        wv.copy_(torch.randn(tuple(wv.shape), generator=g).to(wv.dtype))
        if r % 2:
            kv.copy_(torch.randn(tuple(kv.shape), generator=g).to(kv.dtype))
        out.fill_(float("nan"))
        return int(rows.sum())

    result = {"kind": "tree_paged_attention", "dtype": dtype, "heads": heads, "num_splits": num_splits,
              "rows_capacity": rows_cap, "rounds": []}
    new_inputs(0)
    call()                                                                  # compile outside the checks
    if cuda:
        torch.cuda.synchronize()
        try:
            with no_syncs(True):
                call()
            torch.cuda.synchronize()
            result["eager_call_sync_free"] = True
        except RuntimeError as e:
            result["eager_call_sync_free"] = False
            result["sync_error"] = str(e)[-300:]
    run = Captured(call, cuda)
    result["graph"] = "captured" if cuda else "skipped: no CUDA"
    for r in range(ROUNDS):
        num_real = new_inputs(r + 1)
        run()
        want = tree_paged_attention_ref(*args(), torch.full_like(query, float("nan")))
        result["rounds"].append({"real_rows": num_real, **compare(out, want, num_real)})
    result["ok"] = all(x["ok"] for x in result["rounds"]) and result.get("eager_call_sync_free", True)
    return result


def compact_case(device: torch.device, dry_run: bool) -> dict:
    from vllm_ht.kernels.kv_compact import kv_compact

    cuda = device.type == "cuda"
    num_layers, shape, num_seqs = (3, (10, 2, 4, 32), 2) if dry_run else (8, (64, 8, 16, 256), 8)
    caches = compact_layers("lbnhc", num_layers, shape, torch.bfloat16, device)
    pages = shape[0] // num_seqs
    positions = pages * shape[2]
    capacity = num_seqs * 7
    table = torch.zeros(num_seqs, pages, dtype=torch.int32, device=device)
    src = torch.zeros(capacity, dtype=torch.int32, device=device)
    dst = torch.zeros_like(src)
    msl = torch.zeros(num_seqs + 1, dtype=torch.int32, device=device)
    live = {"moves": capacity}
    # NOTE: on CPU the wrapper checks that move_start_loc ends at the number of moves; on CUDA it
    # skips value checks (they would sync), which is what lets a graph keep a fixed capacity.
    call = lambda: kv_compact(caches, table, src if cuda else src[: live["moves"]],
                              dst if cuda else dst[: live["moves"]], msl)
    g = torch.Generator().manual_seed(5)

    def new_moves(r: int) -> int:
        s, d, counts = random_moves(num_seqs, positions, seed=100 + r)
        n = live["moves"] = len(s)
        junk = torch.randint(0, positions, (capacity - n,), generator=g, dtype=torch.int32)   # never read
        src.copy_(torch.cat([torch.tensor(s, dtype=torch.int32), junk]))
        dst.copy_(torch.cat([torch.tensor(d, dtype=torch.int32), junk]))
        msl.copy_(start_loc(counts))
        table.copy_(torch.randperm(shape[0], generator=g)[: table.numel()].view(table.shape).to(torch.int32))
        return n

    new_moves(0)
    run = Captured(call, cuda)
    result = {"kind": "kv_compact", "graph": "captured" if cuda else "skipped: no CUDA", "rounds": []}
    for r in range(ROUNDS):
        n = new_moves(r + 1)
        expected = [kv.clone() for kv in caches]
        kv_compact_ref(expected, table, src[:n], dst[:n], msl)
        run()
        result["rounds"].append({"moves": n, "ok": all(torch.equal(a, b) for a, b in zip(caches, expected))})
    result["ok"] = all(x["ok"] for x in result["rounds"])
    return result


def run(ctx) -> None:
    """Stage 2."""
    cases = [("bf16", "32/8x128", 1), ("bf16", "32/8x128", None), ("fp16", "9/3x64", None), ("fp32", "64/8x128", 2)]
    if ctx.dry_run:
        cases = [("fp32", "9/3x64", 1), ("bf16", "9/3x64", 2)]
    ctx.record.update(cases=[], checks_failed=0, checks_run=0)
    for i, (dtype, heads, splits) in enumerate(cases):
        if ctx.out_of_time():
            ctx.skip(f"{len(cases) - i} attention graph cases")
            break
        result = attention_case(dtype, heads, splits, ctx.device, ctx.dry_run)
        ctx.record["cases"].append(result)
        ctx.record["checks_run"] += 1
        ctx.record["checks_failed"] += not result["ok"]
        ctx.save()
    result = compact_case(ctx.device, ctx.dry_run)
    ctx.record["cases"].append(result)
    ctx.record["checks_run"] += 1
    ctx.record["checks_failed"] += not result["ok"]
