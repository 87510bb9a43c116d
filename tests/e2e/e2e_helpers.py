"""End-to-end helpers: each vLLM engine runs in its own process (`python -m vllm_ht.tools.offline`)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_ht.runtime import preload_env

REPO = Path(__file__).resolve().parents[2]
CHECKPOINT = REPO / "checkpoints" / "smollm2-135m-instruct"
MT_BENCH = REPO / "data" / "mt_bench_question.jsonl"


def run_engine(model_dir, out: Path, *args: str, timeout: int = 390, eager: bool = True,
               single_process: bool = True) -> dict:
    """One engine, one process; fp32 unless the args say otherwise; eager unless eager=False;
    engine core and worker in that process (the offline tool's --single-process: ~35 s less start-up
    per engine) unless single_process=False, vLLM's served layout (compiled e2e, tensor parallel).
    timeout: a hung engine fails with its own error, inside pytest's 1200 s per test (pytest.ini),
    even for a test or fixture that runs three engines; a test that raises it raises its own pytest
    timeout mark too (test_sampling_e2e.py)."""
    proc = run_engine_process(model_dir, out, *args, timeout=timeout, eager=eager, single_process=single_process)
    if proc.returncode != 0:
        raise AssertionError(f"engine failed ({' '.join(args)}):\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def run_engine_process(model_dir, out: Path, *args: str, timeout: int = 390, eager: bool = True,
                       single_process: bool = True) -> subprocess.CompletedProcess:
    """run_engine's process, returned as it ended (for tests that expect the engine to fail)."""
    cmd = [sys.executable, "-m", "vllm_ht.tools.offline", "--model", str(model_dir), "--prompts", str(MT_BENCH),
           "--dtype", "float32", *(["--enforce-eager"] if eager else []),
           *(["--single-process"] if single_process else []), "--out", str(out), *args]
    # the runtime `vllm-ht serve` and the benchmark use (tcmalloc + Intel OpenMP preloaded)
    env = {**preload_env(os.environ), "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


# The session's plain vLLM reference (tests/e2e/conftest.py: plain_reference): greedy fp32 tokens,
# eager, one process, the first REFERENCE_PROMPTS MT-bench prompts x REFERENCE_TOKENS, --ignore-eos.
REFERENCE_PROMPTS, REFERENCE_TOKENS = 12, 64
REFERENCE_ARGS = ("--limit", str(REFERENCE_PROMPTS), "--max-tokens", str(REFERENCE_TOKENS), "--ignore-eos",
                  "--batch-sizes", "1,8")


def plain_greedy(reference: dict, n: int, tokens: int) -> list[list[int]]:
    """Plain vLLM's greedy fp32 tokens for the first n MT-bench prompts, `tokens` each (--ignore-eos),
    taken from the session's reference run instead of another plain engine. Greedy fp32 decoding in
    vLLM's CPU build is batch invariant (test_offline_e2e.py checks the reference's batch 1 against
    its batch 8), and a smaller max_tokens only stops the same decoding earlier."""
    if n > REFERENCE_PROMPTS or tokens > REFERENCE_TOKENS:
        raise ValueError(f"the plain reference has {REFERENCE_PROMPTS} prompts x {REFERENCE_TOKENS} tokens, "
                         f"not {n} x {tokens}: raise REFERENCE_PROMPTS / REFERENCE_TOKENS")
    outputs = reference["runs"]["1"]["outputs"][:n]
    assert all(len(o) == REFERENCE_TOKENS for o in outputs), "the reference ran with --ignore-eos"
    return [o[:tokens] for o in outputs]


def cheap_calibration(path: Path) -> Path:
    """A calibration file as `vllm-ht calibrate` writes it, with cheap rows: the default policy
    drafts regardless of this machine's measured costs (on a 2-core AVX2 CPU they make it draft
    nothing), and the policy, not the test, still picks the tree and its anchors."""
    from vllm_ht.calibration import save
    from vllm_ht.policy import StepCost

    save(path, StepCost(row=0.02, pseudo_row=0.01, fixed=0.05, context=0.0, batch_row=0.02), {}, {})
    return path


def trained_checkpoint() -> Path:
    if not (CHECKPOINT / "config.json").is_file():
        pytest.fail("checkpoints/smollm2-135m-instruct is missing: the shipped checkpoint is part of the repo")
    return CHECKPOINT
