"""The distillation loss: KL(p_real || q_draft) per valid (anchor, step), computed in row chunks.

Logits are [rows, V] with V = 49152 for the default model, and the LM head is the biggest matmul of
a training step. The gradient of KL(p || softmax(z)) with respect to the logits z is softmax(z) - p,
so each chunk's forward also takes that gradient through the frozen head, (q - p) @ W, and keeps
only the [rows, d] result: two LM-head matmuls per draft row instead of the three of activation
checkpointing (forward, recompute, backward), with one chunk's [rows, V] in memory at a time.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..backbone import Backbone

CHUNK_ROWS = 256


@dataclass
class LossOut:
    loss: torch.Tensor           # scalar, mean over valid rows (step-weighted)
    top1: list[float]            # per step: argmax(draft) == argmax(teacher), over valid rows
    counts: list[int]            # per step: valid rows
    logp: torch.Tensor           # [n, V] teacher log-probs of the valid rows (reusable)


class _ChunkKL(torch.autograd.Function):
    """draft [n, d] final-normed states, logp [n, V] teacher log-probs -> [2, n]: KL(p || q) and
    agreement (argmax q == argmax p); gradients flow to `draft` only (the head is frozen).
    The backward needs only (q - p) @ W [n, d], computed here: one [n, V] at a time in memory."""

    @staticmethod
    def forward(ctx, draft, logp, weight, bias):
        logits = torch.nn.functional.linear(draft, weight, bias).float()
        logq = torch.log_softmax(logits, dim=-1)
        p = logp.exp()
        kl = (p * (logp - logq)).sum(-1)
        agree = (logq.argmax(-1) == logp.argmax(-1)).to(kl.dtype)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(logq.exp_().sub_(p) @ weight.float())   # dKL/dlogits = q - p
            ctx.draft_dtype = draft.dtype
        return torch.stack([kl, agree])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (g,) = ctx.saved_tensors
        return (g * grad[0][:, None]).to(ctx.draft_dtype), None, None, None


def _chunk_kl(bb: Backbone, draft: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    head = bb.lm_head
    return _ChunkKL.apply(draft, logp, head.weight.detach(), None if head.bias is None else head.bias.detach())


@torch.no_grad()
def teacher_logprobs(bb: Backbone, teacher: torch.Tensor) -> torch.Tensor:
    """[n, d] real final-normed states -> [n, V] log-probs, computed once (not in backward)."""
    return torch.cat([torch.log_softmax(bb.logits(teacher[i : i + CHUNK_ROWS]), dim=-1)
                      for i in range(0, teacher.shape[0], CHUNK_ROWS)]) if teacher.shape[0] else \
        torch.zeros(0, bb.lm_head.out_features)


def distill_loss(bb: Backbone, draft: torch.Tensor, teacher: torch.Tensor | None, valid: torch.Tensor,
                 step_weights: list[float] | None = None, logp: torch.Tensor | None = None) -> LossOut:
    """draft [B, A, k, d] (grad), teacher [B, A, k, d] (real states at anchor + s + 1; None when
    `logp`, the valid rows' teacher log-probs, is given), valid [B, A, k] bool. Invalid rows
    contribute nothing (they are never computed)."""
    k = draft.shape[2]
    steps = torch.arange(k).expand_as(valid)[valid]              # [n] step of each valid row
    d_rows = draft[valid]                                        # [n, d]
    if logp is None:  # teacher log-probs of the valid rows; pass LossOut.logp to reuse them
        logp = teacher_logprobs(bb, teacher[valid])              # [n, V]
    parts = []
    for start in range(0, d_rows.shape[0], CHUNK_ROWS):
        sl = slice(start, start + CHUNK_ROWS)
        parts.append(_chunk_kl(bb, d_rows[sl], logp[sl]))
    kl, agree = torch.cat(parts, dim=1) if parts else torch.zeros(2, 0)
    w = torch.tensor(step_weights or [1.0] * k, dtype=kl.dtype)[steps]
    loss = (kl * w).sum() / w.sum().clamp(min=1e-8)
    counts = [int((steps == s).sum()) for s in range(k)]
    agree = agree.detach()
    top1 = [float(agree[steps == s].mean()) if counts[s] else 0.0 for s in range(k)]
    return LossOut(loss=loss, top1=top1, counts=counts, logp=logp)
