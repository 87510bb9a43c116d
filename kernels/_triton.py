"""How this package compiles Triton kernels: natively on a GPU, interpreted on a CPU-only machine.

`jit` replaces `triton.jit` for every kernel in `kernels/`. With a GPU driver it *is* `triton.jit`.
Without one (no CUDA, `TRITON_INTERPRET` unset) it decorates the kernel with Triton's interpreter
switched on for that one decoration, so `from kernels import tree_attention` and launching its
kernels on CPU tensors work in any process, whatever imported triton first.

NOTE: we deliberately do not set `TRITON_INTERPRET=1` in `os.environ`. Triton reads the knob when a
kernel is *decorated*, so scoping it to our decorations is enough, and a process-wide switch would
also turn every other library's Triton kernels (vLLM's) into the ~1000x slower interpreter.
"""
import logging

import torch
import triton
from triton import knobs

logger = logging.getLogger(__name__)

# Decided once at import: a GPU driver appearing later in the process is not supported.
_NEEDS_INTERPRETER = not torch.cuda.is_available() and not knobs.runtime.interpret


def interpreting() -> bool:
    """True when this package's kernels run in Triton's interpreter (on CPU tensors)."""
    return _NEEDS_INTERPRETER or bool(knobs.runtime.interpret)


def jit(fn):
    """`triton.jit`, interpreted when the machine has no GPU (see module docstring)."""
    if not _NEEDS_INTERPRETER:
        return triton.jit(fn)
    with knobs.runtime.scope():
        knobs.runtime.interpret = True
        return triton.jit(fn)


if _NEEDS_INTERPRETER:
    logger.debug("no CUDA device: kernels in %s run in the Triton interpreter", __package__)
