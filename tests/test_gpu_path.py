"""The CUDA path (gpu_worker.py, gpu_attention.py, engine_args.py), checked in the pieces a CPU runs.

vLLM's CUDA platform cannot even be imported on the CPU build, so these tests call what it calls:
the selected backend's `validate_configuration` with an sm90 capability (cuda.py
`get_attn_backend_cls`), `resolve_cudagraph_mode_and_sizes` with the builder's support level (the V1
runner's `_check_and_update_cudagraph_mode`), the metadata builder on CPU tensors, the forward
context the runner's `_model_forward` leaves for one forward, and worker selection on faked
platforms. Numerics, graph capture and replay need a GPU (scripts/device_check.py).
"""
from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import pytest
import torch
import vllm.platforms
from vllm import forward_context
from vllm.config import AttentionConfig, CompilationConfig, CompilationMode, CUDAGraphMode
from vllm.forward_context import BatchDescriptor, ForwardContext, get_forward_context
from vllm.platforms.interface import DeviceCapability, Platform, PlatformEnum
from vllm.utils.import_utils import resolve_obj_by_qualname
from vllm.v1.attention.backend import AttentionCGSupport, CommonAttentionMetadata
from vllm.v1.attention.backends import registry
from vllm.v1.attention.backends.registry import AttentionBackendEnum
from vllm.v1.attention.backends.triton_attn import (
    TritonAttentionBackend,
    TritonAttentionImpl,
    TritonAttentionMetadata,
    TritonAttentionMetadataBuilder,
)
from vllm.v1.attention.selector import AttentionSelectorConfig
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.worker.gpu_worker import Worker

from vllm_ht.config import ConfigError
from vllm_ht.kernels.cache_layout import ROWS
from vllm_ht.vllm import engine_args, gpu_attention, gpu_worker
from vllm_ht.vllm.attention import HTAttentionImpl, HTAttentionMetadata
from vllm_ht.vllm.gpu_attention import HTTritonAttentionBackend, HTTritonAttentionImpl, HTTritonMetadataBuilder
from vllm_ht.vllm.gpu_worker import ForwardMode, HTGPUModelRunner, HTGPUWorker, forward_mode, rows_mode
from vllm_ht.vllm.runner import HTRunnerMixin

SM90 = DeviceCapability(9, 0)                      # H100 / H200
HEADS, KV_HEADS, HEAD_SIZE, BLOCK = 9, 3, 64, 16   # the default model (SmolLM2-135M) and vLLM's block size
PIECEWISE, NONE = CUDAGraphMode.PIECEWISE, CUDAGraphMode.NONE


@pytest.fixture
def custom_slot(monkeypatch):
    """gpu_attention.register() into a private copy of vLLM's override table."""
    monkeypatch.setattr(registry, "_ATTN_OVERRIDES", dict(registry._ATTN_OVERRIDES))
    gpu_attention.register()


def on_platform(monkeypatch, kind: PlatformEnum, name: str) -> None:
    """vllm.platforms.current_platform as a bare Platform of `kind` (what is_cuda()/is_cpu() read)."""
    fake = type(f"Fake{name}Platform", (Platform,), {"_enum": kind, "device_name": name, "device_type": name})
    monkeypatch.setattr(vllm.platforms, "_current_platform", fake())


# -- the CUSTOM backend ------------------------------------------------------------------------

def test_custom_slot_resolves_to_the_ht_backend(custom_slot):
    backend = AttentionBackendEnum.CUSTOM.get_class()
    assert backend is HTTritonAttentionBackend and issubclass(backend, TritonAttentionBackend)
    # a layer maps its backend back through AttentionBackendEnum[get_name()] (attention.py)
    assert AttentionBackendEnum[backend.get_name()] is AttentionBackendEnum.CUSTOM
    assert issubclass(backend.get_builder_cls(), TritonAttentionMetadataBuilder)
    impl = backend.get_impl_cls()
    assert issubclass(impl, HTAttentionImpl) and issubclass(impl, TritonAttentionImpl)
    assert AttentionBackendEnum.TRITON_ATTN.get_class() is TritonAttentionBackend   # vLLM's own is untouched


def _validate(**changes) -> list[str]:
    """What CudaPlatform.get_attn_backend_cls asks the selected backend, on an sm90 GPU."""
    config = AttentionSelectorConfig(head_size=HEAD_SIZE, dtype=torch.bfloat16, kv_cache_dtype="auto",
                                     block_size=BLOCK)._replace(**changes)
    return AttentionBackendEnum.CUSTOM.get_class().validate_configuration(device_capability=SM90,
                                                                           **config._asdict())


def test_backend_validates_the_default_model_on_sm90(custom_slot):
    assert _validate() == []
    assert _validate(dtype=torch.float16) == []
    assert _validate(block_size=None) == []          # block size not given: vLLM picks 16
    assert _validate(head_size=128) == []


@pytest.mark.parametrize("change,reason", [
    ({"kv_cache_dtype": "fp8"}, "kv_cache_dtype not supported"),       # the tree kernel reads the model dtype
    ({"head_size": 80}, "head_size not supported"),                    # the tree kernel: a power of two
    ({"head_size": 16}, "head_size not supported"),                    # TRITON_ATTN: >= 32
    ({"block_size": 8}, "block_size not supported"),
    ({"has_sink": True}, "attention sinks not supported"),
    ({"has_sliding_window": True}, "sliding window not supported"),
    ({"attn_type": "encoder_only"}, "attention type encoder_only not supported"),
])
def test_backend_refuses_what_the_tree_kernel_cannot_do(custom_slot, change, reason):
    assert reason in _validate(**change)


def test_the_refusals_are_ours_not_triton_attns():
    config = AttentionSelectorConfig(head_size=80, dtype=torch.bfloat16, kv_cache_dtype="fp8", block_size=BLOCK,
                                     has_sink=True, has_sliding_window=True)
    assert TritonAttentionBackend.validate_configuration(device_capability=SM90, **config._asdict()) == []


def test_impl_refuses_what_the_tree_kernel_cannot_do():
    impl = HTTritonAttentionImpl(HEADS, HEAD_SIZE, 0.125, KV_HEADS, None, None, "auto")
    assert impl.num_queries_per_kv == HEADS // KV_HEADS and impl.sliding_window == (-1, -1)   # Triton's state
    with pytest.raises(ValueError, match="sliding_window"):
        HTTritonAttentionImpl(HEADS, HEAD_SIZE, 0.125, KV_HEADS, None, 4096, "auto")
    with pytest.raises(ValueError, match="quantised KV cache"):
        HTTritonAttentionImpl(HEADS, HEAD_SIZE, 0.125, KV_HEADS, None, None, "fp8")


# -- CUDA graphs ---------------------------------------------------------------------------------

def _resolved_mode(builder) -> CUDAGraphMode:
    """vLLM's default graph mode, resolved as the V1 runner does for one attention group."""
    config = CompilationConfig(mode=CompilationMode.VLLM_COMPILE, cudagraph_mode=CUDAGraphMode.FULL_AND_PIECEWISE)
    config.set_splitting_ops_for_v1(all2all_backend="naive")       # attention between the pieces
    support = builder.get_cudagraph_support(None, None)
    return config.resolve_cudagraph_mode_and_sizes(support, builder.__name__, uniform_decode_query_len=32)


def test_full_cuda_graphs_are_declined(monkeypatch):
    said = []
    monkeypatch.setattr(gpu_attention.log, "info_once", lambda msg, *args: said.append(msg))
    assert HTTritonMetadataBuilder.get_cudagraph_support(None, None) == AttentionCGSupport.NEVER
    assert _resolved_mode(HTTritonMetadataBuilder) == PIECEWISE
    assert any("full CUDA graphs would replay without HT's tree masks" in msg for msg in said)
    assert _resolved_mode(TritonAttentionMetadataBuilder) == CUDAGraphMode.FULL_AND_PIECEWISE   # vLLM's own


@pytest.mark.parametrize("mode,dispatched,rows,skip,expected", [
    (PIECEWISE, 16, 16, False, ForwardMode(PIECEWISE, False)),     # plain or tree step: graphs replay
    (PIECEWISE, 16, 22, False, ForwardMode(NONE, False)),          # + 6 pseudo rows: compiled, no graph
    (CUDAGraphMode.FULL, 16, 22, False, ForwardMode(NONE, False)),
    (NONE, 8192, 8200, False, ForwardMode(NONE, True)),            # past the compiled ranges: eager model
    (NONE, 8192, 8192, True, ForwardMode(NONE, True)),             # vLLM's own skip (encoder inputs) stays
    (PIECEWISE, None, 22, False, ForwardMode(PIECEWISE, False)),   # no descriptor: vLLM's choice
])
def test_forward_mode_for_pseudo_rows(mode, dispatched, rows, skip, expected):
    assert forward_mode(mode, dispatched, rows, max_compiled_rows=8192, skip_compiled=skip) == expected


def _context(mode: CUDAGraphMode, num_tokens: int) -> ForwardContext:
    return ForwardContext(no_compile_layers={}, attn_metadata={}, slot_mapping={}, cudagraph_runtime_mode=mode,
                          batch_descriptor=BatchDescriptor(num_tokens, num_reqs=4, uniform=True))


def test_rows_mode_sets_and_restores_the_forward_context():
    fc = _context(PIECEWISE, 16)
    before = fc.batch_descriptor
    with rows_mode(fc, 22, max_compiled_rows=8192):
        assert fc.cudagraph_runtime_mode == NONE and fc.batch_descriptor.num_tokens == 22
        assert not fc.batch_descriptor.uniform and fc.batch_descriptor.num_reqs is None
    assert fc.cudagraph_runtime_mode == PIECEWISE and fc.batch_descriptor is before
    with rows_mode(fc, 16, max_compiled_rows=8192):
        assert fc.cudagraph_runtime_mode == PIECEWISE and fc.batch_descriptor is before


def test_runner_forward_runs_pseudo_rows_without_graphs(monkeypatch):
    """Through HTGPUModelRunner's MRO: HTRunnerMixin (no HT step here) -> _GraphSafeForward -> vLLM's."""
    mro = HTGPUModelRunner.__mro__
    assert mro.index(HTRunnerMixin) < mro.index(gpu_worker._GraphSafeForward) < mro.index(GPUModelRunner)
    seen = []
    monkeypatch.setattr(GPUModelRunner, "_model_forward", lambda self, input_ids, *a, **k: seen.append(
        (get_forward_context().cudagraph_runtime_mode, get_forward_context().batch_descriptor.num_tokens)))
    runner = object.__new__(HTGPUModelRunner)
    runner.ht = None
    runner.compilation_config = SimpleNamespace(get_compile_ranges=lambda: [SimpleNamespace(end=8192)])
    monkeypatch.setattr(forward_context, "_forward_context", _context(PIECEWISE, 16))
    runner._model_forward(input_ids=torch.zeros(16, dtype=torch.int32), positions=torch.zeros(16))
    runner._model_forward(input_ids=torch.zeros(22, dtype=torch.int32), positions=torch.zeros(22))
    assert seen == [(PIECEWISE, 16), (NONE, 22)]
    assert get_forward_context().cudagraph_runtime_mode == PIECEWISE      # restored for vLLM's own use


# -- metadata builder and impl on CPU tensors ---------------------------------------------------

def _builder() -> HTTritonMetadataBuilder:
    model = SimpleNamespace(get_num_attention_heads=lambda parallel: HEADS, get_num_kv_heads=lambda parallel: KV_HEADS,
                            get_head_size=lambda: HEAD_SIZE, rswa_window=None)
    config = SimpleNamespace(model_config=model, parallel_config=None, scheduler_config=SimpleNamespace(max_num_seqs=8),
                             compilation_config=CompilationConfig(cudagraph_mode=PIECEWISE))
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=KV_HEADS, head_size=HEAD_SIZE, dtype=torch.bfloat16)
    return HTTritonMetadataBuilder(spec, ["model.layers.0.self_attn.attn"], config, torch.device("cpu"))


def _two_requests() -> CommonAttentionMetadata:
    """Request 0: 5 cached tokens + 3 rows this step; request 1: 17 cached + 1 row (a decode)."""
    qsl = torch.tensor([0, 3, 4], dtype=torch.int32)
    return CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl.clone(), seq_lens=torch.tensor([8, 18], dtype=torch.int32),
        num_reqs=2, num_actual_tokens=4, max_query_len=3, max_seq_len=18,
        block_table_tensor=torch.tensor([[4, 0], [2, 7]], dtype=torch.int32),
        slot_mapping=torch.tensor([69, 70, 71, 129], dtype=torch.int64))   # positions 5-7 in block 4; 17 in 7


def test_builder_returns_ht_metadata_with_tritons_inside():
    md = _builder().build(0, _two_requests())
    assert isinstance(md, HTAttentionMetadata) and md.cache_layout == ROWS and md.num_actual_tokens == 4
    assert md.query_start_loc.tolist() == [0, 3, 4] and md.query_start_loc.dtype == torch.int32
    assert md.context_lens.tolist() == [5, 17] and md.seq_lens.tolist() == [8, 18]
    assert md.block_table.tolist() == [[4, 0], [2, 7]] and md.slot_mapping.tolist() == [69, 70, 71, 129]
    assert md.causal_bits.tolist() == [[0b1], [0b11], [0b111], [0b1]]      # causal window of 3 rows, then 1
    assert isinstance(md.native, TritonAttentionMetadata)
    assert md.native.seq_lens.tolist() == [8, 18] and md.native.max_seq_len == 18 and md.native.num_actual_tokens == 4
    assert md.native.block_table.tolist() == [[4, 0], [2, 7]]


def test_builder_takes_the_real_row_count_under_padding():
    """vLLM's GPU runner pads 4 rows to a capture size of 8 and says num_actual_tokens=8; HT's rows
    are the requests' 4 (padding rows must never be read as real ones)."""
    common = _two_requests()
    padded = CommonAttentionMetadata(**{**vars(common), "num_actual_tokens": 8,
                                        "slot_mapping": torch.cat([common.slot_mapping, torch.full((4,), -1)])})
    md = _builder().build(0, padded)
    assert md.num_actual_tokens == 4 and md.causal_bits.shape[0] == 4


def test_impl_sends_causal_steps_and_cache_writes_to_triton(monkeypatch):
    calls = []
    monkeypatch.setattr(TritonAttentionImpl, "forward", lambda self, layer, q, k, v, cache, md, out, *a: calls.append(
        ("forward", md, out.shape[0])) or out)
    monkeypatch.setattr(TritonAttentionImpl, "do_kv_cache_update", lambda self, layer, k, v, cache, slots: calls.append(
        ("write", slots.tolist())))
    impl = HTTritonAttentionImpl(HEADS, HEAD_SIZE, 0.125, KV_HEADS, None, None, "auto")
    md = _builder().build(0, _two_requests())
    rows = torch.zeros(4, HEADS, HEAD_SIZE), torch.zeros(4, KV_HEADS, HEAD_SIZE)
    cache = torch.zeros(8, KV_HEADS, BLOCK, 2 * HEAD_SIZE)
    impl.do_kv_cache_update(None, rows[1], rows[1], cache, md.slot_mapping)
    impl.forward(None, rows[0], rows[1], rows[1], cache, md, torch.zeros_like(rows[0]))   # no HT step: causal
    assert calls == [("write", [69, 70, 71, 129]), ("forward", md.native, 4)]
    assert not cache.any()                                                     # HT's own writer did not run


# -- worker selection ------------------------------------------------------------------------------

def test_worker_cls_on_cuda_is_the_gpu_worker(monkeypatch):
    on_platform(monkeypatch, PlatformEnum.CUDA, "cuda")
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    path = engine_args.worker_cls()
    assert path == "vllm_ht.vllm.gpu_worker.HTGPUWorker"
    worker = resolve_obj_by_qualname(path)
    assert worker is HTGPUWorker and issubclass(worker, Worker)
    assert worker._make_model_runner is not Worker._make_model_runner
    assert {"ht_step_counts", "ht_kv_layout", "ht_source_counts"} <= set(dir(worker))


def test_worker_cls_on_cpu_is_unchanged():
    from vllm_ht.vllm.worker import HTCPUWorker

    assert engine_args.worker_cls() == "vllm_ht.vllm.worker.HTCPUWorker"
    assert {"ht_step_counts", "ht_kv_layout", "ht_source_counts"} <= set(dir(HTCPUWorker))


@pytest.mark.parametrize("kind,name", [(PlatformEnum.ROCM, "rocm"), (PlatformEnum.XPU, "xpu"),
                                       (PlatformEnum.TPU, "tpu")])
def test_worker_cls_refuses_other_platforms(monkeypatch, kind, name):
    on_platform(monkeypatch, kind, name)
    with pytest.raises(ConfigError, match=f"CPU build and on NVIDIA GPUs.*runs on {name}"):
        engine_args.worker_cls()


def test_v2_model_runner_is_refused_with_the_fix(monkeypatch):
    on_platform(monkeypatch, PlatformEnum.CUDA, "cuda")
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(ConfigError, match="Unset VLLM_USE_V2_MODEL_RUNNER"):
        engine_args.worker_cls()
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
    assert engine_args.worker_cls() == engine_args.GPU_WORKER
    # the worker checks vLLM's own decision too (watermarking or HiSparse force V2 without the variable)
    with pytest.raises(ConfigError, match="Unset VLLM_USE_V2_MODEL_RUNNER"):
        HTGPUWorker._make_model_runner(SimpleNamespace(use_v2_model_runner=True))


def test_worker_puts_the_ht_backend_in_force():
    config = AttentionConfig()
    gpu_worker.check_attention_backend(config)
    assert config.backend is AttentionBackendEnum.CUSTOM
    with pytest.raises(ConfigError, match="FLASH_ATTN was chosen"):
        gpu_worker.check_attention_backend(AttentionConfig(backend="FLASH_ATTN"))


# -- engine arguments --------------------------------------------------------------------------------

@pytest.fixture
def llama_dir(tmp_path):
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
              "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "num_hidden_layers": 30,
              "intermediate_size": 1536, "vocab_size": 49152}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


def test_engine_kwargs_select_the_ht_backend_on_cuda_only(monkeypatch, llama_dir):
    cpu = engine_args.ht_engine_kwargs(llama_dir)
    assert list(cpu) == ["speculative_config", "worker_cls", "hf_overrides", "additional_config"]
    on_platform(monkeypatch, PlatformEnum.CUDA, "cuda")
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    cuda = engine_args.ht_engine_kwargs(llama_dir)
    assert cuda["worker_cls"] == engine_args.GPU_WORKER and cuda["attention_config"] == {"backend": "CUSTOM"}
    assert AttentionConfig(**cuda["attention_config"]).backend is AttentionBackendEnum.CUSTOM   # vLLM parses it
    assert {k: v for k, v in cuda.items() if k not in ("worker_cls", "attention_config")} == \
           {k: v for k, v in cpu.items() if k != "worker_cls"}


def _serve_args(model: str, **extra) -> argparse.Namespace:
    return argparse.Namespace(model=model, speculative_model="hidden_transfer", ht_checkpoint=None, ht_num_nodes=None,
                              speculative_config=None, pipeline_parallel_size=1, distributed_executor_backend=None,
                              tensor_parallel_size=1, hf_overrides=None, additional_config=None,
                              attention_backend=None, attention_config=AttentionConfig(), **extra)


def test_serve_flags_select_the_ht_backend_on_cuda(monkeypatch, llama_dir):
    on_platform(monkeypatch, PlatformEnum.CUDA, "cuda")
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    args = _serve_args(llama_dir)
    default = args.attention_config
    engine_args.expand_namespace(args)
    assert args.worker_cls == engine_args.GPU_WORKER
    assert args.attention_config.backend is AttentionBackendEnum.CUSTOM and args.attention_backend is None
    assert default.backend is None              # the parser's shared default object is left alone
    args = _serve_args(llama_dir)
    args.attention_backend = "FLASH_ATTN"
    with pytest.raises(SystemExit, match="drop --attention-backend FLASH_ATTN"):
        engine_args.expand_namespace(args)


def test_gpu_worker_runs_the_self_check_once_before_vllm_arms_its_jit_monitor(monkeypatch):
    """The probe compiles HT's Triton kernels: it must run before vLLM starts warning (or failing) on
    unexpected compilations, once, and the worker answers the ht_self_check RPC."""
    calls = []
    monkeypatch.setattr(Worker, "_maybe_activate_jit_monitor", lambda self: calls.append("monitor"))
    worker = HTGPUWorker.__new__(HTGPUWorker)
    runner = SimpleNamespace(ht_self_check={})
    runner.ht_run_self_check = lambda: (calls.append("self-check"), runner.ht_self_check.update(passed=True))
    worker.model_runner = runner
    worker._maybe_activate_jit_monitor()
    worker.ht_self_check_once()                     # compile_or_warm_up_model's call after it: no second probe
    assert calls == ["self-check", "monitor"]
    assert worker.ht_self_check() == {"passed": True}
