"""The two passes of a training step (DESIGN §1 training).

real pass (no grad, once): the sequences through all layers, keeping what the pseudo rows need —
  h^l at each transfer layer, every layer's K/V from the lowest transfer layer up, and the
  final-normed states (the teacher's input; Medusa heads read them too).
pseudo pass (with grad): for sampled anchors i, pseudo rows (i, s) = W_s h^{l_s}_i at positions
  i + s + 1 (s 0-based) through layers l_s..L-1. Pseudo row (i, s) sees the real keys at
  positions <= i and the pseudo rows (i, s') with s' <= s: the inference-time mask.

Targets: pseudo row (i, s) drafts the token at i + s + 2 (s 0-based); its teacher is the real
row at i + s + 1. A pair is valid only if that token exists: i + s + 2 <= length - 1.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..backbone import Backbone
from ..config import HiddenTransferConfig
from ..projections import TransferProjections
from ..pseudo_group import group_visible


@dataclass
class RealPass:
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer -> k, v [B, Hkv, T, hd]
    hidden: dict[int, torch.Tensor]                   # transfer (and fused) layer l -> h^l [B, T, d]
    final: torch.Tensor                               # [B, T, d] final-normed real states


@torch.no_grad()
def real_pass(bb: Backbone, ids: torch.Tensor, config: HiddenTransferConfig) -> RealPass:
    """ids [B, T] (right-padded; pads only ever see earlier tokens, so real rows are exact)."""
    b, t = ids.shape
    x = bb.embed(ids)
    pos = torch.arange(t).expand(b, t)
    cos, sin = bb.rope(x, pos)
    causal = torch.ones(t, t, dtype=torch.bool).tril()[None, None]
    low, wanted = config.min_transfer_layer, set(config.input_layers)
    kv, hidden = {}, {}
    for j in range(bb.num_layers):
        if j in wanted:
            hidden[j] = x
        q, k, v = bb.qkv(j, x, cos, sin)
        if j >= low:
            kv[j] = (k, v)
        x = bb.finish(j, x, bb.attend(q, k, v, causal))
    return RealPass(kv=kv, hidden=hidden, final=bb.norm(x))


def pseudo_pass(bb: Backbone, projections: TransferProjections, config: HiddenTransferConfig,
                real: RealPass, anchors: torch.Tensor) -> torch.Tensor:
    """anchors [B, A] positions -> final-normed pseudo states [B, A, k, d] (with grad)."""
    b, a = anchors.shape
    k_steps, t = config.num_steps, real.final.shape[1]
    batch = torch.arange(b)[:, None]
    joins = config.joins
    rows_anchor = torch.empty(b, 0, dtype=torch.long)   # [B, Q] anchor position of each pseudo row
    rows_step = torch.empty(0, dtype=torch.long)        # [Q] its step
    x = None
    fused = [real.hidden[f][batch, anchors] for f in config.fuse_layers]  # [B, A, d] each
    for j in range(config.min_transfer_layer, bb.num_layers):
        if j in joins:
            h = real.hidden[j][batch, anchors]                             # [B, A, d]
            new = [projections.step(h, s, fused) for s in joins[j]]
            x = torch.cat(([] if x is None else [x]) + new, dim=1)
            rows_anchor = torch.cat([rows_anchor] + [anchors] * len(new), dim=1)
            rows_step = torch.cat([rows_step] + [torch.full((a,), s) for s in joins[j]])
            cos, sin = bb.rope(x, rows_anchor + rows_step + 1)
            mask = _pseudo_mask(rows_anchor, rows_step, t)
        q, k, v = bb.qkv(j, x, cos, sin)
        rk, rv = real.kv[j]
        keys, vals = torch.cat([rk, k], dim=2), torch.cat([rv, v], dim=2)
        x = bb.finish(j, x, bb.attend(q, keys, vals, mask))
    normed = bb.norm(x)
    out = torch.empty(b, a, k_steps, x.shape[-1], dtype=normed.dtype)
    order = torch.arange(rows_step.numel())
    return out.index_put((torch.arange(b)[:, None], (order % a)[None], rows_step[None]), normed)


def _pseudo_mask(rows_anchor: torch.Tensor, rows_step: torch.Tensor, t: int) -> torch.Tensor:
    """[B, 1, Q, T + Q] bool: real keys j <= anchor; pseudo keys of the same anchor, step <= own."""
    real = torch.arange(t)[None, None, :] <= rows_anchor[:, :, None]               # [B, Q, T]
    same = rows_anchor[:, :, None] == rows_anchor[:, None, :]                      # [B, Q, Q]
    earlier = group_visible(rows_step, rows_step)[None]                           # [1, Q, Q]
    return torch.cat([real, same & earlier], dim=2)[:, None]


def targets_valid(anchors: torch.Tensor, lengths: torch.Tensor, num_steps: int) -> torch.Tensor:
    """[B, A, k] bool: pseudo row (i, s) has a real next token to draft (i + s + 2 <= len - 1).

    lengths [7], anchors [[3, 4, 5]], k=2 -> [[[T, T], [T, F], [F, F]]]
    """
    s = torch.arange(num_steps)
    return anchors[:, :, None] + s + 2 <= lengths[:, None, None] - 1
