"""An exactly equivalent copy of a Llama model whose attention heads split over N tensor-parallel ranks.

vLLM shards attention by heads, so TP=N needs N to divide both head counts. The default model has
9 query and 3 KV heads: TP=2 is refused. Padding adds whole KV groups (one KV head and its query
heads) whose q/k/v rows and o_proj columns are zero: a padded head attends uniformly over zero
values and its output is multiplied by zero columns, so every hidden state, logit and HT draft of
the copy equals the original's (up to float summation order). 9/3 heads -> 12/4 for N=2.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .config import ConfigError

PADDED_MARKER = ".vllm_ht_head_padded"
FORMAT = 1  # bump when the padding changes, so older copies are rebuilt


def splits_heads(heads: int, kv: int, tp: int) -> bool:
    """vLLM's rule: tp divides the query heads, and the KV heads split (kv >= tp) or replicate."""
    return heads % tp == 0 and (kv % tp == 0 if kv >= tp else tp % kv == 0)


def padded_head_counts(num_heads: int, num_kv_heads: int, tp: int) -> tuple[int, int]:
    """(heads, kv heads): unchanged when vLLM can already split them, else whole KV groups are
    added until `tp` divides both.

    9, 3, 2 -> (12, 4); 9, 3, 3 -> (9, 3); 8, 1, 8 -> (8, 1) (vLLM replicates the KV head)
    """
    if tp < 1:
        raise ConfigError(f"tensor-parallel size must be >= 1, got {tp}")
    if num_heads % num_kv_heads:
        raise ConfigError(f"{num_heads} query heads do not form whole groups over {num_kv_heads} KV heads")
    if splits_heads(num_heads, num_kv_heads, tp):
        return num_heads, num_kv_heads
    group = num_heads // num_kv_heads
    kv = -(-num_kv_heads // tp) * tp
    return kv * group, kv


def _pad_rows(w: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([w, w.new_zeros(rows - w.shape[0], *w.shape[1:])])


def pad_heads(src: str | Path, dst: str | Path, tp: int, progress: bool = True, force: bool = False) -> Path:
    """Write the padded copy of the HF folder `src` to `dst` (idempotent) and return `dst`."""
    src, dst = Path(src), Path(dst)
    raw = (src / "config.json").read_bytes()
    stamp = json.dumps({"format": FORMAT, "tp": tp, "source": str(src.resolve()),
                        "source_config_sha256": hashlib.sha256(raw).hexdigest()})
    marker = dst / PADDED_MARKER
    if not force and marker.is_file() and marker.read_text() == stamp:
        return dst
    cfg = json.loads(raw)
    if cfg.get("model_type") != "llama":
        raise ConfigError(f"head padding supports Llama-family folders; {src} has model_type "
                          f"{cfg.get('model_type')!r}. Pick a tensor-parallel size that divides its heads.")
    if cfg.get("attention_bias"):
        raise ConfigError(f"{src} has attention biases, which head padding does not handle; "
                          f"pick a tensor-parallel size that divides its heads.")
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
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
        save_file(tensors, tmp / f.name, metadata={"format": "pt"})
    cfg.update(num_attention_heads=new_heads, num_key_value_heads=new_kv, head_dim=head_dim)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (tmp / PADDED_MARKER).write_text(stamp)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return dst
