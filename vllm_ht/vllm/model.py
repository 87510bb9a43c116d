"""HTLlamaForCausalLM: vLLM's Llama whose transfer layers first run the transfer op.

The forward is vLLM's own, compiled as vLLM compiles it (no separate HT path). A step with
pseudo rows is the same forward over more rows (step.py): below their transfer layer the pseudo
rows are inert; the transfer op (transfer.py) sets row (a, s) to W_s h^l of anchor a, residual 0,
at module index l_s; from there real and pseudo rows share every matmul, and the HT attention
backend gives pseudo rows their mask (anchor's window + own group) without writing their K/V.
The real rows' results are the plain model's. The runner reads the pseudo rows' final states.
"""
from __future__ import annotations

from types import SimpleNamespace

from vllm.logger import init_logger
from vllm.model_executor.models.llama import LlamaForCausalLM

from ..checkpoint import load_checkpoint
from ..config import ConfigError, HiddenTransferConfig
from ..projections import TransferProjections
from ..options import HTOptions
from .engine_args import PP_UNSUPPORTED
from .transfer import join_transfer

# under vLLM's "vllm" logger, so its handler, format and VLLM_LOGGING_LEVEL show our lines
log = init_logger(f"vllm.{__name__}")


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
            self.ht_config.check_servable()
        else:
            self.ht_config = HiddenTransferConfig.for_model(_with_base_arch(hf_config))
            projections = TransferProjections(self.ht_config)
            log.warning("vllm-ht: no --ht-checkpoint given; identity projections (lossless, few accepted drafts)")
        # buffers, not parameters: vLLM's loader fills (and checks) the base model's parameters only
        dtype = vllm_config.model_config.dtype
        self.register_buffer("ht_weight", projections.weight.detach().to(dtype), persistent=False)  # [k, d, d]
        bias = projections.bias.detach().to(dtype) if projections.bias is not None else None
        self.register_buffer("ht_bias", bias, persistent=False)  # [k, d] or None
        for index, steps in self.ht_config.joins.items():
            join_transfer(self.model.layers[index], index, steps, self.ht_weight, self.ht_bias)


def _with_base_arch(hf_config) -> SimpleNamespace:
    """The HF config as the checkpoint knows it: its base architecture, not our override name."""
    return SimpleNamespace(architectures=["LlamaForCausalLM"], hidden_size=hf_config.hidden_size,
                           vocab_size=hf_config.vocab_size, num_hidden_layers=hf_config.num_hidden_layers,
                           _name_or_path=getattr(hf_config, "_name_or_path", ""))
