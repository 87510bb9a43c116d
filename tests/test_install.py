"""scripts/install.sh's choice of the CPU torch wheel (scripts/torch_source.py): an explicit
TORCH_INDEX, else a local wheel in pip's find-links, else the PyTorch CPU index. Nothing is installed."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "torch_source.py"
spec = importlib.util.spec_from_file_location("torch_source", SCRIPT)
torch_source = importlib.util.module_from_spec(spec)
spec.loader.exec_module(torch_source)

VERSION = "2.13.0+cpu"
WHEEL = "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"
INDEX = "https://download.pytorch.org/whl/cpu"


def _args(folders, torch_index=None, tag="cp311", machine="x86_64"):
    return torch_source.torch_pip_args(VERSION, [str(f) for f in folders], torch_index, tag, machine)


@pytest.fixture
def wheels(tmp_path) -> Path:
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / WHEEL).touch()
    return tmp_path / "wheels"


def test_a_local_wheel_comes_first(wheels, tmp_path):
    assert _args([tmp_path / "missing", wheels]) == ["--find-links", str(wheels), "torch==2.13.0+cpu"]
    assert _args([f"file://{wheels}"]) == ["--find-links", str(wheels), "torch==2.13.0+cpu"]


def test_without_a_local_wheel_the_pytorch_cpu_index(tmp_path):
    assert _args([]) == ["--extra-index-url", INDEX, "torch==2.13.0+cpu"]
    assert _args([tmp_path]) == ["--extra-index-url", INDEX, "torch==2.13.0+cpu"]   # a folder without it


@pytest.mark.parametrize("name", [
    "torch-2.13.0+cpu-cp312-cp312-manylinux_2_28_x86_64.whl",    # another Python
    "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_aarch64.whl",   # another machine
    "torch-2.13.0-cp311-cp311-manylinux_2_28_x86_64.whl",        # the CUDA build
    "torch-2.12.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl",    # another version
])
def test_a_wheel_that_does_not_fit_is_not_taken(tmp_path, name):
    (tmp_path / name).touch()
    assert _args([tmp_path])[:2] == ["--extra-index-url", INDEX]


def test_an_explicit_torch_index_wins(wheels):
    assert _args([wheels], torch_index="https://mirror/whl/cpu") == [
        "--extra-index-url", "https://mirror/whl/cpu", "torch==2.13.0+cpu"]
    assert _args([wheels], torch_index="")[:1] == ["--find-links"]   # TORCH_INDEX="" means: decide


def _run(env: dict) -> list[str]:
    keep = {k: v for k, v in os.environ.items() if k not in ("PIP_FIND_LINKS", "TORCH_INDEX", "PIP_CONFIG_FILE")}
    out = subprocess.run([sys.executable, str(SCRIPT), VERSION], env={**keep, **env}, capture_output=True,
                         text=True, timeout=60, check=True)
    return out.stdout.split("\n")[:-1]


def test_the_script_reads_pip_find_links_and_pip_config(wheels, tmp_path):
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    if not WHEEL.startswith(f"torch-{VERSION}-{tag}-") or not WHEEL.endswith(f"_{os.uname().machine}.whl"):
        pytest.skip(f"the fake wheel is for cp311 x86_64, not {tag} {os.uname().machine}")
    assert _run({"PIP_FIND_LINKS": str(wheels)}) == ["--find-links", str(wheels), "torch==2.13.0+cpu"]
    # from pip's configuration file (the way our build machines set it), with no PIP_FIND_LINKS
    conf = tmp_path / "pip.conf"
    conf.write_text(f"[global]\nfind-links = {wheels}\n")
    assert _run({"PIP_CONFIG_FILE": str(conf)})[:2] == ["--find-links", str(wheels)]
    # a fresh machine: no find-links anywhere (PIP_CONFIG_FILE=/dev/null: pip reads no configuration)
    assert _run({"PIP_CONFIG_FILE": os.devnull}) == ["--extra-index-url", INDEX, "torch==2.13.0+cpu"]


def test_install_sh_takes_torch_from_the_decision():
    text = (REPO / "scripts" / "install.sh").read_text()
    assert 'scripts/torch_source.py "2.13.0+cpu"' in text and '"${PIP[@]}" "${TORCH_ARGS[@]}"' in text
