"""The offline engine tool's command line (vllm_ht/tools/offline.py), without starting an engine."""
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_ht.tools.offline import build_parser, tokens_per_step


def test_single_process_is_refused_with_tensor_parallelism():
    proc = subprocess.run([sys.executable, "-m", "vllm_ht.tools.offline", "--model", "m", "--prompts", "p",
                           "--out", "o", "--single-process", "--tensor-parallel-size", "2"],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2
    assert "--single-process runs one worker: drop it for --tensor-parallel-size > 1" in proc.stderr


def test_single_process_is_off_unless_asked():
    base = ["--model", "m", "--prompts", "p", "--out", "o"]
    assert build_parser().parse_args(base).single_process is False
    assert build_parser().parse_args([*base, "--single-process"]).single_process is True


def test_tokens_per_step_counts_the_steps_that_did_not_draft():
    """A request of 10 tokens: 2 steps drafted and accepted 2 each (3 tokens each), 4 steps found
    nothing to draft (1 token each). vLLM's mean acceptance length says 3 (its drafted steps only);
    per step the request gained 10 / 6 tokens."""
    assert tokens_per_step(10, 4) == pytest.approx(10 / 6)
    assert tokens_per_step(10, 0) == 1.0
    assert tokens_per_step(0, 0) is None
