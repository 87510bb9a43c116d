"""The Hidden Transfer forward pass on a HF transformers model of the Llama family.

One call runs a step's real rows (prompt tokens, or a flattened draft tree) through all layers and,
for chosen real rows (anchors), k pseudo rows through the layers above their transfer layer.

Rows, in order: real rows 0..R-1, then pseudo rows. Pseudo row (a, s) joins at module index l_s
(the transfer layer of step s): its state is W_s h^{l_s}_a, its position pos(a) + s + 1 (s 0-based).
Attention (DESIGN §1):
- real row i sees the whole cache and the real rows j with window_mask[i, j];
- pseudo row (a, s) sees the whole cache, the real rows anchor a sees, and the pseudo rows (a, s')
  with s' <= s that have joined; nothing real sees a pseudo row, and pseudo K/V are never cached.
So the real rows compute exactly what the plain model computes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..backbone import Backbone
from ..config import HiddenTransferConfig
from ..projections import TransferProjections
from .cache import KVCache


@dataclass
class StepInput:
    tokens: torch.Tensor          # [R] long
    positions: torch.Tensor       # [R] long
    window_mask: torch.Tensor     # [R, R] bool: real row i sees real row j of this step
    anchors: torch.Tensor         # [P] long: real rows that get k pseudo rows (may be empty)
    logit_rows: torch.Tensor | None = None  # [R'] real rows whose logits are needed (None: all)


@dataclass
class StepOutput:
    real_logits: torch.Tensor     # [R', V] fp32, rows of StepInput.logit_rows
    real_hidden: torch.Tensor     # [R', d] final-normed real states of the same rows (Medusa heads read them)
    pseudo_hidden: torch.Tensor   # [P, k, d] final-normed pseudo states (LM head not yet applied)


class HTForward:
    """Runs StepInputs against a model + projections + KVCache. No state besides the cache."""

    def __init__(self, model: torch.nn.Module, projections: TransferProjections | None,
                 config: HiddenTransferConfig):
        self.bb, self.projections, self.config = Backbone(model), projections, config
        self.logits = self.bb.logits

    @torch.inference_mode()
    def __call__(self, step: StepInput, cache: KVCache) -> StepOutput:
        k_steps = self.config.num_steps
        num_real, device = step.tokens.shape[0], step.tokens.device
        cache.check_room(num_real)
        anchors = step.anchors.to(device)
        x = self.bb.embed(step.tokens)                                   # [R, d]
        pos_real = step.positions.to(device)
        # pseudo rows are appended as their steps join: (anchor index into `anchors`, step s)
        p_anchor = torch.empty(0, dtype=torch.long, device=device)    # [Q]
        p_step = torch.empty(0, dtype=torch.long, device=device)      # [Q]
        join = {} if anchors.numel() == 0 else self.config.joins
        mask = self._mask(step.window_mask.to(device), anchors, p_anchor, p_step, cache.length)
        cos, sin = self.bb.rope(x[None], pos_real[None])
        for j in range(self.bb.num_layers):
            if j in join:  # steps whose transfer layer is j: h^j is x now
                a_idx = torch.arange(anchors.numel(), device=device)
                for s in join[j]:
                    x = torch.cat([x, self.projections.step(x[anchors], s)])
                    p_anchor = torch.cat([p_anchor, a_idx])
                    p_step = torch.cat([p_step, torch.full_like(a_idx, s)])
                pos = torch.cat([pos_real, pos_real[anchors[p_anchor]] + p_step + 1])
                cos, sin = self.bb.rope(x[None], pos[None])
                mask = self._mask(step.window_mask.to(device), anchors, p_anchor, p_step, cache.length)
            x = self._layer(j, x, cos, sin, mask, cache, num_real)
        rows = step.logit_rows if step.logit_rows is not None else torch.arange(num_real, device=device)
        real_hidden = self.bb.norm(x[rows.to(device)])
        real_logits = self.logits(real_hidden)
        pseudo = torch.zeros(anchors.numel(), k_steps, x.shape[-1], dtype=x.dtype, device=device)
        if p_anchor.numel():
            pseudo[p_anchor, p_step] = self.bb.norm(x[num_real:])
        return StepOutput(real_logits=real_logits, real_hidden=real_hidden, pseudo_hidden=pseudo)

    @staticmethod
    def _mask(window: torch.Tensor, anchors: torch.Tensor, p_anchor: torch.Tensor,
              p_step: torch.Tensor, num_cached: int) -> torch.Tensor:
        """[T, num_cached + T] bool for T = R real + Q pseudo rows (keys: cache, real, pseudo)."""
        num_real, q = window.shape[0], p_anchor.shape[0]
        t = num_real + q
        m = torch.zeros(t, num_cached + t, dtype=torch.bool, device=window.device)
        m[:, :num_cached] = True
        m[:num_real, num_cached : num_cached + num_real] = window
        if q:
            m[num_real:, num_cached : num_cached + num_real] = window[anchors[p_anchor]]
            same_group = p_anchor[:, None] == p_anchor[None, :]
            earlier = p_step[None, :] <= p_step[:, None]
            m[num_real:, num_cached + num_real :] = same_group & earlier
        return m

    def _layer(self, j: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               mask: torch.Tensor, cache: KVCache, num_real: int) -> torch.Tensor:
        q, k, v = self.bb.qkv(j, x[None], cos, sin)          # [1, H, T, hd], [1, Hkv, T, hd] x2
        cache.write(j, k[0, :, :num_real], v[0, :, :num_real])
        ck, cv = cache.view(j, num_real)                      # [Hkv, n+R, hd]
        keys = torch.cat([ck, k[0, :, num_real:]], dim=1)[None]   # [1, Hkv, n+T, hd]
        vals = torch.cat([cv, v[0, :, num_real:]], dim=1)[None]
        return self.bb.finish(j, x, self.bb.attend(q, keys, vals, mask)[0])
