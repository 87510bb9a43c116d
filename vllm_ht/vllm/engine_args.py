"""`--speculative-model hidden_transfer`: the user's flags, expanded to vLLM 0.32's real ones.

    vllm serve MODEL --speculative-model hidden_transfer --ht-checkpoint DIR [--ht-num-nodes N]
is the same as the explicit long form
    vllm serve MODEL --speculative-config '{"method": "custom_class", "model":
        "vllm_ht.vllm.proposer.HTProposer", "num_speculative_tokens": 31}'
        --worker-cls vllm_ht.vllm.worker.HTCPUWorker
        --hf-overrides '{"architectures": ["HTLlamaForCausalLM"]}'
        --additional-config '{"vllm_ht": {"checkpoint": "DIR", "num_nodes": null, "row_budget": 32}}'
on vLLM's CPU build; on CUDA the worker is vllm_ht.vllm.gpu_worker.HTGPUWorker and
        --attention-config '{"backend": "CUSTOM"}'
selects the HT attention backend (gpu_attention.py). Other platforms (ROCm, XPU, TPU) are refused.
and offline: `LLM(MODEL, **ht_engine_kwargs(MODEL, checkpoint="DIR"))` (`from vllm_ht import ht_engine_kwargs`).
The checkpoint is checked against the model here, before vLLM allocates anything.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from ..checkpoint import load_checkpoint
from ..config import ConfigError
from ..head_padding import splits_heads
from ..options import KEY, HTOptions

METHOD = "hidden_transfer"
VLLM_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")  # the HT model class builds on vLLM's Llama
HT_ARCH = "HTLlamaForCausalLM"
PP_UNSUPPORTED = ("Hidden Transfer does not support pipeline parallelism: the pseudo rows join at the transfer "
                  "layer and need every layer above it on the same stage. Use --pipeline-parallel-size 1 "
                  "(tensor parallelism is the way to split the model), or serve without --speculative-model.")


CPU_WORKER = "vllm_ht.vllm.worker.HTCPUWorker"
GPU_WORKER = "vllm_ht.vllm.gpu_worker.HTGPUWorker"
HT_ATTENTION = "CUSTOM"   # AttentionBackendEnum.CUSTOM, which the GPU worker points at gpu_attention.py's backend
V2_RUNNER_UNSUPPORTED = ("Hidden Transfer runs on vLLM's V1 GPU model runner (its _model_forward/_sample hooks and "
                         "custom_class drafting), but vLLM's V2 model runner was selected. Unset "
                         "VLLM_USE_V2_MODEL_RUNNER (or set it to 0) and leave off features that force the V2 "
                         "runner (watermarking, HiSparse), or serve without --speculative-model.")


def _platform():
    from vllm.platforms import current_platform

    return current_platform


def _on_cpu() -> bool:
    return _platform().is_cpu()


def _on_cuda() -> bool:
    return _platform().is_cuda()


def check_model_runner() -> None:
    """CUDA: the V1 model runner (the worker checks again: features can force V2 without the variable)."""
    from vllm import envs

    if envs.VLLM_USE_V2_MODEL_RUNNER:
        raise ConfigError(V2_RUNNER_UNSUPPORTED)


def worker_cls() -> str:
    platform = _platform()
    if platform.is_cpu():
        return CPU_WORKER
    if platform.is_cuda():
        check_model_runner()
        return GPU_WORKER
    raise ConfigError(f"vllm-ht's Hidden Transfer runs on vLLM's CPU build and on NVIDIA GPUs (CUDA); this vLLM "
                      f"runs on {platform.device_name or platform.device_type or 'an unknown platform'}. Serve "
                      f"without --speculative-model here, or use the CPU build (docker/cpu.Dockerfile).")


RAY_ON_CPU = ("vLLM 0.32's CPU platform does not support the Ray executor (plain vLLM refuses it too: "
              "'current platform cpu does not support ray'). On one machine drop --distributed-executor-backend "
              "(tensor parallelism runs on vLLM's multiprocessing executor); see the README's scale-out section.")


def check_tensor_parallel(hf, tp: int) -> None:
    """vLLM shards attention by heads: a clear error, with the fix, before vLLM's own."""
    heads = getattr(hf, "num_attention_heads", None)
    kv = getattr(hf, "num_key_value_heads", None) or heads
    if tp <= 1 or not heads:
        return
    if not splits_heads(heads, kv, tp):
        raise ConfigError(
            f"--tensor-parallel-size {tp} does not divide the model's attention heads ({heads} query, {kv} KV). "
            f"Pick a size that divides them, or serve an exactly equivalent head-padded copy: "
            f"`vllm-ht prepare-model --pad-heads-for-tp {tp}` for the default model "
            f"(vllm_ht.head_padding.pad_heads for another Llama folder).")


def check_model(model: str, opts: HTOptions, tensor_parallel_size: int = 1) -> None:
    """Clear errors for: unsupported architecture, missing/corrupt checkpoint, checkpoint for
    another model (hidden size, vocab, layers), transfer layer out of range, a tensor-parallel
    size that does not split the heads."""
    try:
        from transformers import AutoConfig

        hf = AutoConfig.from_pretrained(model)
    except Exception:  # noqa: BLE001 - vLLM reports an unreadable model itself, with its own message
        hf = None
    if hf is not None:
        arch = (getattr(hf, "architectures", None) or ["?"])[0]
        if arch not in VLLM_ARCHITECTURES:
            raise ConfigError(f"model {model} is a {arch}; Hidden Transfer in vLLM supports "
                              f"{', '.join(VLLM_ARCHITECTURES)}. Serve it without --speculative-model.")
        check_tensor_parallel(hf, tensor_parallel_size)
    if opts.checkpoint:
        cfg, _ = load_checkpoint(opts.checkpoint)
        cfg.check_servable()
        if hf is not None:
            cfg.check_model(hf)


def ht_engine_kwargs(model: str, checkpoint: str | None = None, num_nodes: int | None = None,
                     row_budget: int | None = None, pseudo_nodes: int | None = None,
                     tensor_parallel_size: int = 1, cpu_cache_layout: str | None = None,
                     options: dict | None = None) -> dict:
    """vLLM engine arguments that turn on Hidden Transfer (for `LLM(...)` / `EngineArgs(...)`).

    `options`: further HTOptions fields (e.g. the user's `--additional-config '{"vllm_ht": {...}}'`:
    cost terms, cpu_cache_layout); the explicit arguments win where given."""
    given = {"num_nodes": num_nodes, "pseudo_nodes": pseudo_nodes, "row_budget": row_budget,
             "cpu_cache_layout": cpu_cache_layout}
    fields = {**(options or {}), **{k: v for k, v in given.items() if v is not None}}
    if checkpoint:
        fields["checkpoint"] = checkpoint
    if fields.get("checkpoint"):
        fields["checkpoint"] = str(Path(fields["checkpoint"]).resolve())
    unknown = sorted(set(fields) - set(HTOptions.__dataclass_fields__))
    if unknown:
        raise ValueError(f"unknown Hidden Transfer option(s) {unknown} in additional_config['{KEY}']; "
                         f"known: {sorted(HTOptions.__dataclass_fields__)}")
    opts = HTOptions(**fields)
    check_model(model, opts, tensor_parallel_size)
    kwargs = {"speculative_config": {"method": "custom_class", "model": "vllm_ht.vllm.proposer.HTProposer",
                                     "num_speculative_tokens": opts.max_nodes},
              "worker_cls": worker_cls(),
              "hf_overrides": {"architectures": [HT_ARCH]},
              "additional_config": {KEY: opts.to_dict()}}
    if _on_cuda():
        kwargs["attention_config"] = {"backend": HT_ATTENTION}
    return kwargs


def _select_ht_attention(args: argparse.Namespace) -> None:
    """CUDA: the HT attention backend through --attention-config's backend; another choice is refused."""
    config = getattr(args, "attention_config", None)
    given = {"--attention-backend": getattr(args, "attention_backend", None),
             "--attention-config backend": config.get("backend") if isinstance(config, dict)
             else getattr(config, "backend", None)}
    for flag, backend in given.items():
        name = str(getattr(backend, "name", backend)).upper()
        if backend is not None and name not in ("AUTO", HT_ATTENTION):
            sys.exit(f"vllm-ht: Hidden Transfer on CUDA runs its own attention backend (vLLM's {HT_ATTENTION} slot: "
                     f"TRITON_ATTN plus the tree kernel); drop {flag} {name}.")
    args.attention_backend = None       # vLLM refuses it next to attention_config.backend
    if config is None or isinstance(config, dict):
        args.attention_config = {**(config or {}), "backend": HT_ATTENTION}
    else:   # the parser's AttentionConfig: a copy (its default object is shared by every parse)
        args.attention_config = dataclasses.replace(config, backend=HT_ATTENTION)


def add_ht_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("Hidden Transfer (vllm-ht)")
    group.add_argument("--speculative-model", choices=[METHOD], default=None,
                       help="`hidden_transfer`: Hidden Transfer speculative decoding (vllm-ht plugin)")
    group.add_argument("--ht-checkpoint", default=None,
                       help="HT checkpoint folder (config.json + projections.safetensors); omit for identity projections")
    group.add_argument("--ht-num-nodes", type=int, default=None,
                       help="fixed draft-tree node budget (default: chosen per step from the batch size)")
    return parser


def expand_namespace(args: argparse.Namespace) -> None:
    """Rewrite parsed CLI args in place: the HT flags become vLLM's real flags."""
    method = getattr(args, "speculative_model", None)
    if method is None:
        if getattr(args, "ht_checkpoint", None) or getattr(args, "ht_num_nodes", None) is not None:
            sys.exit("vllm-ht: --ht-checkpoint / --ht-num-nodes need --speculative-model hidden_transfer")
        return
    if getattr(args, "speculative_config", None):
        sys.exit("vllm-ht: give either --speculative-model hidden_transfer or --speculative-config, not both")
    if (getattr(args, "pipeline_parallel_size", 1) or 1) > 1:
        sys.exit(f"vllm-ht: {PP_UNSUPPORTED}")
    if getattr(args, "distributed_executor_backend", None) == "ray" and _on_cpu():
        sys.exit(f"vllm-ht: {RAY_ON_CPU}")
    tp = getattr(args, "tensor_parallel_size", 1) or 1
    try:
        user = (getattr(args, "additional_config", None) or {}).get(KEY) or {}
        kw = ht_engine_kwargs(args.model, args.ht_checkpoint, args.ht_num_nodes, tensor_parallel_size=tp,
                              options=user)
    except (ConfigError, ValueError) as e:
        sys.exit(f"vllm-ht: {e}")
    if _on_cpu():
        from .env import apply_thread_binding

        apply_thread_binding(tp)   # pipeline parallelism was refused above
    args.speculative_config = kw["speculative_config"]
    args.worker_cls = kw["worker_cls"]
    args.hf_overrides = {**(getattr(args, "hf_overrides", None) or {}), **kw["hf_overrides"]}
    args.additional_config = {**(getattr(args, "additional_config", None) or {}), **kw["additional_config"]}
    if "attention_config" in kw:
        _select_ht_attention(args)
    args.speculative_model = None  # expanded once, even if from_cli_args runs again
