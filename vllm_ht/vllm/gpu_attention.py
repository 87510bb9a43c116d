"""The HT attention backend on CUDA: vLLM's TRITON_ATTN for causal rows, the tree kernel for the rest.

Registered in vLLM's CUSTOM slot (`register()`, which the GPU worker runs before it builds the
model) and chosen by `attention_config={"backend": "CUSTOM"}`, which engine_args sets on CUDA.

KV cache: TRITON_ATTN's own, unchanged: per layer the logical view
[num_blocks, num_kv_heads, block_size, 2 * head_size], K || V on the last axis. That is what
`vllm_ht.kernels.cache_layout` calls ROWS (any strides, so the LBNHC memory vLLM picks by default
reads as ROWS). TRITON_ATTN's writer stores the rows the slot mapping names, never the pseudo rows.

Per step and layer, HTAttentionImpl.forward (attention.py, shared with the CPU backends) sends
  causal real rows (no trees, or chains)  -> TritonAttentionImpl.forward (vLLM's unified attention)
  tree real rows                          -> attend(): kernels.tree_paged_attention, the tree mask
  pseudo rows                             -> attend(): the anchor's window plus their own group

CUDA graphs: the builder says AttentionCGSupport.NEVER, so vLLM resolves FULL_AND_PIECEWISE to
PIECEWISE (`CompilationConfig.resolve_cudagraph_mode_and_sizes`). A full graph replays the captured
plain model with no Python, so tree masks and pseudo rows would be skipped; piecewise graphs keep
attention eager, where the step's HTStep is read. (Steps with pseudo rows run without graphs at
all: gpu_worker.py.)
"""
from __future__ import annotations

from typing import ClassVar

from vllm.logger import init_logger
from vllm.v1.attention.backend import AttentionCGSupport, AttentionType
from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
from vllm.v1.attention.backends.triton_attn import (
    TritonAttentionBackend,
    TritonAttentionImpl,
    TritonAttentionMetadata,
    TritonAttentionMetadataBuilder,
)

from vllm_ht.kernels.cache_layout import ROWS

from .attention import HTAttentionImpl, HTAttentionMetadata, build_metadata

# under vLLM's "vllm" logger, so its handler, format and VLLM_LOGGING_LEVEL show our lines
log = init_logger(f"vllm.{__name__}")

BACKEND_NAME = "CUSTOM"   # AttentionBackendEnum.CUSTOM: vLLM's slot for an out-of-tree backend
FULL_GRAPHS_DECLINED = ("vllm-ht: full CUDA graphs would replay without HT's tree masks; piecewise graphs "
                        "are kept")


def register() -> None:
    """Point AttentionBackendEnum.CUSTOM at HTTritonAttentionBackend in this process (idempotent)."""
    register_backend(AttentionBackendEnum.CUSTOM, f"{__name__}.{HTTritonAttentionBackend.__qualname__}")


class HTTritonMetadataBuilder(TritonAttentionMetadataBuilder):
    """Ours plus TRITON_ATTN's own (`.native`: causal steps run vLLM's kernel)."""

    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
        log.info_once(FULL_GRAPHS_DECLINED)
        return cls._cudagraph_support

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False) -> HTAttentionMetadata:
        md = build_metadata(common_attn_metadata)
        md.native = super().build(common_prefix_len, common_attn_metadata, fast_build)
        return md


class HTTritonAttentionImpl(HTAttentionImpl, TritonAttentionImpl):
    """HTAttentionImpl's row dispatch with TritonAttentionImpl underneath: its forward for causal
    rows (`_native_forward`), its KV cache writer, and its state (scales, windows, sinks)."""

    cache_layout = ROWS

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int, alibi_slopes,
                 sliding_window, kv_cache_dtype: str, logits_soft_cap=None, attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name: str | None = None, sinks=None, **triton_kwargs) -> None:
        args = (num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks)
        HTAttentionImpl.__init__(self, *args)                   # refuses what the tree kernel does not do
        TritonAttentionImpl.__init__(self, *args, **triton_kwargs)
        self.supports_quant_query_input = False                 # the tree kernel reads unquantised queries

    def fused_output_quant_supported(self, quant_key) -> bool:
        return False                                            # tree and pseudo rows write plain outputs

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        TritonAttentionImpl.do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping)

    def _native_forward(self, layer, query, kv_cache, md: TritonAttentionMetadata, output, t: int):
        """vLLM's unified attention over this step's real rows (it reads its own metadata's counts)."""
        return TritonAttentionImpl.forward(self, layer, query, None, None, kv_cache, md, output)


class HTTritonAttentionBackend(TritonAttentionBackend):
    """TRITON_ATTN's cache and causal kernel, HT's rows; only what both kernels support."""

    supported_kv_cache_dtypes: ClassVar[list] = ["auto"]     # the tree kernel reads the model's dtype

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME   # vLLM maps a layer's backend back through AttentionBackendEnum[get_name()]

    @staticmethod
    def get_impl_cls() -> type[HTTritonAttentionImpl]:
        return HTTritonAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[HTTritonMetadataBuilder]:
        return HTTritonMetadataBuilder

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        # TRITON_ATTN takes >= 32; the tree kernel a power of two (kernels/tree_attention.py)
        return head_size >= 32 and head_size & (head_size - 1) == 0

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def supports_sink(cls) -> bool:
        return False

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return False

    @classmethod
    def supports_rswa(cls) -> bool:
        return False

    @classmethod
    def supports_non_causal(cls) -> bool:
        return False

    @classmethod
    def supports_mm_prefix(cls) -> bool:
        return False

    @classmethod
    def supports_alibi_sqrt(cls) -> bool:
        return False

    @classmethod
    def supports_batch_invariance(cls) -> bool:
        return False
