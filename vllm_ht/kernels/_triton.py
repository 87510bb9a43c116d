"""Triton for this package: native on a CUDA machine, the interpreter on a CPU-only one.

The Triton kernel modules import `triton` and `tl` from here, never directly, so this runs first:
on a machine without CUDA, if `TRITON_INTERPRET` is unset and triton is not imported yet, it sets
`TRITON_INTERPRET=1` and then imports triton. Kernels then run on CPU tensors in Triton's
interpreter (slow, for tests). Triton reads the switch when `triton.language` is imported (its
own helpers such as `tl.max` are `@jit` functions), so it cannot be turned on afterwards: if
triton was already imported without it on a CPU-only machine, importing a kernel module raises.
Fix that by setting `TRITON_INTERPRET=1` before the process imports triton (e.g. in a conftest).

NOTE: the switch is process-wide, so it is flipped only when a Triton kernel module is imported.
`import kernels` and the CPU path (`vllm_ht.kernels.reference`) never import triton, so a vLLM CPU
worker that uses the torch reference keeps its own Triton settings.
"""
import logging
import os
import sys

import torch

logger = logging.getLogger(__name__)

if "triton" not in sys.modules and not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"
    logger.info("no CUDA device: set TRITON_INTERPRET=1, Triton kernels run in the interpreter")

import triton
import triton.language as tl
from triton import knobs

if not torch.cuda.is_available() and not knobs.runtime.interpret:
    raise ImportError(
        "triton was imported without TRITON_INTERPRET=1 on a machine without CUDA, so the kernels in "
        f"{__package__} cannot run; set TRITON_INTERPRET=1 before anything imports triton")

__all__ = ["interpreting", "tl", "triton"]


def interpreting() -> bool:
    """True when kernels run in Triton's interpreter (on CPU tensors)."""
    return bool(knobs.runtime.interpret)
