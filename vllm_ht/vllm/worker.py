"""The CPU worker that installs the HT model runner and the HT attention backend.

Selected with `--worker-cls` (the `--speculative-model hidden_transfer` alias sets it on CPU; the
CUDA worker is gpu_worker.py). Its RPCs (ht_step_counts, ...) are worker_rpc.py's, shared with it.
"""
from __future__ import annotations

from unittest.mock import patch

from vllm.logger import init_logger
from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
from vllm.v1.worker import cpu_worker
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker

from .attention import cpu_backend_for
from ..cpu_features import bf16_warning
from ..options import HTOptions
from .runner import HTRunnerMixin
from .worker_rpc import HTWorkerRPCs

log = init_logger(f"vllm.{__name__}")


class HTCPUModelRunner(HTRunnerMixin, CPUModelRunner):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._ht_setup()


class HTCPUWorker(HTWorkerRPCs, CPUWorker):
    def __init__(self, vllm_config, *args, **kwargs):
        # CpuPlatform always picks CPU_ATTN: point that name at the HT backend (the one over
        # CPU_ATTN's own cache layout when this CPU's attention ISA writes a layout we read)
        # before the model (and its attention layers) is built in this process.
        requested = HTOptions.from_vllm_config(vllm_config).cpu_cache_layout
        register_backend(AttentionBackendEnum.CPU_ATTN, cpu_backend_for(vllm_config, requested))
        if warning := bf16_warning(vllm_config.model_config.dtype):       # each worker: once per TP rank
            log.warning(warning)
        super().__init__(vllm_config, *args, **kwargs)

    def init_device(self):
        # CPUWorker builds its runner inline from the module global: swap the class in for that call
        with patch.object(cpu_worker, "CPUModelRunner", HTCPUModelRunner):
            super().init_device()
