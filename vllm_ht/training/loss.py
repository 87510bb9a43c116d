"""The distillation loss: KL(p_real || q_draft) per valid (anchor, step), computed in row chunks.

Logits are [rows, V] with V = 49152 for the default model; chunks are recomputed in backward
(activation checkpointing), so memory stays at one chunk of logits, not all of them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from ..backbone import Backbone

CHUNK_ROWS = 256


@dataclass
class LossOut:
    loss: torch.Tensor           # scalar, mean over valid rows (step-weighted)
    top1: list[float]            # per step: argmax(draft) == argmax(teacher), over valid rows
    counts: list[int]            # per step: valid rows


def _chunk_kl(bb: Backbone, draft: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """draft, teacher [n, d] final-normed states -> per-row KL(p || q) [n] and agreement [n]."""
    logq = torch.log_softmax(bb.logits(draft), dim=-1)
    with torch.no_grad():
        logp = torch.log_softmax(bb.logits(teacher), dim=-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    agree = (logq.argmax(-1) == logp.argmax(-1)).to(kl.dtype)
    return torch.stack([kl, agree.detach()])


def distill_loss(bb: Backbone, draft: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor,
                 step_weights: list[float] | None = None) -> LossOut:
    """draft [B, A, k, d] (grad), teacher [B, A, k, d] (real states at anchor + s + 1),
    valid [B, A, k] bool. Invalid rows contribute nothing (they are never computed)."""
    k = draft.shape[2]
    steps = torch.arange(k).expand_as(valid)[valid]              # [n] step of each valid row
    d_rows, t_rows = draft[valid], teacher[valid]                # [n, d]
    parts = []
    for start in range(0, d_rows.shape[0], CHUNK_ROWS):
        sl = slice(start, start + CHUNK_ROWS)
        parts.append(checkpoint(_chunk_kl, bb, d_rows[sl], t_rows[sl], use_reentrant=False))
    kl, agree = torch.cat(parts, dim=1) if parts else torch.zeros(2, 0)
    w = torch.tensor(step_weights or [1.0] * k, dtype=kl.dtype)[steps]
    loss = (kl * w).sum() / w.sum().clamp(min=1e-8)
    counts = [int((steps == s).sum()) for s in range(k)]
    agree = agree.detach()
    top1 = [float(agree[steps == s].mean()) if counts[s] else 0.0 for s in range(k)]
    return LossOut(loss=loss, top1=top1, counts=counts)
