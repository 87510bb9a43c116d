"""HTLlamaForCausalLM: vLLM's Llama with k pseudo rows per anchor after the transfer layer.

Layers below the lowest transfer layer run unchanged (vLLM's decoder layers, attention through
the HT backend). At module index l_s the pseudo rows of step s join: W_s (hidden + residual) of
every anchor, residual 0, position anchor + s + 1. From there real and pseudo rows share every
matmul; attention runs once per layer over both through the same op, with the pseudo rows'
masks (anchor's window + own group) and without writing their K/V. The real rows' results are
the plain model's. Pseudo final states go to HTStep.pseudo_hidden [P, k, d] for the runner.
"""
from __future__ import annotations

import contextlib
import logging
from types import SimpleNamespace

import torch
from vllm.forward_context import get_forward_context
from vllm.model_executor.custom_op import CustomOp
from vllm.model_executor.models.llama import LlamaForCausalLM

from ..checkpoint import load_checkpoint
from ..config import ConfigError, HiddenTransferConfig
from ..projections import TransferProjections
from .attention import attend, current_step, write_kv
from .engine_args import PP_UNSUPPORTED
from .options import HTOptions

log = logging.getLogger(__name__)


class HTLlamaForCausalLM(LlamaForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = ""):
        if vllm_config.parallel_config.pipeline_parallel_size > 1:
            raise ConfigError(PP_UNSUPPORTED)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        hf_config = vllm_config.model_config.hf_config
        opts = HTOptions.from_vllm_config(vllm_config)
        if opts.checkpoint:
            self.ht_config, projections = load_checkpoint(opts.checkpoint)
            self.ht_config.check_model(_with_base_arch(hf_config))
        else:
            self.ht_config = HiddenTransferConfig.for_model(_with_base_arch(hf_config))
            projections = TransferProjections(self.ht_config)
            log.warning("vllm-ht: no --ht-checkpoint given; identity projections (lossless, few accepted drafts)")
        # buffers, not parameters: vLLM's loader fills (and checks) the base model's parameters only
        self.register_buffer("ht_weight", projections.weight.detach().clone(), persistent=False)  # [k, d, d]
        bias = projections.bias.detach().clone() if projections.bias is not None else None
        self.register_buffer("ht_bias", bias, persistent=False)  # [k, d] or None
        self._joins = self.ht_config.joins

    def project(self, stream: torch.Tensor, s: int) -> torch.Tensor:
        w = self.ht_weight[s].to(stream.dtype)
        b = None if self.ht_bias is None else self.ht_bias[s].to(stream.dtype)
        return torch.nn.functional.linear(stream, w, b)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        step = current_step()
        if step is None or step.anchors.numel() == 0 or get_forward_context().attn_metadata is None:
            return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        with self._cpu_kernels():
            return self._forward_ht(input_ids, positions, inputs_embeds, step)

    @contextlib.contextmanager
    def _cpu_kernels(self):
        """Steps with pseudo rows run the layers eagerly, outside vLLM's compiled graph. When vLLM
        compiles (no --enforce-eager) its custom ops are set to their torch-native forms, written for
        inductor to fuse and slow when run op by op; for these steps they get back the forms an
        eager engine uses (on CPU: vLLM's C++ rotary and SiluAndMul; RMSNorm's is the same either
        way), and the compiled graph is left untouched."""
        if not hasattr(self, "_ht_native_ops"):
            self._ht_native_ops = [m for m in self.modules()
                                   if isinstance(m, CustomOp) and m._forward_method != m.forward_cpu]
        if not self._ht_native_ops or not torch.device(self.ht_weight.device).type == "cpu":
            yield
            return
        saved = [m._forward_method for m in self._ht_native_ops]
        for m in self._ht_native_ops:
            m._forward_method = m.forward_cpu
        try:
            yield
        finally:
            for m, f in zip(self._ht_native_ops, saved):
                m._forward_method = f

    def _forward_ht(self, input_ids, positions, inputs_embeds, step):
        m = self.model
        x = inputs_embeds if inputs_embeds is not None else m.embed_input_ids(input_ids)
        residual = None
        t = x.shape[0]
        anchors = step.anchors.to(x.device)
        p_anchor = torch.empty(0, dtype=torch.long)
        p_step = torch.empty(0, dtype=torch.long)
        layout, pos_all = None, positions
        for j, layer in enumerate(m.layers):
            if j in self._joins:  # h^j = hidden + residual of the real rows
                stream = x[:t] if residual is None else x[:t] + residual[:t]
                idx = torch.arange(anchors.numel())
                new = [self.project(stream[anchors], s) for s in self._joins[j]]
                x = torch.cat([x, *new])
                residual = torch.cat([residual, torch.zeros_like(torch.cat(new))])  # transfer layer >= 1
                p_anchor = torch.cat([p_anchor, idx.repeat(len(new))])
                p_step = torch.cat([p_step, torch.tensor(self._joins[j]).repeat_interleave(anchors.numel())])
                layout = step.pseudo_layout(p_anchor, p_step, positions.cpu())
                pos_all = torch.cat([positions, layout.positions.to(positions.device)])
            if layout is None:
                x, residual = layer(positions, x, residual)
            else:
                x, residual = self._joint_layer(layer, pos_all, x, residual, layout, t)
        x, _ = m.norm(x, residual)
        k = self.ht_config.num_steps
        pseudo = x.new_zeros(anchors.numel(), k, x.shape[-1])
        pseudo[p_anchor, p_step] = x[t:]
        step.pseudo_hidden = pseudo
        return x[:t]

    def _joint_layer(self, layer, positions, x, residual, layout, num_real):
        """One decoder layer over real + pseudo rows; attention via the HT op, pseudo K/V uncached."""
        h, residual = layer.input_layernorm(x, residual)
        attn = layer.self_attn
        qkv, _ = attn.qkv_proj(h)
        q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        q, k = attn.rotary_emb(positions, q, k)
        n, hd = q.shape[0], attn.head_dim
        q, k, v = q.view(n, -1, hd), k.view(n, -1, hd), v.view(n, -1, hd)
        md = get_forward_context().attn_metadata[attn.attn.layer_name]
        kv_cache = attn.attn.kv_cache
        write_kv(kv_cache, k[:num_real], v[:num_real], md.slot_mapping, md.cache_layout, md.isa)
        order = layout.order.to(q.device)
        start = layout.start_loc.to(q.device)
        out = attend(md, "joint", q[order], kv_cache, start, k[order], v[order], layout.mask_bits.to(q.device),
                     attn.scaling)
        out = out[layout.inverse.to(q.device)].reshape(n, -1)
        h, _ = attn.o_proj(out)
        h, residual = layer.post_attention_layernorm(h, residual)
        return layer.mlp(h), residual


def _with_base_arch(hf_config) -> SimpleNamespace:
    """The HF config as the checkpoint knows it: its base architecture, not our override name."""
    return SimpleNamespace(architectures=["LlamaForCausalLM"], hidden_size=hf_config.hidden_size,
                           vocab_size=hf_config.vocab_size, num_hidden_layers=hf_config.num_hidden_layers,
                           _name_or_path=getattr(hf_config, "_name_or_path", ""))
