"""Hidden Transfer speculative decoding (arXiv 2404.12022) as a vLLM plugin.

What users import:
    from vllm_ht import ht_engine_kwargs      # LLM(MODEL, **ht_engine_kwargs(MODEL, checkpoint=DIR))
    vllm_ht.__version__

Layout: the core (config, tree, verify, policy, ... ; no vLLM import, checked by
tests/test_layout.py), `vllm_ht.vllm` (the vLLM hooks), `vllm_ht.kernels` (tree attention and KV
compaction), `vllm_ht.training`, `vllm_ht.tools` (engine drivers, calibration, load tests) and
`vllm_ht.reference` (the transformers reference engine, the oracle).
"""
from __future__ import annotations

__version__ = "0.1.0"   # the one place it is written; setup.py reads it from here

__all__ = ["__version__", "ht_engine_kwargs"]


def __getattr__(name: str):
    # Lazy, so `import vllm_ht` (and every core module) stays free of vLLM's import cost.
    if name == "ht_engine_kwargs":
        from .vllm.engine_args import ht_engine_kwargs

        return ht_engine_kwargs
    raise AttributeError(f"module 'vllm_ht' has no attribute {name!r}")
