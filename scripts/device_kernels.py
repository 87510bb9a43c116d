"""Stage 1 of the device check: the Triton kernels against their torch references.

`tree_paged_attention` (Triton) vs `tree_paged_attention_ref` (fp32 torch) over dtypes, the head
shapes of the default model (9/3 x 64), an 8B-class model (32/8 x 128) and a 64/8 x 128 one, the
cache layouts of `vllm_ht.kernels.testing` (contiguous, lbnhc = vLLM's GPU layout, padded rows),
split-K off (1), on (3) and as the wrapper picks it (None), awkward lengths, and a cache view of
more than 2**31 elements. Every case appends padding rows after the last sequence: the kernel
must leave them untouched. Outputs start as NaN poison so unwritten rows show.
`kv_compact` (Triton) vs `kv_compact_ref`, exact, on both of its addressing paths: per-layer
caches equally spaced in one allocation (one strided view) and separate allocations (a pointer
table), plus the lbnhc layout.

Pass rule (as torch.testing.assert_close, per-dtype table `vllm_ht.kernels.testing.TOLERANCES`):
|out - ref| <= atol + rtol * |ref| for every element of every real row; no NaN in a real row;
every padding row still NaN. `max_err_over_tol` is the worst |out - ref| / (atol + rtol * |ref|),
so <= 1 passes.
"""
from __future__ import annotations

import time
import zlib
from dataclasses import asdict, dataclass

import torch

from vllm_ht.kernels.reference import kv_compact_ref, tree_paged_attention_ref
from vllm_ht.kernels.testing import TOLERANCES, compact_layers, make_problem, start_loc

HEAD_SHAPES = {"9/3x64": (9, 3, 64), "32/8x128": (32, 8, 128), "64/8x128": (64, 8, 128)}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
LAYOUTS = ("contiguous", "lbnhc", "padded")
# Awkward lengths: 1-row and 1-token sequences, windows past one mask word (40, 80 keys).
GPU_LENGTHS = {"rows": (1, 5, 17, 64), "contexts": (1, 463, 1328, 8000), "windows": (1, 5, 40, 80)}
DRY_LENGTHS = {"rows": (1, 5, 3), "contexts": (1, 18, 37), "windows": (1, 5, 40)}


@dataclass(frozen=True)
class AttentionCase:
    name: str
    rows: tuple[int, ...]        # query rows per sequence
    contexts: tuple[int, ...]    # cached tokens per sequence
    windows: tuple[int, ...]     # window keys per sequence
    heads: str                   # key of HEAD_SHAPES
    dtype: str                   # key of DTYPES
    layout: str = "lbnhc"
    num_splits: int | None = None  # context splits; None: the wrapper's choice
    block_size: int = 16
    huge: bool = False           # a cache view of more than 2**31 elements
    padding: int = 3             # rows after the last sequence, which must stay untouched


def attention_cases(dry_run: bool) -> list[AttentionCase]:
    """The full cross product on a GPU; on the dry run every dtype, layout and head shape once."""
    lengths = DRY_LENGTHS if dry_run else GPU_LENGTHS
    cases = []

    def add(name, **kw):
        cases.append(AttentionCase(name=name, **{**lengths, **kw}))

    # the awkward ones first
    add("fp16-9/3x64-ctx0-rows", rows=(3, 2, 4), contexts=(0, 5, 0), windows=(3, 2, 0), heads="9/3x64",
        dtype="fp16", num_splits=2)
    add("fp32-9/3x64-q1-ctx1", rows=(1,), contexts=(1,), windows=(1,), heads="9/3x64", dtype="fp32")
    for dtype in () if dry_run else ("fp16", "bf16"):
        add(f"{dtype}-32/8x128-huge-cache", rows=(5, 2), contexts=(40, 17), windows=(5, 2), heads="32/8x128",
            dtype=dtype, huge=True, num_splits=2)
    if dry_run:       # the interpreter pays per program: few heads and sequences, splits 1 or 2
        for i, (dtype, layout) in enumerate((d, l) for d in DTYPES for l in LAYOUTS):
            splits = 2 if i % 2 else 1
            add(f"{dtype}-9/3x64-{layout}-splits{splits}", heads="9/3x64", dtype=dtype, layout=layout,
                num_splits=splits)
        add("bf16-32/8x128-lbnhc-one-seq", rows=(3,), contexts=(20,), windows=(3,), heads="32/8x128", dtype="bf16")
    else:
        for dtype in DTYPES:
            for heads in HEAD_SHAPES:
                for layout in LAYOUTS:
                    for splits in (1, None):
                        add(f"{dtype}-{heads}-{layout}-splits{splits or 'auto'}", heads=heads, dtype=dtype,
                            layout=layout, num_splits=splits)
                add(f"{dtype}-{heads}-lbnhc-splits3", heads=heads, dtype=dtype, num_splits=3)
        add("bf16-32/8x128-lbnhc-block128", heads="32/8x128", dtype="bf16", block_size=128)
    return cases


def compare(out: torch.Tensor, want: torch.Tensor, num_real: int) -> dict:
    """out, want [rows, heads, head_dim], NaN-poisoned before the calls; rows >= num_real are padding.

    Returns the errors and `ok` (see the module docstring for the rule)."""
    tol = TOLERANCES[out.dtype]
    got, ref = out[:num_real].float(), want[:num_real].float()
    unwritten = int(got.isnan().flatten(1).any(1).sum()) if num_real else 0
    err = (got - ref).abs()
    ratio = err / (tol["atol"] + tol["rtol"] * ref.abs())
    # NOTE: NaN in either side must fail, so NaN ratios count as infinitely far off.
    worst = float(ratio.nan_to_num(nan=float("inf")).max()) if ratio.numel() else 0.0
    max_err = float(err.nan_to_num(nan=float("inf")).max()) if err.numel() else 0.0
    padding_written = int((~out[num_real:].isnan()).flatten(1).any(1).sum()) if out.shape[0] > num_real else 0
    return {"max_abs_err": max_err, "max_err_over_tol": worst, "atol": tol["atol"], "rtol": tol["rtol"],
            "unwritten_rows": unwritten, "padding_rows_written": padding_written,
            "ok": unwritten == 0 and padding_written == 0 and worst <= 1.0}


def triton_attention(*args, num_splits=None):
    from vllm_ht.kernels.tree_attention import tree_paged_attention

    return tree_paged_attention(*args, num_splits=num_splits)


def run_attention_case(case: AttentionCase, device: torch.device, kernel=triton_attention) -> dict:
    """One case: build the problem, run `kernel` (same arguments as the Triton wrapper) and the reference."""
    num_heads, num_kv_heads, head_dim = HEAD_SHAPES[case.heads]
    problem = make_problem(list(case.rows), list(case.contexts), list(case.windows), num_heads=num_heads,
                           num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=case.block_size,
                           dtype=DTYPES[case.dtype], layout=case.layout, huge=case.huge, device=device,
                           seed=zlib.crc32(case.name.encode()))
    g = torch.Generator(device=device).manual_seed(7)
    padding = torch.randn((case.padding, num_heads, head_dim), generator=g, device=device).to(problem.query.dtype)
    problem.query = torch.cat([problem.query, padding])
    problem.window_mask = torch.cat([problem.window_mask, torch.full(
        (case.padding, problem.window_mask.shape[1]), -1, dtype=torch.int32, device=device)])
    out = torch.full_like(problem.query, float("nan"))
    kernel(*problem.args(), out, num_splits=case.num_splits)
    want = tree_paged_attention_ref(*problem.args(), torch.full_like(problem.query, float("nan")))
    return compare(out, want, sum(case.rows))


# -- kv_compact ------------------------------------------------------------------------------

def random_moves(num_seqs: int, positions: int, seed: int) -> tuple[list[int], list[int], list[int]]:
    """(src, dst, moves per sequence): per sequence an accepted path of n nodes picked from the 3n
    positions after a root at positions // 4, moved to the positions right after the root."""
    g = torch.Generator().manual_seed(seed)
    root = positions // 4
    most = min(7, (positions - root - 1) // 3)
    src, dst, counts = [], [], []
    for _ in range(num_seqs):
        n = int(torch.randint(0, most + 1, (1,), generator=g))
        src += sorted((torch.randperm(3 * n, generator=g)[:n] + root + 1).tolist())
        dst += list(range(root + 1, root + 1 + n))
        counts.append(n)
    return src, dst, counts


def run_compact_case(kind: str, dtype: torch.dtype, device: torch.device, dry_run: bool) -> dict:
    from vllm_ht.kernels.kv_compact import _layer_stride, kv_compact

    num_layers, shape, num_seqs = (3, (10, 2, 4, 32), 2) if dry_run else (8, (64, 8, 16, 256), 8)
    caches = compact_layers(kind, num_layers, shape, dtype, device)
    pages = shape[0] // num_seqs
    block_table = torch.randperm(shape[0], generator=torch.Generator().manual_seed(1))[: num_seqs * pages]
    block_table = block_table.view(num_seqs, pages).to(torch.int32).to(device)
    src, dst, counts = random_moves(num_seqs, pages * shape[2], seed=2)
    args = (block_table, torch.tensor(src, dtype=torch.int32, device=device),
            torch.tensor(dst, dtype=torch.int32, device=device), start_loc(counts, device))
    expected = [kv.clone() for kv in caches]
    before = [kv.clone() for kv in caches]
    kv_compact_ref(expected, *args)
    kv_compact(caches, *args)
    equal = all(torch.equal(a, b) for a, b in zip(caches, expected))
    moved = any(not torch.equal(a, b) for a, b in zip(expected, before))   # the case really moved rows
    path = "layer stride" if _layer_stride(caches) is not None else "pointer table"
    return {"kind": kind, "dtype": str(dtype).removeprefix("torch."), "path": path, "moves": len(src),
            "equal": equal, "moved_rows": moved, "ok": equal and moved}


def run(ctx) -> None:
    """Stage 1: every case, recorded as it finishes; checks_failed counts the failures."""
    cases = attention_cases(ctx.dry_run)
    ctx.record.update(attention=[], compact=[], checks_failed=0, checks_run=0)
    for i, case in enumerate(cases):
        if ctx.out_of_time():
            ctx.skip(f"{len(cases) - i} attention cases")
            break
        start = time.monotonic()
        result = {**asdict(case), **run_attention_case(case, ctx.device)}
        result["seconds"] = round(time.monotonic() - start, 3)
        ctx.record["attention"].append(result)
        ctx.record["checks_run"] += 1
        ctx.record["checks_failed"] += not result["ok"]
        if i % 8 == 7:
            ctx.save()
    dtypes = (torch.float32, torch.bfloat16) if ctx.dry_run else (torch.float16, torch.bfloat16)
    for kind in ("stacked", "separate", "lbnhc"):
        for dtype in dtypes:
            result = run_compact_case(kind, dtype, ctx.device, ctx.dry_run)
            ctx.record["compact"].append(result)
            ctx.record["checks_run"] += 1
            ctx.record["checks_failed"] += not result["ok"]
