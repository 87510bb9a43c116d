"""Where scripts/install.sh takes the CPU torch wheel from, as pip arguments (one a line on stdout).

    python scripts/torch_source.py 2.13.0+cpu      # run with the venv's Python: its tag picks the wheel

In this order:
  1. TORCH_INDEX set and not empty: that index (the caller's explicit choice);
  2. a local wheel `torch-<version>-<this Python's tag>-...-<this machine>.whl` in one of pip's
     find-links folders (PIP_FIND_LINKS, or pip's configuration): that folder; our build machines;
  3. otherwise the PyTorch CPU wheel index, https://download.pytorch.org/whl/cpu: a fresh machine.
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

PYTORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def local_wheel(version: str, folders: list[str], python_tag: str, machine: str) -> Path | None:
    """The first wheel of torch==version for this Python and machine in the folders, or None.

    version "2.13.0+cpu", python_tag "cp311", machine "x86_64" matches
    torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl
    """
    prefix = f"torch-{version}-{python_tag}-"
    for folder in folders:
        path = Path(folder.removeprefix("file://"))
        if not path.is_dir():
            continue
        for wheel in sorted(path.glob("torch-*.whl")):
            if wheel.name.startswith(prefix) and wheel.name.endswith(f"_{machine}.whl"):
                return wheel
    return None


def torch_pip_args(version: str, folders: list[str], torch_index: str | None, python_tag: str,
                   machine: str) -> list[str]:
    """pip install arguments for torch==version (see the module docstring for the order)."""
    spec = f"torch=={version}"
    if torch_index:
        return ["--extra-index-url", torch_index, spec]
    wheel = local_wheel(version, folders, python_tag, machine)
    if wheel is not None:
        return ["--find-links", str(wheel.parent), spec]
    return ["--extra-index-url", PYTORCH_CPU_INDEX, spec]


def find_links_folders(env: dict[str, str]) -> list[str]:
    """pip's find-links: PIP_FIND_LINKS if set, else every `find-links` in pip's configuration."""
    if env.get("PIP_FIND_LINKS"):
        return env["PIP_FIND_LINKS"].split()
    try:
        out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                             timeout=60, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    folders = []
    for line in out.splitlines():   # global.find-links='/opt/wheels'
        key, _, value = line.partition("=")
        if key.endswith(".find-links"):
            folders += value.strip().strip("'\"").split()
    return folders


def main() -> None:
    version = sys.argv[1] if len(sys.argv) > 1 else "2.13.0+cpu"
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    args = torch_pip_args(version, find_links_folders(dict(os.environ)), os.environ.get("TORCH_INDEX"), tag,
                          platform.machine())
    print("\n".join(args))


if __name__ == "__main__":
    main()
