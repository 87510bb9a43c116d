"""The Makefile's default DTYPE (`make -n`: printed, nothing runs): bf16 where scripts/install.sh
would install vLLM's CUDA build (a working `nvidia-smi -L`), else this CPU's serving dtype
(vllm_ht/cpu_features.py); DTYPE=... overrides."""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from vllm_ht.cpu_features import serving_dtype

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not (shutil.which("make") and shutil.which("python3")),
                                reason="needs make and python3 on PATH (what the Makefile runs)")


def _serve_dtype(tmp_path: Path, nvidia_smi_rc: int | None, *make_args: str) -> str:
    path = os.environ["PATH"]
    if nvidia_smi_rc is not None:               # a fake nvidia-smi first on PATH
        fake = tmp_path / "bin"
        fake.mkdir(exist_ok=True)
        (fake / "nvidia-smi").write_text(f"#!/bin/sh\necho 'GPU 0: test'\nexit {nvidia_smi_rc}\n")
        (fake / "nvidia-smi").chmod(0o755)
        path = f"{fake}:{path}"
    # an outer make (`make test DTYPE=...`) passes its variables down through MAKEFLAGS: drop them too
    dropped = {"DTYPE", "MAKEFLAGS", "MFLAGS", "MAKEOVERRIDES", "MAKELEVEL"}
    env = {k: v for k, v in os.environ.items() if k not in dropped} | {"PATH": path}
    proc = subprocess.run(["make", "-n", "serve", *make_args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    commands = proc.stdout.replace("\\\n", " ").splitlines()        # recipe lines continued with a backslash
    serve = [line for line in commands if " serve " in line]
    assert len(serve) == 1, proc.stdout
    return re.search(r"--dtype (\S+)", serve[0]).group(1)


def test_gpu_host_serves_bf16(tmp_path):
    assert _serve_dtype(tmp_path, 0) == "bfloat16"


@pytest.mark.parametrize("rc", [None, 9], ids=["no nvidia-smi", "nvidia-smi without a GPU"])
def test_cpu_host_serves_its_cpus_dtype(tmp_path, rc):
    if rc is None and any((Path(d) / "nvidia-smi").exists() for d in os.environ["PATH"].split(os.pathsep)):
        pytest.skip("this machine has an nvidia-smi on PATH")
    assert _serve_dtype(tmp_path, rc) == serving_dtype()


def test_dtype_given_wins(tmp_path):
    assert _serve_dtype(tmp_path, 0, "DTYPE=float32") == "float32"
