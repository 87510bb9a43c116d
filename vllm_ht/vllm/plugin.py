"""The `vllm.general_plugins` entry point: runs in every vLLM process, possibly several times.

Registers the HT model class, the derived acceptance gauges (prometheus.py), the top-k guard for
the CPU build (top_k_guard.py) and adds the
`--speculative-model hidden_transfer` CLI alias (vLLM loads plugins before it builds the serve
parser).
"""
from __future__ import annotations

_DONE = False


def register() -> None:
    global _DONE
    if _DONE:
        return
    _DONE = True
    from vllm import ModelRegistry
    from vllm.engine.arg_utils import EngineArgs

    from .engine_args import HT_ARCH, add_ht_arguments, expand_namespace

    ModelRegistry.register_model(HT_ARCH, "vllm_ht.vllm.model:HTLlamaForCausalLM")
    from .prometheus import ensure_sources_dir, register_collector

    from .top_k_guard import install as guard_top_k

    guard_top_k()         # a clear 400 where vLLM's CPU rejection sampler would die on top-k
    ensure_sources_dir()  # per-source draft counts travel from the engine process through a folder
    register_collector()  # derived gauges: mean accepted length, per-depth acceptance; per-source counters
    if getattr(EngineArgs, "_vllm_ht_wrapped", False):
        return
    add_cli_args = EngineArgs.add_cli_args
    from_cli_args = EngineArgs.from_cli_args.__func__

    def add_cli_args_ht(parser):
        return add_ht_arguments(add_cli_args(parser))

    def from_cli_args_ht(cls, args):
        expand_namespace(args)
        return from_cli_args(cls, args)

    EngineArgs.add_cli_args = staticmethod(add_cli_args_ht)
    EngineArgs.from_cli_args = classmethod(from_cli_args_ht)
    EngineArgs._vllm_ht_wrapped = True
