"""The CUDA worker and model runner: vLLM's V1 GPU runner with HTRunnerMixin (runner.py).

`--worker-cls vllm_ht.vllm.gpu_worker.HTGPUWorker` (engine_args sets it on CUDA). The worker points
vLLM's CUSTOM attention slot at the HT backend (gpu_attention.py) before it builds the model, and
builds HTGPUModelRunner through `Worker._make_model_runner`, the hook vLLM documents for subclasses.
vLLM's V2 model runner has neither the hooks HT uses (`_model_forward`, `_sample`) nor custom_class
drafting: it is refused.

CUDA graphs and compilation, per forward (`forward_mode`): vLLM dispatches a graph mode for the row
count it padded the batch to. A step with pseudo rows runs more rows than that, so it runs without a
graph (a graph captured for another row count must not replay, and none may be captured while
serving), and past the largest row count vLLM compiled for (max_num_batched_tokens) it runs the
eager model. Every other step keeps vLLM's piecewise graphs.
"""
from __future__ import annotations

import dataclasses
import functools
from contextlib import contextmanager
from dataclasses import dataclass

from vllm.config import CUDAGraphMode
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.logger import init_logger
from vllm.v1.attention.backends.registry import AttentionBackendEnum
from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.worker.gpu_worker import Worker

from ..config import ConfigError
from . import gpu_attention
from .engine_args import V2_RUNNER_UNSUPPORTED
from .runner import HTRunnerMixin
from .worker_rpc import HTWorkerRPCs

# under vLLM's "vllm" logger, so its handler, format and VLLM_LOGGING_LEVEL show our lines
log = init_logger(f"vllm.{__name__}")


@dataclass(frozen=True)
class ForwardMode:
    """How one forward runs: the CUDA graph runtime mode, and whether the compiled model is bypassed."""
    cudagraph: CUDAGraphMode
    skip_compiled: bool


def forward_mode(mode: CUDAGraphMode, dispatched: int | None, rows: int, max_compiled_rows: int | None,
                 skip_compiled: bool = False) -> ForwardMode:
    """vLLM dispatched `mode` for `dispatched` rows (its batch descriptor; padded to a capture size);
    the forward runs `rows` rows (dispatched + this step's pseudo rows).

    Same row count: vLLM's choice stands. Otherwise no CUDA graph, and the eager model when `rows`
    passes `max_compiled_rows` (the largest row count the compiled model has a range for).
        (PIECEWISE, 16, 16, 8192) -> PIECEWISE           a plain or tree step: graphs replay
        (PIECEWISE, 16, 22, 8192) -> NONE                pseudo rows: compiled, no graph
        (NONE, 8192, 8200, 8192)  -> NONE, skip_compiled  past the compiled ranges: eager model
    """
    if dispatched is None or rows == dispatched:
        return ForwardMode(mode, skip_compiled)
    too_many = max_compiled_rows is not None and rows > max_compiled_rows
    return ForwardMode(CUDAGraphMode.NONE, skip_compiled or too_many)


def check_attention_backend(attention_config) -> None:
    """HT rows need the HT backend: a missing choice becomes CUSTOM, another backend is refused."""
    backend = attention_config.backend
    if backend is None:
        log.info("vllm-ht: attention backend CUSTOM (HT over TRITON_ATTN), set by the HT worker")
        attention_config.backend = AttentionBackendEnum.CUSTOM
    elif backend != AttentionBackendEnum.CUSTOM:
        raise ConfigError(f"Hidden Transfer on CUDA runs its own attention backend (vLLM's CUSTOM slot: TRITON_ATTN "
                          f"plus the tree kernel), but {backend.name} was chosen; drop --attention-backend / "
                          f"attention_config.backend (`--speculative-model hidden_transfer` selects CUSTOM).")


@contextmanager
def rows_mode(fc, rows: int, max_compiled_rows: int | None):
    """The forward context `fc` set for a forward over `rows` rows (`forward_mode`), restored after."""
    saved = fc.cudagraph_runtime_mode, fc.batch_descriptor, fc.skip_compiled
    desc = fc.batch_descriptor
    mode = forward_mode(fc.cudagraph_runtime_mode, desc.num_tokens if desc is not None else None, rows,
                        max_compiled_rows, fc.skip_compiled)
    fc.cudagraph_runtime_mode, fc.skip_compiled = mode.cudagraph, mode.skip_compiled
    if desc is not None and desc.num_tokens != rows:
        fc.batch_descriptor = dataclasses.replace(desc, num_tokens=rows, num_reqs=None, uniform=False)
    try:
        yield mode
    finally:
        fc.cudagraph_runtime_mode, fc.batch_descriptor, fc.skip_compiled = saved


class _GraphSafeForward(GPUModelRunner):
    """Sits between HTRunnerMixin and GPUModelRunner in the MRO, so it sees the rows the mixin runs
    (real + pseudo) and sets the forward context's graph mode for them (`rows_mode`)."""

    @functools.cached_property
    def _ht_max_compiled_rows(self) -> int | None:
        ranges = self.compilation_config.get_compile_ranges()
        return max(r.end for r in ranges) if ranges else None

    def _model_forward(self, input_ids=None, positions=None, intermediate_tensors=None, inputs_embeds=None,
                       **model_kwargs):
        rows = next((t.shape[0] for t in (input_ids, inputs_embeds) if t is not None), None)
        if rows is None or not is_forward_context_available():
            return super()._model_forward(input_ids, positions, intermediate_tensors, inputs_embeds, **model_kwargs)
        with rows_mode(get_forward_context(), rows, self._ht_max_compiled_rows):
            return super()._model_forward(input_ids, positions, intermediate_tensors, inputs_embeds, **model_kwargs)


class HTGPUModelRunner(HTRunnerMixin, _GraphSafeForward):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._ht_setup()


class HTGPUWorker(HTWorkerRPCs, Worker):
    def __init__(self, vllm_config, *args, **kwargs):
        # the HT backend in vLLM's CUSTOM slot, before the model (and its attention layers) is built here
        gpu_attention.register()
        check_attention_backend(vllm_config.attention_config)
        super().__init__(vllm_config, *args, **kwargs)

    def _maybe_activate_jit_monitor(self) -> None:
        # vLLM's warm-up ends by arming its monitor of unexpected Triton compilations: the
        # self-check (which also compiles HT's kernels) runs just before it
        self.ht_self_check_once()
        super()._maybe_activate_jit_monitor()

    def _make_model_runner(self) -> HTGPUModelRunner:
        if self.use_v2_model_runner:
            raise ConfigError(V2_RUNNER_UNSUPPORTED)
        return HTGPUModelRunner(self.vllm_config, self.device)
