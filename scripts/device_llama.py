"""A plain-torch Llama with random weights, to time decode and tree steps on a GPU without vLLM.

Timing does not depend on weight values, so weights are random (normal, std 0.02, in the model
dtype). Architecture as Llama 3: RMSNorm, rotary embeddings (rotate-half), grouped-query
attention, SwiGLU MLP, untied LM head; q/k/v and gate/up are fused matmuls as in vLLM.
Attention is the project's `vllm_ht.kernels.tree_paged_attention` over a paged KV cache in vLLM's
GPU layout (memory [layer][block][token][kv head][K || V], viewed as [block, head, token, 2D]).

A step (`StepTensors`) is the rows of all requests, grouped by request:
  rows [0, T)        real rows: a plain decode row, or a tree's root + N nodes (BFS order); their
                     K/V are written to the cache slots of positions ctx .. ctx + N (as vLLM
                     schedules them), and they see the cached context plus their window under
                     the tree mask
  rows [T, T + A*D)  pseudo rows (`vllm_ht.vllm.step` layout): inert below the transfer layer
                     (attention output 0, no K/V written), set to W_s h of their anchor at it,
                     then attending jointly with the real rows (rows taken in window order)
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from vllm_ht.kernels import tree_paged_attention


@dataclass(frozen=True)
class LlamaShape:
    layers: int
    dim: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    rope_theta: float = 500000.0   # Llama 3
    eps: float = 1e-5


SHAPES = {
    "llama-1b": LlamaShape(layers=16, dim=2048, heads=32, kv_heads=8, head_dim=64, ffn=8192, vocab=128256),
    "llama-8b": LlamaShape(layers=32, dim=4096, heads=32, kv_heads=8, head_dim=128, ffn=14336, vocab=128256),
    # the dry run's stand-ins (CPU)
    "tiny-a": LlamaShape(layers=2, dim=128, heads=4, kv_heads=2, head_dim=32, ffn=256, vocab=8192),
    "tiny-b": LlamaShape(layers=2, dim=256, heads=8, kv_heads=2, head_dim=32, ffn=512, vocab=16384),
}


@dataclass
class StepTensors:
    """One step's inputs (on the host when built, copied into device twins before each step)."""
    tokens: torch.Tensor          # [T + P] long (pseudo rows: a dummy token)
    positions: torch.Tensor       # [T + P] long
    slots: torch.Tensor           # [T] long  cache slot of each real row
    block_table: torch.Tensor     # [B, pages] int32
    context_lens: torch.Tensor    # [B] int32  cached tokens before this step
    query_start_loc: torch.Tensor  # [B + 1] int32  real rows per request (= their window keys)
    mask: torch.Tensor            # [T, words] int32  real rows vs their window
    # pseudo rows (size-0 tensors without them)
    anchors: torch.Tensor         # [A] long  real row of each anchor
    order: torch.Tensor           # [W] long  rows in window order (real then pseudo, per request)
    joint_start_loc: torch.Tensor  # [B + 1] int32  window keys (= joint query rows) per request
    joint_mask: torch.Tensor      # [W, words] int32
    # compaction after verification (size 0: none)
    src: torch.Tensor             # [M] int32
    dst: torch.Tensor             # [M] int32
    move_start_loc: torch.Tensor  # [B + 1] int32

    @property
    def num_real(self) -> int:
        return self.slots.shape[0]

    def pinned_twin(self) -> StepTensors:
        pin = lambda t: t.pin_memory() if t.numel() else t.clone()
        return StepTensors(**{f.name: pin(getattr(self, f.name)) for f in fields(self)})

    def to(self, device: torch.device) -> StepTensors:
        return StepTensors(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def copy_(self, other: StepTensors) -> None:
        """In place (shapes must match): the device twin keeps its addresses for graph replay."""
        for f in fields(self):
            getattr(self, f.name).copy_(getattr(other, f.name), non_blocking=True)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D], cos/sin [T, 1, D/2] -> x rotated (rotate-half convention)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class RandomLlama:
    def __init__(self, shape: LlamaShape, num_blocks: int, max_position: int, device: torch.device,
                 dtype: torch.dtype = torch.bfloat16, block_size: int = 16, num_steps: int = 3, seed: int = 0):
        s = self.shape = shape
        self.block_size, self.num_steps = block_size, num_steps
        self.transfer_layer = s.layers // 2          # HiddenTransferConfig's default for every step
        gen = torch.Generator(device=device).manual_seed(seed)

        def w(*size):
            return torch.empty(size, dtype=dtype, device=device).normal_(0.0, 0.02, generator=gen)

        qkv = (s.heads + 2 * s.kv_heads) * s.head_dim
        self.embed = w(s.vocab, s.dim)                                    # [V, d]
        self.layers = [{"attn_norm": torch.ones(s.dim, dtype=dtype, device=device),
                        "wqkv": w(qkv, s.dim), "wo": w(s.dim, s.heads * s.head_dim),               # [out, in]
                        "mlp_norm": torch.ones(s.dim, dtype=dtype, device=device),
                        "w_gate_up": w(2 * s.ffn, s.dim), "w_down": w(s.dim, s.ffn)} for _ in range(s.layers)]
        self.norm = torch.ones(s.dim, dtype=dtype, device=device)
        self.lm_head = w(s.vocab, s.dim)                                  # [V, d]
        self.transfer = w(num_steps, s.dim, s.dim)                        # [k, d_out, d_in]
        # one allocation for every layer's cache, as vLLM does (kv_compact then takes one strided view)
        self.cache = torch.zeros(s.layers, num_blocks, block_size, s.kv_heads, 2 * s.head_dim, dtype=dtype,
                                 device=device)                           # [L, blocks, bs, Hkv, 2D]
        self.layer_caches = [c.transpose(1, 2) for c in self.cache.unbind(0)]   # L x [blocks, Hkv, bs, 2D]
        inv_freq = 1.0 / s.rope_theta ** (torch.arange(0, s.head_dim, 2, device=device).float() / s.head_dim)
        angles = torch.arange(max_position, device=device).float()[:, None] * inv_freq[None, :]
        self.cos, self.sin = angles.cos(), angles.sin()                   # [max_position, D/2]

    def forward(self, b: StepTensors, pseudo: bool) -> torch.Tensor:
        """Logits [T + P, V] of every row. `pseudo`: the step has pseudo rows (fixed per captured graph)."""
        s = self.shape
        h = self.embed[b.tokens]                                           # [rows, d]
        rows = h.shape[0]
        cos, sin = self.cos[b.positions][:, None], self.sin[b.positions][:, None]
        for i, layer in enumerate(self.layers):
            if pseudo and i == self.transfer_layer:
                anchor = h[b.anchors]                                      # [A, d]
                moved = torch.einsum("ad,ked->ake", anchor, self.transfer).reshape(-1, s.dim)   # [A * k, d]
                h = torch.cat([h[: b.num_real], moved])
            x = rms_norm(h, layer["attn_norm"], s.eps)
            q, k, v = F.linear(x, layer["wqkv"]).split(
                [s.heads * s.head_dim, s.kv_heads * s.head_dim, s.kv_heads * s.head_dim], dim=-1)
            q = rope(q.view(rows, s.heads, s.head_dim), cos, sin)
            k = rope(k.view(rows, s.kv_heads, s.head_dim), cos, sin)
            v = v.reshape(rows, s.kv_heads, s.head_dim)
            o = self.attend(i, q, k, v, b, joint=pseudo and i >= self.transfer_layer)
            h = h + F.linear(o.view(rows, -1), layer["wo"])
            gate, up = F.linear(rms_norm(h, layer["mlp_norm"], s.eps), layer["w_gate_up"]).chunk(2, dim=-1)
            h = h + F.linear(F.silu(gate) * up, layer["w_down"])
        return F.linear(rms_norm(h, self.norm, s.eps), self.lm_head)

    def attend(self, layer: int, q, k, v, b: StepTensors, joint: bool) -> torch.Tensor:
        """q [rows, H, D], k/v [rows, Hkv, D] -> [rows, H, D]; writes the real rows' K/V to the cache."""
        n = b.num_real
        flat = self.cache[layer].view(-1, self.shape.kv_heads, 2 * self.shape.head_dim)   # [slots, Hkv, 2D]
        flat.index_copy_(0, b.slots, torch.cat([k[:n], v[:n]], dim=-1))
        kv, scale = self.layer_caches[layer], self.shape.head_dim ** -0.5
        if joint:        # real and pseudo rows in window order: one call over both
            out = torch.empty_like(q)
            o = tree_paged_attention(q[b.order], kv, b.block_table, b.context_lens, b.joint_start_loc,
                                     k[b.order], v[b.order], b.joint_start_loc, b.joint_mask, scale)
            return out.index_copy_(0, b.order, o)
        out = torch.zeros_like(q) if q.shape[0] > n else torch.empty_like(q)   # inert pseudo rows: 0
        tree_paged_attention(q[:n], kv, b.block_table, b.context_lens, b.query_start_loc, k[:n], v[:n],
                             b.query_start_loc, b.mask, scale, out=out[:n])
        return out
