"""Stage 3 of the device check: how close tree attention gets to the memory roofline, and SDPA beside it.

Per (batch B, context C, tree rows R): B sequences, each with C cached tokens in a paged lbnhc
cache (bf16, 32/8 heads x 128, the 8B shape; block size 16) and R rows that see all of the
context plus a random subset of their R window keys.
  kernel_us      `tree_paged_attention` (the wrapper's own split choice), L2 flushed before each call
  kv_bytes       B * C * kv_heads * 2 * head_dim * 2 bytes: the cached K and V every call must read
  kernel_gbps    kv_bytes / kernel time; pct_of_copy = that over stage 0's copy rate (bytes read +
                 written per second by a device-to-device copy), so 100% = reading KV as fast as
                 a copy moves bytes
  sdpa_us        torch SDPA on the same problem laid out contiguously, with GQA folded into the
                 query rows ([B, kv_heads, group * R, D] against [B, kv_heads, C + R, D]) and a
                 boolean mask (all context visible, window keys per the tree mask); the K/V gather
                 from the paged cache is timed separately (gather_us) and not included
  sdpa_max_err   max |SDPA - kernel| (the two must agree; checks that the baseline is the same problem)
"""
from __future__ import annotations

import itertools
import time

import torch
import torch.nn.functional as F
from device_common import copy_gbps, l2_flush_buffer, time_ms

from vllm_ht.kernels.testing import TOLERANCES, make_problem
from vllm_ht.kernels.window_mask import unpack_window_mask

GPU_GRID = {"batch": (1, 8, 32, 64), "context": (512, 2048, 8192), "rows": (1, 8, 16, 32)}
DRY_GRID = {"batch": (1, 2), "context": (48,), "rows": (1, 4)}
GPU_HEADS, DRY_HEADS = (32, 8, 128), (4, 1, 32)


def contiguous_problem(p, batch: int, rows: int, context: int):
    """(q [B, Hkv, G*R, D], k, v [B, Hkv, C+R, D], mask [B, 1, G*R, C+R]) of a problem whose
    sequences all have `rows` rows, `rows` window keys and `context` cached tokens."""
    _, num_heads, d = p.query.shape
    _, kv_heads, block_size, _ = p.kv_cache.shape
    group, pages = num_heads // kv_heads, (context + block_size - 1) // block_size
    paged = p.kv_cache[p.block_table[:, :pages].long()]                          # [B, P, Hkv, bs, 2D]
    ctx_kv = paged.permute(0, 2, 1, 3, 4).reshape(batch, kv_heads, pages * block_size, 2 * d)[:, :, :context]
    win_k = p.window_key.view(batch, rows, kv_heads, d).transpose(1, 2)           # [B, Hkv, R, D]
    win_v = p.window_value.view(batch, rows, kv_heads, d).transpose(1, 2)
    k = torch.cat([ctx_kv[..., :d], win_k], 2)
    v = torch.cat([ctx_kv[..., d:], win_v], 2)
    q = p.query.view(batch, rows, kv_heads, group, d).permute(0, 2, 3, 1, 4).reshape(batch, kv_heads, group * rows, d)
    window = unpack_window_mask(p.window_mask, rows).view(batch, rows, rows)         # [B, R, R]
    visible = torch.cat([torch.ones(batch, rows, context, dtype=torch.bool, device=window.device), window], 2)
    mask = visible[:, None, None].expand(batch, 1, group, rows, context + rows).reshape(batch, 1, group * rows, -1)
    return q, k, v, mask


def sdpa_rows(o: torch.Tensor, batch: int, rows: int, num_heads: int) -> torch.Tensor:
    """SDPA output [B, Hkv, G*R, D] -> the kernel's [B*R, H, D] row layout."""
    _, kv_heads, _, d = o.shape
    o = o.view(batch, kv_heads, num_heads // kv_heads, rows, d).permute(0, 3, 1, 2, 4)       # [B, R, Hkv, G, D]
    return o.reshape(batch * rows, num_heads, d)


def launch_info(p) -> dict:
    """The wrapper's tile and split choice for this problem (private helpers: informative only)."""
    try:
        from vllm_ht.kernels.tree_attention import _default_splits, _launch_config
        num_rows, num_heads, _ = p.query.shape
        num_seqs, kv_heads = p.context_lens.shape[0], p.kv_cache.shape[1]
        group = num_heads // kv_heads
        block_m, block_n = _launch_config(group, num_rows, num_seqs, p.query.dtype == torch.float32)
        programs = num_rows // (block_m // group) + num_seqs
        return {"block_m": block_m, "block_n": block_n, "splits": _default_splits(programs * kv_heads, p.query.device)}
    except (ImportError, TypeError, AttributeError) as e:      # the helpers changed: leave it out
        return {"launch_info": f"unavailable: {e!r}"}


def sig(x: float, digits: int = 4) -> float:
    """x to `digits` significant digits: 0.0031234 -> 0.003123, 123456.7 -> 123500.0."""
    return float(f"{x:.{digits}g}")


def copy_rate(ctx) -> float:
    """Stage 0's copy rate, measured here when stage 0 did not run."""
    env = ctx.results["stages"].get("environment", {})
    return env.get("copy_gbps") or copy_gbps(ctx.device)["copy_gbps"]


def measure_point(batch: int, context: int, rows: int, heads: tuple[int, int, int], iters: int, rate: float,
                  flush: torch.Tensor | None, device: torch.device, seed: int) -> dict:
    from vllm_ht.kernels.tree_attention import tree_paged_attention

    num_heads, kv_heads, head_dim = heads
    p = make_problem([rows] * batch, [context] * batch, num_heads=num_heads, num_kv_heads=kv_heads,
                     head_dim=head_dim, dtype=torch.bfloat16, layout="lbnhc", device=device, seed=seed)
    out = torch.empty_like(p.query)
    warmup = 1 if device.type == "cpu" else 2
    kernel_ms = time_ms(lambda: tree_paged_attention(*p.args(), out), device, iters, warmup=warmup, flush=flush)
    gather_ms = time_ms(lambda: contiguous_problem(p, batch, rows, context), device, max(1, iters // 3), warmup=1,
                        flush=flush)
    q, k, v, mask = contiguous_problem(p, batch, rows, context)

    def sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=p.scale)

    sdpa_ms = time_ms(sdpa, device, max(1, iters // 2), warmup=1, flush=flush)
    # Both are bf16 roundings of the same fp32 result: allow twice the bf16 tolerance.
    tol = TOLERANCES[torch.bfloat16]
    diff = (sdpa_rows(sdpa(), batch, rows, num_heads).float() - out.float()).abs()
    agree = bool((diff <= 2 * (tol["atol"] + tol["rtol"] * out.float().abs())).all())
    kv_bytes = batch * context * kv_heads * 2 * head_dim * p.kv_cache.element_size()
    gbps = kv_bytes / (kernel_ms * 1e-3) / 1e9
    return {"batch": batch, "context": context, "rows": rows, **launch_info(p),
            "kernel_us": sig(kernel_ms * 1e3), "kv_bytes": kv_bytes, "kernel_gbps": sig(gbps),
            "pct_of_copy": sig(100 * gbps / rate), "sdpa_us": sig(sdpa_ms * 1e3), "gather_us": sig(gather_ms * 1e3),
            "sdpa_over_kernel": sig(sdpa_ms / kernel_ms), "sdpa_max_err": float(diff.max()), "sdpa_agrees": agree}


def run(ctx) -> None:
    """Stage 3: one measurement per grid point, recorded as it finishes."""
    grid = DRY_GRID if ctx.dry_run else GPU_GRID
    heads = DRY_HEADS if ctx.dry_run else GPU_HEADS
    flush = l2_flush_buffer(ctx.device)
    rate = copy_rate(ctx)
    ctx.record.update(dtype="bf16", heads="{}/{}x{}".format(*heads), block_size=16, copy_gbps=rate, points=[],
                      checks_failed=0, checks_run=0)
    points = list(itertools.product(grid["context"], grid["batch"], grid["rows"]))
    for i, (context, batch, rows) in enumerate(points):
        if ctx.out_of_time():
            ctx.skip(f"{len(points) - i} grid points")
            break
        start = time.monotonic()
        point = measure_point(batch, context, rows, heads, 2 if ctx.dry_run else 10, rate, flush, ctx.device, seed=i)
        point["seconds"] = round(time.monotonic() - start, 2)
        ctx.record["points"].append(point)
        ctx.record["checks_run"] += 1
        ctx.record["checks_failed"] += not point["sdpa_agrees"]
        if i % 6 == 5:
            ctx.save()
