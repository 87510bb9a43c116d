"""vllm_ht/runtime.py: which libraries get preloaded, in what order, what the user's environment
keeps, and when `vllm-ht serve` re-executes itself. Fake .so files in tmp folders stand in for the
libraries, so nothing here depends on what this machine has installed."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vllm_ht import runtime
from vllm_ht.runtime import (
    IOMP,
    NO_PRELOAD_VAR,
    REEXEC_MARKER,
    TCMALLOC,
    describe,
    find_library,
    preload_env,
    reexec_plan,
    reexec_with_preload,
    split_preload,
)


def _libs(folder: Path, *names: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")  # only existence is checked; never loaded
    return folder


@pytest.fixture
def both(tmp_path) -> tuple[list[Path], Path, Path]:
    """Search dirs holding tcmalloc (system) and libiomp5 (venv), and the two paths."""
    system = _libs(tmp_path / "usr-lib", "libtcmalloc_minimal.so.4")
    venv = _libs(tmp_path / "venv-lib", "libiomp5.so")
    return [venv, system], system / "libtcmalloc_minimal.so.4", venv / "libiomp5.so"


def test_both_found_tcmalloc_first_and_blocktime_set(both):
    dirs, tcmalloc, iomp = both
    env = preload_env({"PATH": "/bin"}, dirs)
    assert env["LD_PRELOAD"] == f"{tcmalloc}:{iomp}"
    assert env["KMP_BLOCKTIME"] == "1"
    assert env["PATH"] == "/bin"


def test_input_is_not_modified(both):
    dirs, _, _ = both
    original = {"LD_PRELOAD": "/x/libfoo.so"}
    preload_env(original, dirs)
    assert original == {"LD_PRELOAD": "/x/libfoo.so"}


def test_nothing_found_changes_nothing(tmp_path):
    empty = _libs(tmp_path / "empty")
    assert preload_env({"A": "1"}, [empty]) == {"A": "1"}
    lines = describe({}, [empty])
    assert any(line.startswith("tcmalloc: - (not found; apt-get install libtcmalloc-minimal4") for line in lines), lines
    assert any(line.startswith("Intel OpenMP: - (not found; pip install intel-openmp") for line in lines), lines
    assert not any("KMP_BLOCKTIME" in line for line in lines)


def test_only_tcmalloc_found_sets_no_openmp_settings(tmp_path):
    system = _libs(tmp_path / "lib", "libtcmalloc_minimal.so.4")
    env = preload_env({}, [system])
    assert env == {"LD_PRELOAD": str(system / "libtcmalloc_minimal.so.4")}  # KMP_* only means something to iomp


def test_full_tcmalloc_when_minimal_is_missing_and_first_folder_wins(tmp_path):
    first = _libs(tmp_path / "a", "libtcmalloc.so.4")
    second = _libs(tmp_path / "b", "libtcmalloc_minimal.so.4")
    assert find_library(TCMALLOC, [first, second]) == first / "libtcmalloc.so.4"
    both_kinds = _libs(tmp_path / "c", "libtcmalloc.so.4", "libtcmalloc_minimal.so.4")
    assert find_library(TCMALLOC, [both_kinds]) == both_kinds / "libtcmalloc_minimal.so.4"
    assert find_library(IOMP, [first, second]) is None


def test_user_entries_kept_after_ours_without_duplicates(both):
    dirs, tcmalloc, iomp = both
    env = preload_env({"LD_PRELOAD": "/x/libfoo.so /y/libbar.so:/x/libfoo.so"}, dirs)
    assert split_preload(env["LD_PRELOAD"]) == [str(tcmalloc), str(iomp), "/x/libfoo.so", "/y/libbar.so"]


def test_a_library_already_preloaded_is_not_added_twice(both):
    dirs, _, iomp = both
    user = f"/opt/other/libtcmalloc.so.4:{iomp}"
    env = preload_env({"LD_PRELOAD": user}, dirs)
    assert split_preload(env["LD_PRELOAD"]) == ["/opt/other/libtcmalloc.so.4", str(iomp)]
    assert "tcmalloc: /opt/other/libtcmalloc.so.4 (already in LD_PRELOAD)" in describe({"LD_PRELOAD": user}, dirs)


@pytest.mark.parametrize("other", ["/torch/lib/libgomp.so.1", "/llvm/lib/libomp.so"])
def test_another_openmp_runtime_keeps_iomp_out(both, other):
    """vLLM asserts that libiomp and libgomp are not both preloaded."""
    dirs, tcmalloc, _ = both
    env = preload_env({"LD_PRELOAD": other}, dirs)
    assert split_preload(env["LD_PRELOAD"]) == [str(tcmalloc), other]
    assert "KMP_BLOCKTIME" not in env


def test_user_blocktime_wins(both):
    dirs, _, _ = both
    env = preload_env({"KMP_BLOCKTIME": "200"}, dirs)
    assert env["KMP_BLOCKTIME"] == "200"
    assert "KMP_BLOCKTIME=200 (user's)" in describe({"KMP_BLOCKTIME": "200"}, dirs)


@pytest.mark.parametrize("value,off", [("1", True), ("yes", True), ("0", False), ("", False)])
def test_opt_out(both, value, off):
    dirs, _, _ = both
    env = {NO_PRELOAD_VAR: value, "LD_PRELOAD": "/x/libfoo.so"}
    result = preload_env(env, dirs)
    assert (result == env) is off
    assert (reexec_plan(["serve"], env, dirs) is None) is off
    assert (describe(env, dirs) == [f"preload off ({NO_PRELOAD_VAR}={value})"]) is off


def test_reexec_plan_runs_the_cli_module_with_the_marker(both):
    dirs, tcmalloc, iomp = both
    plan = reexec_plan(["serve", "MODEL", "--port", "8001"], {"HOME": "/root"}, dirs)
    assert plan is not None
    argv, env = plan
    assert argv[0] == sys.executable
    assert argv[-6:] == ["-m", "vllm_ht.cli", "serve", "MODEL", "--port", "8001"]
    assert env["LD_PRELOAD"] == f"{tcmalloc}:{iomp}" and env[REEXEC_MARKER] == "1" and env["HOME"] == "/root"


def test_no_reexec_when_already_preloaded_or_nothing_found(both, tmp_path):
    dirs, tcmalloc, iomp = both
    assert reexec_plan(["serve"], {"LD_PRELOAD": f"{tcmalloc}:{iomp}"}, dirs) is None
    assert reexec_plan(["serve"], {}, [_libs(tmp_path / "empty")]) is None


def test_reexec_guard_stops_a_loop(both):
    """Even if the preload did not take (say, LD_PRELOAD was cleared), the marker stops a second exec."""
    dirs, _, _ = both
    calls = []
    reexec_with_preload(["serve"], {REEXEC_MARKER: "1"}, dirs, execve=lambda *a: calls.append(a))
    assert calls == []
    assert reexec_plan(["serve"], {REEXEC_MARKER: "1"}, dirs) is None


def test_reexec_with_preload_execs_once_with_the_plan(both):
    dirs, tcmalloc, iomp = both
    calls = []
    reexec_with_preload(["serve", "M"], {}, dirs, execve=lambda *a: calls.append(a))
    assert len(calls) == 1
    path, argv, env = calls[0]
    assert path == sys.executable and argv[-2:] == ["serve", "M"]
    assert env["LD_PRELOAD"] == f"{tcmalloc}:{iomp}" and env[REEXEC_MARKER] == "1"


def test_without_reexec_the_openmp_settings_still_apply(both):
    """The user preloaded both already: no exec, but KMP_BLOCKTIME goes into this process's env."""
    dirs, tcmalloc, iomp = both
    env = {"LD_PRELOAD": f"{tcmalloc}:{iomp}"}
    reexec_with_preload(["serve"], env, dirs, execve=lambda *a: pytest.fail("should not exec"))
    assert env["KMP_BLOCKTIME"] == "1"


def test_missing_library_is_a_warning(tmp_path, caplog):
    venv = _libs(tmp_path / "venv", "libiomp5.so")
    with caplog.at_level("INFO", logger=runtime.__name__):
        reexec_with_preload(["serve"], {}, [venv], execve=lambda *a: None)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["runtime: tcmalloc: - (not found; apt-get install libtcmalloc-minimal4 (Debian/Ubuntu))"]


def test_real_reexec_in_a_subprocess(both, tmp_path):
    """A real os.execve: the re-executed `vllm_ht.cli runtime` sees both fakes in LD_PRELOAD (the loader
    skips the empty fakes with a message on stderr) and the marker."""
    dirs, tcmalloc, iomp = both
    code = ("import os, sys; from pathlib import Path; from vllm_ht.runtime import reexec_with_preload; "
            f"reexec_with_preload(['runtime', '--env'], search_dirs={[str(d) for d in dirs]!r}); "
            "print('not re-executed'); sys.exit(3)")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env, check=False,
                          cwd=Path(runtime.__file__).parents[1])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"export LD_PRELOAD={tcmalloc}:{iomp}" in proc.stdout, proc.stdout
    assert "export KMP_BLOCKTIME=1" in proc.stdout
