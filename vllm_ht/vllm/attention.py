"""The HT attention backend: one attention op for every row kind, over one of two KV layouts.

KV layout, per layer the logical view [num_blocks, num_kv_heads, block_size, 2 * head_size]
(`vllm_ht.kernels.cache_layout` says what the memory means):
  - K_TRANSPOSED, vLLM CPU_ATTN's own packing, on CPUs whose attention ISA writes it ("vec",
    "vec16"; checked by a probe write at start-up, `cpu_cache_layout`; where vLLM's ISA packs
    otherwise, e.g. AMX tiles for bf16, HT runs the "vec" kernel instead). Real rows of a step
    without trees (or with chain drafts only) run vLLM's native CPU attention kernel, as plain vLLM
    does; tree rows and pseudo rows read the packed blocks through the planned torch path.
  - ROWS wherever the probe finds another packing (e.g. AMX tiles), or when asked: K || V on the
    last axis over token-major memory (vLLM's LBNHC), so the CPU path gathers a sequence's context
    as one row copy per token.

Every row attends to (a) its request's cached context (tokens before this step) and (b) this
step's window under a bitmask (`vllm_ht.kernels.tree_paged_attention`, Triton, on CUDA; on the CPU a
`vllm_ht.kernels.TreeAttentionPlan` built on the step's first layer and reused by the others). Plain
requests get a causal window; tree requests the tree mask from the runner's HTStep; pseudo rows
(step.py) the anchor's mask plus their own group.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from vllm import _custom_ops as ops
from vllm.forward_context import get_forward_context
from vllm.logger import init_logger
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import AttentionImpl, AttentionType
from vllm.v1.attention.backends.cpu_attn import (CPUAttentionBackend, CPUAttentionMetadata,
                                                 CPUAttentionMetadataBuilder, _get_attn_isa)
from vllm.v1.kv_cache_layout import KVCacheLayout

from vllm_ht import kernels
from vllm_ht.kernels.cache_layout import K_TRANSPOSED, ROWS, write_slots

from .step import HTStep, PseudoRows, causal_blocks, pack_blocks

STEP_KEY = "vllm_ht"
# under vLLM's "vllm" logger, so its handler, format and VLLM_LOGGING_LEVEL show our lines
log = init_logger(f"vllm.{__name__}")


def current_step() -> HTStep | None:
    try:
        return get_forward_context().additional_kwargs.get(STEP_KEY)
    except AssertionError:  # no forward context (e.g. a bare module call)
        return None


@dataclass
class HTAttentionMetadata:
    num_actual_tokens: int          # real rows (not vLLM's padded count): the requests' windows
    max_query_len: int
    query_start_loc: torch.Tensor   # [B + 1] int32
    seq_lens: torch.Tensor          # [B] int32, this step's rows included
    context_lens: torch.Tensor      # [B] int32, cached tokens before this step
    block_table: torch.Tensor       # [B, max_blocks] int32
    slot_mapping: torch.Tensor      # [T] int64
    causal_bits: torch.Tensor       # [T, words] int32: the causal window mask, for plain steps
    # CPU attention plans of this step, by row set ("real", "pseudo<join>", "joint<join>"); one metadata object serves
    # every layer of the step, so layer 0 builds a plan and the others reuse it.
    plans: dict = field(default_factory=dict)
    cache_layout: str = ROWS        # vllm_ht.kernels.cache_layout
    isa: str | None = None          # CPU_ATTN's ISA (K_TRANSPOSED caches): writes use its op
    # vLLM's own metadata (CPU_ATTN's; TRITON_ATTN's on CUDA, gpu_attention.py): causal steps run its kernel
    native: CPUAttentionMetadata | None = None


def attend(md: HTAttentionMetadata, rows: str, query, kv_cache, query_start_loc, window_key, window_value,
           window_mask, scale: float, out=None, window_start_loc=None) -> torch.Tensor:
    """Rows vs (cached context + this step's window keys); by default the window keys are the rows'
    own (window_start_loc = query_start_loc)."""
    wsl = query_start_loc if window_start_loc is None else window_start_loc
    args = (query, kv_cache, md.block_table, md.context_lens, query_start_loc, window_key, window_value,
            wsl, window_mask)
    if query.is_cuda:
        return kernels.tree_paged_attention(*args, scale, out=out)
    plan = md.plans.get(rows)
    if plan is None:
        plan = md.plans[rows] = kernels.TreeAttentionPlan.build(*args, out, cache_layout=md.cache_layout)
    return plan.run(query, kv_cache, window_key, window_value, scale, out)


def build_metadata(common) -> HTAttentionMetadata:
    qsl = common.query_start_loc_cpu.to(torch.int32)
    seq_lens = common.seq_lens.to(torch.int32)
    q_lens = (qsl[1:] - qsl[:-1])
    n = common.num_reqs
    qsl_dev = common.query_start_loc[: n + 1].to(torch.int32)
    # the real rows are the requests' windows, qsl[n]; vLLM's GPU runner passes a padded
    # num_actual_tokens when it pads the attention metadata (full CUDA graphs, which HT declines),
    # so HT reads the count from the windows and never from the padded figure
    return HTAttentionMetadata(
        num_actual_tokens=int(qsl[n]), max_query_len=common.max_query_len,
        query_start_loc=qsl_dev, seq_lens=seq_lens[:n],
        context_lens=seq_lens[:n] - qsl_dev.diff(),          # on the device: no host sync on CUDA
        block_table=common.block_table_tensor[:n], slot_mapping=common.slot_mapping[: common.num_actual_tokens],
        causal_bits=pack_blocks(causal_blocks(q_lens[:n].tolist())).to(seq_lens.device))


class HTCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    """CPU_ATTN's builder minus its ISA scheduler metadata (ROWS caches: torch path only)."""

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False) -> HTAttentionMetadata:
        return build_metadata(common_attn_metadata)


class HTNativeCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    """Ours plus CPU_ATTN's own (K_TRANSPOSED caches: causal steps run vLLM's kernel)."""

    def __init__(self, kv_cache_spec, layer_names, *args, **kwargs):
        super().__init__(kv_cache_spec, layer_names, *args, **kwargs)
        isa = ht_native_isa(self.isa, self.dtype, self.block_size, self.head_dim)
        if isa is None:
            raise RuntimeError(f"vllm-ht: no CPU attention ISA of this vLLM (tried {self.isa!r}, then "
                               f"{FALLBACK_ISAS}) packs the cache as {K_TRANSPOSED} (dtype {self.dtype}, block "
                               f"size {self.block_size}, head size {self.head_dim}), but the worker chose that "
                               f"layout; report this as a bug and set additional_config "
                               f"vllm_ht.cpu_cache_layout='rows' meanwhile")
        if isa != self.isa:              # e.g. AMX packs bf16 in tiles: run vLLM's AVX-512 kernel instead
            self.isa = isa
            self._set_isa_to_layers(layer_names)

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False) -> HTAttentionMetadata:
        md = build_metadata(common_attn_metadata)
        md.cache_layout, md.isa = K_TRANSPOSED, self.isa
        md.native = super().build(common_prefix_len, common_attn_metadata, fast_build)
        return md


class HTAttentionImpl(AttentionImpl):
    cache_layout = ROWS

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
        self._layer_index: int | None = None   # this layer's module index (from its name, on first use)
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name

    def do_kv_cache_update(self, layer, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                           slot_mapping: torch.Tensor) -> None:
        write_kv(kv_cache, key, value, slot_mapping, self.cache_layout, getattr(layer, "isa", None))

    def forward(self, layer, query, key, value, kv_cache, attn_metadata: HTAttentionMetadata | None, output,
                output_scale=None, output_block_scale=None) -> torch.Tensor:
        if attn_metadata is None:  # profiling / warm-up runs
            return output
        t = attn_metadata.num_actual_tokens          # real rows: from the metadata, not query.shape
        step = current_step()
        pseudo = step.pseudo if step is not None else None
        group = self._join_group(layer, pseudo)
        causal = step is None or step.causal
        if group is not None and not causal:         # tree + pseudo rows: one call over both
            self._joint_forward(query, key, value, kv_cache, attn_metadata, output, pseudo, group)
            return output
        if attn_metadata.native is not None and causal:   # real rows causal (no trees, or chains)
            self._native_forward(layer, query, kv_cache, attn_metadata.native, output, t)
        else:
            bits = step.real_mask_bits if step is not None else attn_metadata.causal_bits
            attend(attn_metadata, "real", query[:t].view(t, self.num_heads, self.head_size), kv_cache,
                   attn_metadata.query_start_loc, key[:t].view(t, self.num_kv_heads, self.head_size),
                   value[:t].view(t, self.num_kv_heads, self.head_size), bits.to(query.device), self.scale,
                   out=output[:t].view(t, self.num_heads, self.head_size))
        if pseudo is not None:
            self._pseudo_forward(query, key, value, kv_cache, attn_metadata, output, pseudo, group)
        return output

    def _join_group(self, layer, pseudo: PseudoRows | None) -> int | None:
        """The pseudo rows' join group at this layer (None: no pseudo rows, or below the first join)."""
        if pseudo is None:
            return None
        if self._layer_index is None:
            self._layer_index = extract_layer_index(layer.layer_name)
        return pseudo.group_for_layer(self._layer_index)

    def _joint_forward(self, query, key, value, kv_cache, md: HTAttentionMetadata, output, p: PseudoRows,
                       group: int) -> None:
        """Real and pseudo rows in one call, gathered per request in window order (step.py)."""
        rows, hd = p.window_rows.to(query.device), self.head_size
        loc = p.window_start_loc.to(query.device)
        out = attend(md, f"joint{group}", query.view(-1, self.num_heads, hd)[rows], kv_cache, loc,
                     key.view(-1, self.num_kv_heads, hd)[rows], value.view(-1, self.num_kv_heads, hd)[rows],
                     p.joint_masks[group].to(query.device), self.scale)
        output.view(-1, self.num_heads, hd)[rows] = out

    def _pseudo_forward(self, query, key, value, kv_cache, md: HTAttentionMetadata, output, p: PseudoRows,
                        group: int | None) -> None:
        """Pseudo rows: nothing below their transfer layer (zeros); from there, their anchor's
        context and window plus their own group (step.py), reading keys, never writing them."""
        rows = slice(p.start, p.start + p.num_rows)
        n, hd = p.num_rows, self.head_size
        out = output[rows].view(n, self.num_heads, hd)
        if group is None:
            out.zero_()
            return
        win = p.window_rows.to(query.device)
        kv_heads = self.num_kv_heads
        attend(md, f"pseudo{group}", query[rows].view(n, self.num_heads, hd), kv_cache,
               p.query_start_loc.to(query.device), key.view(-1, kv_heads, hd)[win],
               value.view(-1, kv_heads, hd)[win], p.masks[group].to(query.device), self.scale, out=out,
               window_start_loc=p.window_start_loc.to(query.device))

    def _native_forward(self, layer, query, kv_cache, md: CPUAttentionMetadata, output, t: int) -> torch.Tensor:
        """vLLM's CPU attention kernel (what CPU_ATTN runs), on a K_TRANSPOSED cache."""
        key_cache, value_cache = _native_halves(kv_cache)
        ops.cpu_attention_with_kv_cache(
            query=query[:t].view(t, self.num_heads, self.head_size), key_cache=key_cache,
            value_cache=value_cache, output=output[:t].view(t, self.num_heads, self.head_size),
            query_start_loc=md.query_start_loc, seq_lens=md.seq_lens, scale=self.scale, causal=md.causal,
            alibi_slopes=None, sliding_window=-1, block_table=md.block_table, softcap=0.0,
            scheduler_metadata=md.scheduler_metadata, s_aux=None, dynamic_causal=md.dynamic_causal)
        return output


class HTNativeAttentionImpl(HTAttentionImpl):
    cache_layout = K_TRANSPOSED


def _native_halves(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU_ATTN's (key_cache, value_cache) views: [blocks, Hkv, block_size, D] each, as its ops take them."""
    blocks, heads, block_size, _ = kv_cache.shape
    return kv_cache.view(blocks, heads, block_size * 2, -1).chunk(2, dim=2)


def native_cache_layout(isa: str, dtype: torch.dtype, block_size: int, head_size: int) -> str:
    """K_TRANSPOSED when CPU_ATTN's cache writer for `isa` packs K/V exactly that way, else ROWS.

    Checked, not assumed: random K/V go through vLLM's writer and through `vllm_ht.kernels.cache_layout`'s,
    and the two caches must be bit-identical (so an ISA that packs otherwise, e.g. AMX tiles, or a
    future vLLM that changes the packing, falls back to the ROWS layout instead of misreading)."""
    gen = torch.Generator().manual_seed(0)
    heads, blocks = 2, 3
    slots = torch.randperm(blocks * block_size, generator=gen)[: block_size + 3]
    key, value = (torch.randn(slots.numel(), heads, head_size, generator=gen).to(dtype) for _ in range(2))
    native = torch.zeros(blocks, heads, block_size, 2 * head_size, dtype=dtype)
    try:
        ops.cpu_attn_reshape_and_cache(key, value, *_native_halves(native), slots, isa)
    except (RuntimeError, NotImplementedError):   # the ISA is not built into this vLLM
        return ROWS
    ours = torch.zeros_like(native)
    write_slots(ours, torch.cat([key, value], dim=-1), slots, K_TRANSPOSED)
    return K_TRANSPOSED if torch.equal(native, ours) else ROWS


# vLLM CPU ISAs whose kernels take K_TRANSPOSED caches on most CPUs; tried, in this order, when the
# ISA vLLM picks packs otherwise (AMX tiles for bf16): every step that has no tree still runs vLLM's
# attention kernel, and tree rows read the cache with torch.
FALLBACK_ISAS = ("vec", "vec16")


def ht_native_isa(isa: str, dtype: torch.dtype, block_size: int, head_size: int) -> str | None:
    """The ISA HT runs vLLM's CPU attention kernel with: vLLM's own choice when it packs the cache
    as K_TRANSPOSED (checked by `native_cache_layout`), else the first fallback that does, else None."""
    for candidate in (isa, *[i for i in FALLBACK_ISAS if i != isa]):
        if native_cache_layout(candidate, dtype, block_size, head_size) == K_TRANSPOSED:
            return candidate
    return None


def cpu_backend_for(vllm_config, requested: str = "auto") -> str:
    """The HT CPU backend class (import path) for this engine: native layout when the probe allows."""
    isa = chosen = None
    if requested == "auto":
        mc, cc = vllm_config.model_config, vllm_config.cache_config
        isa = _get_attn_isa(mc.dtype, cc.block_size, mc.get_head_size(), cc.cache_dtype)
        chosen = ht_native_isa(isa, mc.dtype, cc.block_size, mc.get_head_size())
        requested = K_TRANSPOSED if chosen else ROWS
    log.info("vllm-ht: CPU KV cache layout %s%s", requested,
             f" (vLLM's own, ISA {chosen}{'' if chosen == isa else f' instead of {isa}, which packs otherwise'}; "
             f"steps without trees run its attention kernel)" if requested == K_TRANSPOSED
             else f" (no CPU_ATTN ISA packs a layout we read; vLLM picked {isa})" if isa else " (asked for)")
    name = "HTNativeCPUAttentionBackend" if requested == K_TRANSPOSED else "HTCPUAttentionBackend"
    return f"{__name__}.{name}"


def write_kv(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor,
             cache_layout: str = ROWS, isa: str | None = None) -> None:
    """key/value [T, Hkv, hd] -> slots (slot = block * block_size + offset; -1 = padding, skipped)."""
    t = slot_mapping.shape[0]
    if cache_layout == K_TRANSPOSED:   # vLLM's own writer (it skips -1 slots)
        ops.cpu_attn_reshape_and_cache(key[:t], value[:t], *_native_halves(kv_cache), slot_mapping, isa)
        return
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


class HTNativeCPUAttentionBackend(HTCPUAttentionBackend):
    """The same, over CPU_ATTN's own K_TRANSPOSED cache (its layout and block interiors)."""

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        return CPUAttentionBackend.supported_kv_cache_layouts()

    @staticmethod
    def get_impl_cls():
        return HTNativeAttentionImpl

    @staticmethod
    def get_builder_cls():
        return HTNativeCPUMetadataBuilder
