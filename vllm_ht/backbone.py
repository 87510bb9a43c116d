"""The target model's pieces, as the HT forward passes (reference engine, training) use them.

Wraps a HF `*ForCausalLM` of the Llama family (Llama, Mistral, Qwen2 decoder layers: pre-norm,
q/k/v/o projections with RoPE, gated MLP) without copying any model code: the passes call the
model's own modules, one layer at a time, and bring their own attention masks and KV handling.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


class Backbone:
    def __init__(self, model: torch.nn.Module):
        inner = model.model
        self.model = model
        self.layers = inner.layers
        self.embed, self.norm, self.rotary, self.lm_head = inner.embed_tokens, inner.norm, inner.rotary_emb, model.lm_head
        attn = self.layers[0].self_attn
        self.head_dim, self.scaling = attn.head_dim, attn.scaling
        self.num_layers = len(self.layers)

    def rope(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] -> (cos, sin) [B, T, hd] in x's dtype."""
        return self.rotary(x, positions)

    def qkv(self, j: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Layer j's attention inputs for rows x [B, T, d] -> q [B, H, T, hd], k, v [B, Hkv, T, hd]."""
        layer = self.layers[j]
        attn, (b, t, _) = layer.self_attn, x.shape
        h = layer.input_layernorm(x)
        q = attn.q_proj(h).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = attn.k_proj(h).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = attn.v_proj(h).view(b, t, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q, k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """q [B, H, T, hd], k/v [B, Hkv, S, hd], mask [B or 1, 1, T, S] bool -> [B, T, H*hd]."""
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling, enable_gqa=True)
        return o.transpose(1, 2).flatten(2)

    def finish(self, j: int, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Residual + o_proj, then the MLP block: layer j's output for rows x [B, T, d]."""
        layer = self.layers[j]
        x = x + layer.self_attn.o_proj(attn_out)
        return x + layer.mlp(layer.post_attention_layernorm(x))

    def logits(self, normed: torch.Tensor) -> torch.Tensor:
        """Final-normed states [..., d] -> fp32 logits [..., V]."""
        return self.lm_head(normed).float()
