"""Whether this CPU computes bf16 natively, and so which dtype a CPU engine should serve in.

Speculative decoding adds rows to a step (tree rows, pseudo rows, ngram drafts), and on a CPU
that only multiplies rows cheaply when the dtype is native. Without AVX512-BF16 or AMX, PyTorch
and vLLM's CPU build run bf16 matmuls by converting, at a cost that grows with every row: on a
2-core AMD EPYC (AVX2) a [n, 576] x [576, 1536] bf16 matmul took 125 us at n = 1 and 1,989 us at
n = 16, fp32 411 us; vLLM's plain decode step at batch 8 took 173 ms in bf16 and 62 ms in fp32
(docs/benchmarks.md, "CPUs without native bf16"). There every draft row costs about half a plain
step in bf16, so no draft pays, while fp32 steps cost the same as bf16 ones at batch 1.

Flags as Linux reports them in /proc/cpuinfo: x86 `avx512_bf16` / `amx_bf16`; Arm `bf16`
(the "Features" line). Elsewhere (no /proc/cpuinfo) nothing is claimed. This module imports
neither torch nor vLLM.
"""
from __future__ import annotations

from pathlib import Path

NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
CPUINFO = Path("/proc/cpuinfo")


def cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str] | None:
    """The first processor's feature flags, or None where the file is missing or has none."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return frozenset(value.split())
    return None


def native_bf16(cpuinfo: Path = CPUINFO) -> bool | None:
    """True / False where the flags tell, None where they cannot be read."""
    flags = cpu_flags(cpuinfo)
    return None if flags is None else bool(flags & NATIVE_BF16_FLAGS)


def serving_dtype(cpuinfo: Path = CPUINFO) -> str:
    """The dtype for a CPU engine here: bfloat16 where bf16 is native (or unknown), else float32."""
    return "float32" if native_bf16(cpuinfo) is False else "bfloat16"


def bf16_warning(dtype: str, cpuinfo: Path = CPUINFO) -> str | None:
    """The warning for serving `dtype` on this CPU, or None when there is nothing to say."""
    if "bfloat16" not in str(dtype) or native_bf16(cpuinfo) is not False:
        return None
    return ("vllm-ht: this CPU has no native bf16 (no AVX512-BF16 or AMX in /proc/cpuinfo): bf16 matmuls are "
            "converted, every extra row of a step costs about half a plain step, and speculative drafts "
            "cannot pay. Serve with --dtype float32 (about as fast at batch 1, faster in batches; "
            "`vllm-ht runtime` prints this CPU's dtype).")


if __name__ == "__main__":          # the Makefile's default DTYPE, before the venv exists
    print(serving_dtype())
