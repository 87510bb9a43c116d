"""A checkpoint folder: config.json (HiddenTransferConfig) + projections.safetensors.

Load errors name the file and the fix: missing folder/file, corrupt file, tensors whose shapes do
not fit the config (e.g. a hidden-size mismatch).
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ConfigError, HiddenTransferConfig
from .projections import TransferProjections

WEIGHTS_FILE = "projections.safetensors"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def save_checkpoint(folder: str | Path, config: HiddenTransferConfig,
                    projections: TransferProjections) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dtype = _DTYPES[config.dtype]
    tensors = {name: p.detach().to("cpu", dtype).contiguous()
               for name, p in projections.state_dict().items()}
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "vllm-ht"})
    config.save(folder)
    return folder


def load_checkpoint(folder: str | Path) -> tuple[HiddenTransferConfig, TransferProjections]:
    """-> (config, fp32 projections). Raises ConfigError with the fix on any problem."""
    config = HiddenTransferConfig.load(folder)
    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        raise ConfigError(f"{path} is missing: the checkpoint folder needs {WEIGHTS_FILE} next to "
                          f"config.json; re-copy or re-train the checkpoint.")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ConfigError(f"{path} is corrupt ({e}); re-copy or re-train the checkpoint.") from e
    projections = TransferProjections(config)
    expected = {name: tuple(p.shape) for name, p in projections.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in tensors.items()}
    if found != expected:
        raise ConfigError(f"{path} holds tensors {found} but config.json (num_steps={config.num_steps}, "
                          f"hidden_size={config.hidden_size}, bias={config.bias}, fuse_layers={config.fuse_layers}) expects {expected}; "
                          f"the weights and config.json do not belong together.")
    projections.load_state_dict({n: t.float() for n, t in tensors.items()})
    return config, projections
