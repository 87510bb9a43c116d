"""Medusa-1-style heads, the baseline HT must beat at equal cost (Cai et al. 2024).

Head s reads the last real hidden state h^L_i (final-normed) and drafts the token at i + s + 2:
one residual block h + SiLU(W_s h + b_s) (W_s zero-initialised, so a head starts as the base
model's own next-token prediction), then the target's shared LM head.
"""
from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file
from torch import nn


class MedusaHeads(nn.Module):
    def __init__(self, num_heads: int, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_heads, hidden_size, hidden_size))  # [k, d, d]
        self.bias = nn.Parameter(torch.zeros(num_heads, hidden_size))                 # [k, d]

    @property
    def num_heads(self) -> int:
        return self.weight.shape[0]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., d] -> LM-head inputs of every head [..., k, d]."""
        w, b = self.weight.to(hidden.dtype), self.bias.to(hidden.dtype)
        z = torch.einsum("...d,ked->...ke", hidden, w) + b
        return hidden[..., None, :] + nn.functional.silu(z)

    def save(self, path: str, dtype: str = "float32") -> None:
        dt = getattr(torch, dtype)
        save_file({"weight": self.weight.detach().to(dt).contiguous(), "bias": self.bias.detach().to(dt).contiguous()}, path)

    @classmethod
    def load(cls, path: str) -> "MedusaHeads":
        t = load_file(path)
        heads = cls(t["weight"].shape[0], t["weight"].shape[1])
        heads.load_state_dict({n: v.float() for n, v in t.items()})
        return heads
