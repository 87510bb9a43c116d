"""Kernel tests: Triton kernels run natively on CUDA, in Triton's interpreter otherwise.

`vllm_ht.kernels._triton` turns the interpreter on by itself when it is the first to import triton. This
conftest does it earlier, when pytest collects this folder, in case another test module imports
triton first (vLLM does): triton reads TRITON_INTERPRET once, when `triton.language` is imported.
It must therefore run before anything imports triton; a root conftest that imports vLLM would have
to do the same.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
