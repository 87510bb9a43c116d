"""Which tests need vLLM's CPU build, and why they cannot run on this machine (if so).

vLLM's CPU wheel is what `make install` sets up. On a machine with an NVIDIA GPU, vLLM would pick its
CUDA platform (or is not installed at all, as on the project's GPU check machine): the tests that
start vLLM engines or import vLLM skip there with the reason, and the GPU path is checked by
scripts/device_check.py instead. Kernel tests keep running (their CPU paths, and CUDA where present).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

NEEDS_VLLM_CPU_DIRS = ("e2e", "reliability")                           # start vLLM engines / servers
NEEDS_VLLM_CPU_FILES = ("test_cpu_cache_layout.py", "test_step.py",   # import vLLM's CPU ops / runner
                        "test_top_k_guard.py",                         # a guard installed on CPU only
                        "test_gpu_path.py",                            # the CUDA path's pieces, on vLLM's CPU build
                        "test_self_check.py",                          # the start-up self-check's report
                        "test_proposer_lookup.py")                     # the drafter (imports vLLM's logger)


def needs_vllm_cpu(path: Path) -> bool:
    path = Path(path)
    return path.name in NEEDS_VLLM_CPU_FILES or any(part in NEEDS_VLLM_CPU_DIRS for part in path.parts[-3:-1])


def vllm_cpu_unavailable(cuda_available: bool, vllm_installed: bool) -> str | None:
    """The reason the vLLM CPU-build tests cannot run here, or None when they can."""
    if cuda_available:
        return ("a CUDA GPU is present: these tests run vLLM's CPU build (the GPU path is checked by "
                "scripts/device_check.py)")
    if not vllm_installed:
        return "vLLM is not installed: `make install` sets up vLLM's CPU build"
    return None


def reason_here() -> str | None:
    import torch

    return vllm_cpu_unavailable(torch.cuda.is_available(), importlib.util.find_spec("vllm") is not None)
