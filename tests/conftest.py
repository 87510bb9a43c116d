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


@pytest.fixture(scope="session")
def tiny_model():
    """A tiny random Llama (training tests)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    cfg.architectures = ["LlamaForCausalLM"]
    return LlamaForCausalLM(cfg).eval().requires_grad_(False)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """12 random prompt + response sequences for tiny_model, as `make-data` writes them."""
    import json

    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    g = torch.Generator().manual_seed(1)
    with open(path, "w") as f:
        for i in range(12):
            n_p, n_r = 3 + i % 4, 10 + (i * 7) % 13
            ids = torch.randint(3, 96, (n_p + n_r,), generator=g).tolist()
            f.write(json.dumps({"id": i, "prompt": "p", "prompt_ids": ids[:n_p], "response_ids": ids[n_p:]}) + "\n")
    return path
