"""An exactly equivalent copy of a Llama model whose attention heads split over N tensor-parallel ranks.

vLLM shards attention by heads, so TP=N needs N to divide both head counts. The default model has
9 query and 3 KV heads: TP=2 is refused. Padding adds whole KV groups (one KV head and its query
heads) whose q/k/v rows and o_proj columns are zero: a padded head attends uniformly over zero
values and its output is multiplied by zero columns, so every hidden state, logit and HT draft of
the copy equals the original's (up to float summation order). 9/3 heads -> 12/4 for N=2.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .config import ConfigError

PADDED_MARKER = ".vllm_ht_head_padded"


def padded_head_counts(num_heads: int, num_kv_heads: int, tp: int) -> tuple[int, int]:
    """(heads, kv heads) after padding whole KV groups until `tp` divides both.

    9, 3, 2 -> (12, 4); 9, 3, 3 -> (9, 3); 32, 8, 4 -> (32, 8)
    """
    if tp < 1:
        raise ConfigError(f"tensor-parallel size must be >= 1, got {tp}")
    if num_heads % num_kv_heads:
        raise ConfigError(f"{num_heads} query heads do not form whole groups over {num_kv_heads} KV heads")
    group = num_heads // num_kv_heads
    kv = -(-num_kv_heads // tp) * tp
    return kv * group, kv


def _pad_rows(w: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([w, w.new_zeros(rows - w.shape[0], *w.shape[1:])])


def pad_heads(src: str | Path, dst: str | Path, tp: int, progress: bool = True, force: bool = False) -> Path:
    """Write the padded copy of the HF folder `src` to `dst` (idempotent) and return `dst`."""
    src, dst = Path(src), Path(dst)
    if (dst / PADDED_MARKER).is_file() and not force:
        return dst
    cfg = json.loads((src / "config.json").read_text())
    if cfg.get("model_type") != "llama":
        raise ConfigError(f"head padding supports Llama-family folders; {src} has model_type "
                          f"{cfg.get('model_type')!r}. Pick a tensor-parallel size that divides its heads.")
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    new_heads, new_kv = padded_head_counts(heads, kv, tp)
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{src} has no .safetensors weights to pad")
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("*.safetensors", ".vllm_ht_*"))
    for f in tqdm(files, desc=f"pad heads for TP={tp}", disable=not progress):
        tensors = load_file(f)
        for name, w in tensors.items():
            if name.endswith("self_attn.q_proj.weight"):
                tensors[name] = _pad_rows(w, new_heads * head_dim)
            elif name.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight")):
                tensors[name] = _pad_rows(w, new_kv * head_dim)
            elif name.endswith("self_attn.o_proj.weight"):
                tensors[name] = _pad_rows(w.t(), new_heads * head_dim).t().contiguous()
            elif "self_attn" in name and name.endswith(".bias"):
                raise ConfigError(f"{name}: attention biases are not padded; use a TP size dividing the heads")
        save_file(tensors, tmp / f.name, metadata={"format": "pt"})
    cfg.update(num_attention_heads=new_heads, num_key_value_heads=new_kv, head_dim=head_dim)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (tmp / PADDED_MARKER).write_text(f"{src} heads {heads}/{kv} -> {new_heads}/{new_kv} for TP={tp}\n")
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return dst
