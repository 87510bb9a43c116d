"""How the package switches Triton to its interpreter on a CPU-only machine (fresh processes,
since the switch happens once per process; see vllm_ht/kernels/_triton.py)."""
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RUN_KERNEL = """
import os, sys
from vllm_ht import kernels
assert "triton" not in sys.modules, "importing vllm_ht.kernels must not import triton"
from vllm_ht.kernels import tree_attention
assert os.environ["TRITON_INTERPRET"] == "1"
from vllm_ht.kernels.testing import make_problem
p = make_problem([2], [5])
out = tree_attention.tree_paged_attention(*p.args())
assert not out.isnan().any()
print("ok")
"""


def run_python(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", code], check=False, env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_kernels_run_without_triton_interpret_in_the_environment():
    result = run_python(RUN_KERNEL)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_triton_imported_first_gives_a_clear_error():
    result = run_python("import triton\nimport vllm_ht.kernels.tree_attention")
    assert result.returncode != 0
    assert "set TRITON_INTERPRET=1 before anything imports triton" in result.stderr
