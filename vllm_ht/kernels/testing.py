"""Random problems for the kernel tests and benchmarks, and the one per-dtype tolerance table.

`make_problem` builds every argument of `tree_paged_attention` for sequences of given row counts,
context lengths and window sizes: a paged cache with a shuffled block table, window keys, and a
window mask (random unless given). Physical cache layouts: "contiguous" (HND pages, the CPU
layout), "lbnhc" (vLLM's GPU default: memory [block][token][head][K||V], viewed as
[block, head, token, 2D] through a transpose) and "padded" (rows of 2D + 16 elements, sliced).
"""
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vllm_ht.kernels.window_mask import num_mask_words, pack_window_mask

# atol = rtol, against the fp32 torch reference cast to the input dtype.
TOLERANCES = {
    torch.float32: {"atol": 2e-5, "rtol": 2e-5},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
    torch.bfloat16: {"atol": 1.6e-2, "rtol": 1.6e-2},
}

HUGE_BLOCK_ELEMENTS = 2**31 + 2**20   # a cache view with more elements than int32 offsets can reach


@dataclass
class TreeAttentionProblem:
    query: torch.Tensor             # [num_rows, num_heads, head_dim]
    kv_cache: torch.Tensor          # [num_blocks, num_kv_heads, block_size, 2*head_dim]
    block_table: torch.Tensor       # [num_seqs, max_blocks_per_seq] int32
    context_lens: torch.Tensor      # [num_seqs] int32
    query_start_loc: torch.Tensor   # [num_seqs+1] int32
    window_key: torch.Tensor        # [num_window, num_kv_heads, head_dim]
    window_value: torch.Tensor      # [num_window, num_kv_heads, head_dim]
    window_start_loc: torch.Tensor  # [num_seqs+1] int32
    window_mask: torch.Tensor       # [num_rows, num_words] int32
    scale: float

    def args(self) -> tuple:
        """Positional arguments of `tree_paged_attention`, `out` excluded."""
        return (self.query, self.kv_cache, self.block_table, self.context_lens, self.query_start_loc,
                self.window_key, self.window_value, self.window_start_loc, self.window_mask, self.scale)


def _device(device) -> torch.device:
    """`device`, or torch's default device (the current `with torch.device(...)` one) for None."""
    return torch.get_default_device() if device is None else torch.device(device)


def start_loc(counts: Sequence[int], device=None) -> torch.Tensor:
    """Exclusive prefix sum with the total appended: [2, 3, 0] -> [0, 2, 5, 5] (int32)."""
    out = [0]
    for c in counts:
        out.append(out[-1] + c)
    return torch.tensor(out, dtype=torch.int32, device=device)


def _paged_cache(num_blocks, kv_heads, block_size, head_dim, dtype, layout, device):
    """An uninitialised cache with the logical shape [num_blocks, kv_heads, block_size, 2*head_dim]."""
    if layout == "contiguous":
        return torch.empty(num_blocks, kv_heads, block_size, 2 * head_dim, dtype=dtype, device=device)
    if layout == "lbnhc":
        return torch.empty(num_blocks, block_size, kv_heads, 2 * head_dim, dtype=dtype,
                           device=device).transpose(1, 2)
    if layout == "padded":
        return torch.empty(num_blocks, kv_heads, block_size, 2 * head_dim + 16, dtype=dtype,
                           device=device)[..., : 2 * head_dim]
    raise ValueError(f"unknown layout {layout!r}")


def make_problem(
    rows: Sequence[int],                    # query rows per sequence
    contexts: Sequence[int],                # cached tokens per sequence
    windows: Sequence[int] | None = None,  # window keys per sequence; default = rows
    *,
    num_heads: int = 8,
    num_kv_heads: int = 2,
    head_dim: int = 64,
    block_size: int = 16,
    dtype: torch.dtype = torch.float32,
    layout: str = "contiguous",
    masks: Sequence[torch.Tensor] | None = None,  # per sequence bool [rows_b, windows_b]
    spare_blocks: int = 3,
    huge: bool = False,     # cache view of > 2**31 elements (only the used blocks are written)
    device=None,            # None: torch's default device (tests/kernels/conftest.py sets it)
    seed: int = 0,
) -> TreeAttentionProblem:
    """A random problem; everything but the masks is drawn on `device` from generators seeded by `seed`."""
    device = _device(device)
    windows = list(rows) if windows is None else list(windows)
    cpu_gen = torch.Generator(device="cpu").manual_seed(seed)     # CPU-side draws stay on the CPU, whatever
    # torch's default device is (tests/kernels/conftest.py makes it CUDA for Triton tests on a GPU)
    gen = torch.Generator(device=device).manual_seed(seed)
    pages = [(c + block_size - 1) // block_size for c in contexts]
    used = sum(pages)
    if huge:
        # NOTE: torch.empty never commits untouched pages, so this costs only the used blocks;
        # their offsets pass 2**31 elements, which catches 32-bit index arithmetic.
        num_blocks = HUGE_BLOCK_ELEMENTS // (num_kv_heads * block_size * 2 * head_dim) + 1
        ids = num_blocks - 1 - torch.randperm(max(used, 1), generator=cpu_gen, device="cpu")   # the highest block ids
    else:
        num_blocks = used + spare_blocks
        ids = torch.randperm(num_blocks, generator=cpu_gen, device="cpu")[:used]
    kv_cache = _paged_cache(num_blocks, num_kv_heads, block_size, head_dim, dtype, layout, device)
    written = ids.to(device) if huge else torch.arange(num_blocks, device=device)
    kv_cache[written] = torch.randn((written.numel(),) + tuple(kv_cache.shape[1:]), generator=gen,
                                    device=device).to(dtype)
    block_table = torch.randint(0, num_blocks, (len(rows), max(pages + [1])), generator=cpu_gen,
                                dtype=torch.int32, device="cpu")          # entries past a sequence's pages are junk
    offset = 0
    for b, n in enumerate(pages):
        block_table[b, :n] = ids[offset:offset + n].to(torch.int32)
        offset += n
    if masks is None:
        masks = [torch.rand(r, w, generator=cpu_gen, device="cpu") < 0.5 for r, w in zip(rows, windows)]
    bool_mask = torch.zeros(sum(rows), max(num_mask_words(max(windows + [0])), 1) * 32, dtype=torch.bool,
                            device="cpu")
    r0 = 0
    for m, r in zip(masks, rows):
        bool_mask[r0:r0 + r, : m.shape[1]] = m.to("cpu")
        r0 += r

    def randn(*shape):
        return torch.randn(shape, generator=gen, device=device).to(dtype)

    return TreeAttentionProblem(
        query=randn(sum(rows), num_heads, head_dim),
        kv_cache=kv_cache,
        block_table=block_table.to(device),
        context_lens=torch.tensor(list(contexts), dtype=torch.int32, device=device),
        query_start_loc=start_loc(rows, device),
        window_key=randn(sum(windows), num_kv_heads, head_dim),
        window_value=randn(sum(windows), num_kv_heads, head_dim),
        window_start_loc=start_loc(windows, device),
        window_mask=pack_window_mask(bool_mask).to(device),
        scale=head_dim ** -0.5,
    )


def compact_layers(kind: str, num_layers: int = 3, shape: tuple[int, int, int, int] = (10, 2, 4, 32),
                   dtype: torch.dtype = torch.float32, device=None) -> list[torch.Tensor]:
    """Random per-layer caches [blocks, heads, block_size, 2D] for kv_compact: 'stacked' (views of
    one allocation, like vLLM's), 'separate' allocations, or 'lbnhc' (stacked, each layer a
    transposed non-contiguous view)."""
    device = _device(device)
    gen = torch.Generator(device=device).manual_seed(0)
    if kind == "separate":
        return [torch.randn(shape, generator=gen, device=device).to(dtype) for _ in range(num_layers)]
    if kind == "stacked":
        return list(torch.randn((num_layers,) + shape, generator=gen, device=device).to(dtype).unbind(0))
    blocks, heads, block_size, row = shape
    big = torch.randn(num_layers, blocks, block_size, heads, row, generator=gen, device=device).to(dtype)
    return list(big.transpose(2, 3).unbind(0))
