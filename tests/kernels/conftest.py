"""Kernel tests: Triton kernels run natively on CUDA, in Triton's interpreter otherwise.

Natively, Triton cannot read CPU tensors. On a CUDA machine every test that runs a Triton kernel
(`tree_paged_attention`, `kv_compact`) therefore runs with CUDA as torch's default device, so the
problems it draws (`vllm_ht.kernels.testing`, torch factories without a device) live there; the
torch references and the CPU path's tests keep CPU tensors. Without CUDA nothing changes: CPU
tensors, the interpreter.

`vllm_ht.kernels._triton` turns the interpreter on by itself when it is the first to import triton. This
conftest does it earlier, when pytest collects this folder, in case another test module imports
triton first (vLLM does): triton reads TRITON_INTERPRET once, when `triton.language` is imported.
It must therefore run before anything imports triton; a root conftest that imports vLLM would have
to do the same.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

TRITON_KERNELS = ("tree_paged_attention", "kv_compact")     # `impl` parameters that are Triton kernels
TRITON_MODULES = ("test_tree_attention.py",)                # modules whose tests call them directly
# argument-validation tests keep CPU tensors everywhere: validation raises before any launch, and
# its value checks (start locations, block ids, moves) run for CPU tensors only, since on a GPU
# they would cost a device sync per call (vllm_ht/kernels/_checks.py)
VALIDATION_TESTS = ("test_bad_", "test_mismatched_", "test_rejects_")


def runs_triton(item) -> bool:
    if getattr(item, "originalname", item.name).startswith(VALIDATION_TESTS):
        return False
    callspec = getattr(item, "callspec", None)
    impl = callspec.params.get("impl") if callspec is not None else None
    if impl is not None:
        return getattr(impl, "__name__", "") in TRITON_KERNELS
    return item.path.name in TRITON_MODULES


@pytest.fixture(autouse=True)
def kernel_device(request):
    if torch.cuda.is_available() and runs_triton(request.node):
        with torch.device("cuda"):
            yield
    else:
        yield
