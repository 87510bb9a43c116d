"""The HT attention backend: one plain KV layout and one attention op for every row kind.

KV layout (owned by this backend on every platform): per layer the logical view [num_blocks,
num_kv_heads, block_size, 2 * head_size], K || V on the last axis, over token-major memory
(vLLM's LBNHC: [block][token][head][K||V]), so the CPU path gathers a sequence's context as one
row copy per token. On CPU this replaces CPU_ATTN, whose cache is ISA-packed (K transposed, AMX
tiles) and unreadable from torch.

Every row attends to (a) its request's cached context (tokens before this step) and (b) this
step's window under a bitmask (`kernels.tree_paged_attention`, Triton, on CUDA; on the CPU a
`kernels.TreeAttentionPlan` built on the step's first layer and reused by the others). Plain
requests get a causal window; tree requests the tree mask from the runner's HTStep; pseudo rows
(see model.py) the anchor's mask plus their own group.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from vllm.forward_context import get_forward_context
from vllm.v1.attention.backend import AttentionImpl, AttentionType
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionMetadataBuilder
from vllm.v1.kv_cache_layout import KVCacheLayout

import kernels

from .step import HTStep, causal_blocks, pack_blocks

STEP_KEY = "vllm_ht"


def current_step() -> HTStep | None:
    try:
        return get_forward_context().additional_kwargs.get(STEP_KEY)
    except AssertionError:  # no forward context (e.g. a bare module call)
        return None


@dataclass
class HTAttentionMetadata:
    num_actual_tokens: int
    max_query_len: int
    query_start_loc: torch.Tensor   # [B + 1] int32
    seq_lens: torch.Tensor          # [B] int32, this step's rows included
    context_lens: torch.Tensor      # [B] int32, cached tokens before this step
    block_table: torch.Tensor       # [B, max_blocks] int32
    slot_mapping: torch.Tensor      # [T] int64
    causal_bits: torch.Tensor       # [T, words] int32: the causal window mask, for plain steps
    # CPU attention plans of this step, by row set ("real", "joint"); one metadata object serves
    # every layer of the step, so layer 0 builds a plan and the others reuse it.
    plans: dict = field(default_factory=dict)


def attend(md: HTAttentionMetadata, rows: str, query, kv_cache, query_start_loc, window_key, window_value,
           window_mask, scale: float, out=None) -> torch.Tensor:
    """Rows vs (cached context + this step's window keys); the window keys are the rows' own."""
    args = (query, kv_cache, md.block_table, md.context_lens, query_start_loc, window_key, window_value,
            query_start_loc, window_mask)
    if query.is_cuda:
        return kernels.tree_paged_attention(*args, scale, out=out)
    plan = md.plans.get(rows)
    if plan is None:
        plan = md.plans[rows] = kernels.TreeAttentionPlan.build(*args, out)
    return plan.run(query, kv_cache, window_key, window_value, scale, out)


def build_metadata(common) -> HTAttentionMetadata:
    qsl = common.query_start_loc_cpu.to(torch.int32)
    seq_lens = common.seq_lens.to(torch.int32)
    q_lens = (qsl[1:] - qsl[:-1])
    n = common.num_reqs
    return HTAttentionMetadata(
        num_actual_tokens=common.num_actual_tokens, max_query_len=common.max_query_len,
        query_start_loc=common.query_start_loc[: n + 1].to(torch.int32), seq_lens=seq_lens[:n],
        context_lens=(seq_lens[:n].cpu() - q_lens[:n]).to(seq_lens.device),
        block_table=common.block_table_tensor[:n], slot_mapping=common.slot_mapping[: common.num_actual_tokens],
        causal_bits=pack_blocks(causal_blocks(q_lens[:n].tolist())).to(seq_lens.device))


class HTCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    """CPU_ATTN's builder minus its ISA scheduler metadata (our layout is plain)."""

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False) -> HTAttentionMetadata:
        return build_metadata(common_attn_metadata)


class HTAttentionImpl(AttentionImpl):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int, alibi_slopes,
                 sliding_window, kv_cache_dtype: str, logits_soft_cap=None, attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name: str | None = None, sinks=None) -> None:
        unsupported = {"alibi_slopes": alibi_slopes, "sliding_window": sliding_window, "sinks": sinks,
                       "logits_soft_cap": logits_soft_cap or None}
        bad = [k for k, v in unsupported.items() if v is not None]
        if bad or attn_type != AttentionType.DECODER or kv_cache_dtype not in ("auto", None):
            raise ValueError(f"the Hidden Transfer attention backend supports plain decoder attention only "
                             f"(got {bad or attn_type or kv_cache_dtype}); use a Llama-family model without "
                             f"sliding windows, ALiBi, soft-capping or a quantised KV cache.")
        self.num_heads, self.head_size, self.scale = num_heads, head_size, float(scale)
        self.num_kv_heads = num_kv_heads
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name

    def do_kv_cache_update(self, layer, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                           slot_mapping: torch.Tensor) -> None:
        write_kv(kv_cache, key, value, slot_mapping)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata: HTAttentionMetadata | None, output,
                output_scale=None, output_block_scale=None) -> torch.Tensor:
        if attn_metadata is None:  # profiling / warm-up runs
            return output
        t = attn_metadata.num_actual_tokens
        step = current_step()
        bits = step.real_mask_bits if step is not None else attn_metadata.causal_bits
        attend(attn_metadata, "real", query[:t].view(t, self.num_heads, self.head_size), kv_cache,
               attn_metadata.query_start_loc, key[:t].view(t, self.num_kv_heads, self.head_size),
               value[:t].view(t, self.num_kv_heads, self.head_size), bits.to(query.device), self.scale,
               out=output[:t].view(t, self.num_heads, self.head_size))
        return output


def write_kv(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """key/value [T, Hkv, hd] -> slots (slot = block * block_size + offset; -1 = padding, skipped)."""
    t = slot_mapping.shape[0]
    slots = slot_mapping.long()
    rows = torch.cat([key[:t], value[:t]], dim=-1).to(kv_cache.dtype)       # [T, Hkv, 2 hd]
    if bool((slots < 0).any()):
        keep = slots >= 0
        slots, rows = slots[keep], rows[keep]
    tokens = kv_cache.transpose(1, 2)                                       # [blocks, block_size, Hkv, 2 hd]
    if tokens.is_contiguous():   # token-major memory (our layout): one row copy per token
        tokens.view(-1, *tokens.shape[2:]).index_copy_(0, slots, rows)
    else:
        bs = kv_cache.shape[2]
        kv_cache[slots // bs, :, slots % bs] = rows


class HTCPUAttentionBackend(CPUAttentionBackend):
    """Registered under the CPU_ATTN name (CpuPlatform selects no other backend)."""

    supported_kv_cache_dtypes = ["auto"]

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        return (KVCacheLayout.LBNHC,)   # token-major memory; see the module docstring

    @staticmethod
    def get_impl_cls():
        return HTAttentionImpl

    @staticmethod
    def get_builder_cls():
        return HTCPUMetadataBuilder
