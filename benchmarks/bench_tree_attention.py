"""Benchmark tree_paged_attention: Triton kernel vs torch reference vs dense masked SDPA.

What: one attention call of a verification step. Each sequence has a cached context and a window
of tree rows (a random tree, BFS order) plus pseudo rows (PSEUDO_STEPS per node for the first
nodes, each group seeing its node's path and its own earlier steps); every row is a query and a
window key. Against what: the torch reference (the CPU path) and torch SDPA on dense, pre-gathered
K/V with a bool mask (gather time excluded, which flatters SDPA). Bandwidth: bytes the kernel must
move (context K/V, window K/V, queries, outputs) / time, against a measured device copy.

On a CUDA device all three run; on CPU only the reference runs (Triton needs a GPU; its
interpreter is a test tool, not a benchmark), and the table says so.

    python benchmarks/bench_tree_attention.py [--json OUT] [--batch 1 8] [--context 512 2048]
"""
import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as nnf

from vllm_ht.kernels.reference import tree_paged_attention_ref
from vllm_ht.kernels.testing import make_problem

PSEUDO_STEPS = 3


def tree_masks(num_nodes: int, pseudo_nodes: int, gen: torch.Generator) -> torch.Tensor:
    """bool [rows, rows], rows = num_nodes + pseudo_nodes * PSEUDO_STEPS: random tree + pseudo groups."""
    parents = [-1] + [int(torch.randint(0, max(1, i // 2 + 1), (1,), generator=gen)) for i in range(1, num_nodes)]
    rows = num_nodes + pseudo_nodes * PSEUDO_STEPS
    mask = torch.zeros(rows, rows, dtype=torch.bool)
    for i in range(num_nodes):
        mask[i, i] = True
        if parents[i] >= 0:
            mask[i] |= mask[parents[i]]
    for n in range(pseudo_nodes):
        for s in range(PSEUDO_STEPS):
            r = num_nodes + n * PSEUDO_STEPS + s
            mask[r] = mask[n] | mask[r - 1] if s else mask[n]
            mask[r, r] = True
    return mask


def time_ms(fn, device: torch.device, iters: int) -> float:
    """Median milliseconds of fn() after two warm-up calls."""
    fn()
    fn()
    samples = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def copy_bandwidth_gbps(device: torch.device) -> float:
    """Read + write bytes per second of a plain tensor copy (1 GiB on GPU, 256 MiB on CPU)."""
    n = (2**30 if device.type == "cuda" else 2**28) // 4
    src, dst = torch.empty(n, device=device), torch.empty(n, device=device)
    ms = time_ms(lambda: dst.copy_(src), device, 10)
    return 2 * n * 4 / ms / 1e6


def dense_inputs(p):
    """Pre-gathered dense K/V [B, Hkv, ctx+W, D] and bool mask [B, 1, R, ctx+W] (equal shapes per seq)."""
    keys, values, masks = [], [], []
    d = p.query.shape[2]
    bs = p.kv_cache.shape[2]
    for b in range(p.context_lens.shape[0]):
        ctx, w0, w1 = int(p.context_lens[b]), int(p.window_start_loc[b]), int(p.window_start_loc[b + 1])
        pages = p.kv_cache[p.block_table[b, : (ctx + bs - 1) // bs].long()].transpose(0, 1).flatten(1, 2)
        keys.append(torch.cat([pages[:, :ctx, :d], p.window_key[w0:w1].transpose(0, 1)], 1))
        values.append(torch.cat([pages[:, :ctx, d:], p.window_value[w0:w1].transpose(0, 1)], 1))
        r0, r1 = int(p.query_start_loc[b]), int(p.query_start_loc[b + 1])
        bits = torch.arange(w1 - w0, device=p.query.device)
        window = ((p.window_mask[r0:r1, bits // 32] >> (bits % 32)) & 1).bool()
        masks.append(torch.cat([torch.ones(r1 - r0, ctx, dtype=torch.bool, device=p.query.device), window], 1))
    return torch.stack(keys), torch.stack(values), torch.stack(masks)[:, None]


def bench_one(args, device, batch, context, nodes) -> dict:
    gen = torch.Generator().manual_seed(batch * 7919 + context + nodes)
    masks = [tree_masks(nodes, args.pseudo_nodes, gen) for _ in range(batch)]
    rows = masks[0].shape[0]
    p = make_problem([rows] * batch, [context] * batch, num_heads=args.heads, num_kv_heads=args.kv_heads,
                     head_dim=args.head_dim, block_size=args.block_size, dtype=getattr(torch, args.dtype),
                     layout="lbnhc" if device.type == "cuda" else "contiguous", masks=masks, device=device)
    el = p.query.element_size()
    bytes_moved = el * (batch * context * args.kv_heads * 2 * args.head_dim       # context K/V
                        + p.window_key.numel() * 2 + p.query.numel() * 2)        # window K/V, q, out
    result = {"batch": batch, "context": context, "tree_rows": nodes, "rows_per_seq": rows, "bytes": bytes_moved}
    out = torch.empty_like(p.query)
    result["ref_ms"] = time_ms(lambda: tree_paged_attention_ref(*p.args(), out), device, args.ref_iters)
    if device.type == "cuda":
        from vllm_ht.kernels.tree_attention import tree_paged_attention
        result["triton_ms"] = time_ms(lambda: tree_paged_attention(*p.args(), out), device, args.iters)
        k, v, mask = dense_inputs(p)
        q = p.query.view(batch, rows, args.heads, args.head_dim).transpose(1, 2)
        result["sdpa_ms"] = time_ms(lambda: nnf.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=p.scale, enable_gqa=True), device, args.iters)
    best = result.get("triton_ms", result["ref_ms"])
    result["GBps"] = bytes_moved / best / 1e6
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+")
    ap.add_argument("--context", type=int, nargs="+")
    ap.add_argument("--tree-rows", type=int, nargs="+", help="tree nodes per sequence, root included")
    ap.add_argument("--pseudo-nodes", type=int, default=4, help=f"nodes with {PSEUDO_STEPS} pseudo rows each")
    ap.add_argument("--heads", type=int)
    ap.add_argument("--kv-heads", type=int)
    ap.add_argument("--head-dim", type=int)
    ap.add_argument("--block-size", type=int)
    ap.add_argument("--dtype", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--ref-iters", type=int, default=5)
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--json", metavar="OUT", help="write the results as JSON here")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    # GPU defaults: a Llama-3-8B layer (32/8 heads, d128), vLLM's block 16. CPU defaults: the
    # project's default model SmolLM2-135M (9/3 heads, d64), vLLM-CPU's block 128, fp32.
    defaults = {"batch": [1, 8, 32, 64] if gpu else [1, 8], "context": [512, 2048, 8192] if gpu else [512, 2048],
                    "tree_rows": [16, 64] if gpu else [16], "heads": 32 if gpu else 9, "kv_heads": 8 if gpu else 3,
                    "head_dim": 128 if gpu else 64, "block_size": 16 if gpu else 128,
                    "dtype": "bfloat16" if gpu else "float32"}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name(device) if gpu else f"CPU {platform.processor() or platform.machine()}"
    copy_bw = copy_bandwidth_gbps(device)
    print(f"device: {name}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"shape: heads {args.heads}/{args.kv_heads}, head_dim {args.head_dim}, block {args.block_size}, "
          f"{args.dtype}, pseudo rows {args.pseudo_nodes}x{PSEUDO_STEPS} per sequence")
    print(f"measured copy bandwidth: {copy_bw:.1f} GB/s")
    if not gpu:
        print("NOTE: no CUDA device, so only the torch reference runs (no Triton, no SDPA comparison).")
    results = []
    head = f"{'batch':>5} {'ctx':>5} {'tree':>4} {'rows':>4} {'ref ms':>9}"
    head += f" {'triton ms':>9} {'sdpa ms':>9} {'GB/s':>7} {'% copy':>6}" if gpu else f" {'GB/s':>7} {'% copy':>6}"
    print(head)
    for batch in args.batch:
        for context in args.context:
            for nodes in args.tree_rows:
                r = bench_one(args, device, batch, context, nodes)
                r["pct_copy"] = 100 * r["GBps"] / copy_bw
                results.append(r)
                line = f"{batch:>5} {context:>5} {nodes:>4} {r['rows_per_seq']:>4} {r['ref_ms']:>9.3f}"
                if gpu:
                    line += f" {r['triton_ms']:>9.3f} {r['sdpa_ms']:>9.3f}"
                print(line + f" {r['GBps']:>7.1f} {r['pct_copy']:>6.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "copy_GBps": copy_bw,
                       "mode": "gpu" if gpu else "cpu-reference",
                       "config": {k: getattr(args, k) for k in defaults}, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
