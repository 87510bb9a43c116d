"""TransferProjections: the k linear maps W_s that turn h^{l_s}_i into the pseudo state e_{i,s}.

e_{i,s} = W_s h^{l_s}_i (+ b_s), identity-initialised so an untrained checkpoint drafts "the same
hidden state one position later" — lossless (verification) but with low acceptance.
With fused inputs (config.fuse_layers), + sum_f U_{s,f} h^f_i, the U zero-initialised.
"""
from __future__ import annotations

import torch
from torch import nn

from .config import HiddenTransferConfig


def project(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, s: int) -> torch.Tensor:
    """e = W_s h (+ b_s): hidden [..., d], weight [k, d_out, d_in], bias [k, d] or None -> [..., d].
    The one place the projection is written: training (TransferProjections.step) and vLLM's
    transfer op (vllm_ht/vllm/transfer.py) both call it."""
    return nn.functional.linear(hidden, weight[s], None if bias is None else bias[s])


class TransferProjections(nn.Module):
    def __init__(self, config: HiddenTransferConfig):
        super().__init__()
        k, d = config.num_steps, config.hidden_size
        self.num_steps, self.hidden_size = k, d
        self.weight = nn.Parameter(torch.eye(d).repeat(k, 1, 1))   # [k, d_out, d_in]
        self.bias = nn.Parameter(torch.zeros(k, d)) if config.bias else None  # [k, d]
        self.num_fused = len(config.fuse_layers)
        self.fuse_weight = (nn.Parameter(torch.zeros(k, self.num_fused, d, d))      # [k, F, d_out, d_in]
                            if self.num_fused else None)

    def step(self, hidden: torch.Tensor, s: int, fused: list[torch.Tensor] = ()) -> torch.Tensor:
        """Pseudo states of step s (0-based) for rows of `hidden` [..., d] -> [..., d]; `fused` holds
        the same rows' states at config.fuse_layers, in that order."""
        bias = None if self.bias is None else self.bias.to(hidden.dtype)
        out = project(hidden, self.weight.to(hidden.dtype), bias, s)
        if len(fused) != self.num_fused:
            raise ValueError(f"{len(fused)} fused inputs given; the projections take {self.num_fused}")
        for f, h in enumerate(fused):
            out = out + nn.functional.linear(h, self.fuse_weight[s, f].to(h.dtype))
        return out

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """All steps from one transfer layer: hidden [n, d] -> pseudo [n, k, d] (unfused only)."""
        if self.fuse_weight is not None:
            raise ValueError("fused projections need their fused inputs: use step()")
        out = torch.einsum("nd,ked->nke", hidden, self.weight.to(hidden.dtype))
        if self.bias is not None:
            out = out + self.bias.to(hidden.dtype)
        return out
