"""Whether this CPU computes bf16 natively, and so which dtype a CPU engine should serve in.

Speculative decoding adds rows to a step (tree rows, pseudo rows, ngram drafts), and on a CPU
those rows are cheap only in a dtype the CPU multiplies natively. Without bf16 instructions
(x86: AVX512-BF16 or AMX-BF16; Arm: the BF16 extension) PyTorch and vLLM's CPU build convert bf16,
at a cost that grows with every row. Measured on a 2-core AMD EPYC with AVX2 only
(`benchmarks/cpu_dtype.py`, docs/benchmarks.md "CPUs without native bf16"): vLLM's plain decode
step at batch 8 took 173 ms in bf16 and 62 ms in fp32 (39 and 40 ms at batch 1), and the
calibrated cost of one draft row was 0.49 plain steps in bf16 against 0.12 in fp32. So where bf16
is not native, HT (and any speculative method) serves in fp32.

Flags as Linux reports them in /proc/cpuinfo: x86 `avx512_bf16` / `amx_bf16` (the "flags" line),
Arm `bf16` (the "Features" line). Other machines (s390x's "features" line has none of these, no
/proc/cpuinfo at all) claim nothing: bf16 stays. CPUs with AVX-512 but without its BF16 part count
as not native; that was not measured here. This module imports neither torch nor vLLM: the
Makefile runs it as a script before the virtualenv exists.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
FLAG_KEYS = ("flags", "features")
CPUINFO = Path("/proc/cpuinfo")


def cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str] | None:
    """The first processor's feature flags, or None where the file is missing or has none."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in FLAG_KEYS:
            return frozenset(value.split())
    return None


def native_bf16(cpuinfo: Path = CPUINFO) -> bool | None:
    """True / False where x86 or Arm flags tell, None where they cannot (unreadable, other ISAs)."""
    flags = cpu_flags(cpuinfo)
    if flags is None or not flags & {"avx2", "avx", "sse2", "asimd", "fp"}:
        return None
    return bool(flags & NATIVE_BF16_FLAGS)


def serving_dtype(cpuinfo: Path = CPUINFO) -> str:
    """The dtype for a CPU engine here: bfloat16 where bf16 is native (or unknown), else float32."""
    return "float32" if native_bf16(cpuinfo) is False else "bfloat16"


def training_dtype(cpu_build: bool, cpuinfo: Path = CPUINFO) -> str:
    """`make-data`'s dtype for the training set: bf16, except on vLLM's CPU build (`cpu_build`:
    vllm_ht.vllm.launcher.is_cpu_build) where this CPU has no native bf16. There bf16 generation ran
    ~5x slower than fp32 (a 2-core AVX2 CPU wrote 128 answers in 16 minutes, in 3.2 in fp32 eager),
    so the answers are made in fp32, the dtype such a machine serves in."""
    return serving_dtype(cpuinfo) if cpu_build else "bfloat16"


def bf16_warning(dtype: str, cpuinfo: Path = CPUINFO) -> str | None:
    """The warning for serving `dtype` on this CPU, or None when there is nothing to say."""
    if "bfloat16" not in str(dtype) or native_bf16(cpuinfo) is not False:
        return None
    return ("vllm-ht: this CPU has no native bf16 (no AVX512-BF16 / AMX-BF16 / Arm BF16 in /proc/cpuinfo): bf16 "
            "matmuls are converted and every extra row of a step costs far more than in fp32 (0.49 against "
            "0.12 plain steps on an AVX2 CPU), so speculative drafts rarely pay. Serve with --dtype float32 "
            "(`vllm-ht runtime --dtype` prints this CPU's dtype; `vllm-ht serve` picks it when --dtype is not given).")


def with_serving_dtype(argv: Sequence[str], cpu_build: bool, cpuinfo: Path = CPUINFO) -> list[str]:
    """`vllm-ht serve` arguments: unchanged when they name a dtype or this is not vLLM's CPU build
    (`cpu_build`: vllm_ht.vllm.launcher.is_cpu_build); else with `--dtype float32` added where bf16
    is not native (says so on stderr)."""
    argv = list(argv)
    if any(a == "--dtype" or a.startswith("--dtype=") for a in argv):
        return argv
    if not cpu_build or serving_dtype(cpuinfo) != "float32":
        return argv
    import sys

    print("vllm-ht serve: no --dtype given and this CPU has no native bf16: serving in float32 "
          "(pass --dtype to choose; vllm_ht/cpu_features.py)", file=sys.stderr)
    return [*argv, "--dtype", "float32"]


if __name__ == "__main__":          # the Makefile's default DTYPE, before the venv exists
    print(serving_dtype())
