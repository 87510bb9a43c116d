"""A contiguous per-layer KV cache for one sequence, with accepted-path compaction.

Slots are token positions: the K/V of the token at position i live in slot i. A decode step
writes its tree rows at slots p, p+1, ... (row order, not depth); after verification `compact`
moves the accepted rows to p, p+1, ... and sets the length, so rejected slots are overwritten
by the next step.
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        shape = (num_layers, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [L, Hkv, max_len, hd]
        self.v = torch.zeros(shape, dtype=dtype, device=device)  # [L, Hkv, max_len, hd]
        self.max_len = max_len
        self.length = 0  # committed tokens (positions 0..length-1)

    def reset(self) -> None:
        self.length = 0

    def check_room(self, num_new: int) -> None:
        if self.length + num_new > self.max_len:
            raise ValueError(f"KV cache full: {self.length} cached + {num_new} new tokens exceed "
                             f"max_len={self.max_len}; raise max_len or shorten the request.")

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [Hkv, R, hd]: this step's rows, written at slots length..length+R-1."""
        n, r = self.length, k.shape[1]
        self.k[layer, :, n : n + r] = k
        self.v[layer, :, n : n + r] = v

    def view(self, layer: int, num_new: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Committed + this step's keys/values of a layer: ([Hkv, length+num_new, hd], same)."""
        end = self.length + num_new
        return self.k[layer, :, :end], self.v[layer, :, :end]

    def compact(self, rows: list[int]) -> None:
        """Keep this step's rows `rows` (ascending row indices; row r sits in slot length + r) as
        the next tokens: slot length + rows[j] -> slot length + j, every layer, then commit them.

        length 10, rows [0, 2, 5] -> slots [10, 12, 15] move to [10, 11, 12]; length becomes 13.
        """
        n = self.length
        src = torch.tensor(rows, dtype=torch.long, device=self.k.device) + n
        dst = torch.arange(n, n + len(rows), device=self.k.device)
        if not torch.equal(src, dst):  # gather first: sources may overlap destinations
            self.k[:, :, dst] = self.k[:, :, src]
            self.v[:, :, dst] = self.v[:, :, src]
        self.length = n + len(rows)
