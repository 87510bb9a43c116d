"""Refuse top-k sampling with speculative decoding on vLLM 0.32's CPU build, with a clear 400.

vLLM's rejection sampler (shared by every speculative method, its own `ngram` included) fails on
the CPU build for a request with top-k: when no request in the step has a draft token,
`apply_top_k_only` takes max() of an empty tensor (vllm/v1/sample/ops/topk_topp_sampler.py:529);
when some have, the top-k values expanded per draft token (`expand_batch_to_tokens`, a Triton
kernel that the CPU build does not run) are garbage and the gather goes out of bounds (line 533).
Either way the engine process dies and every running request is lost. vLLM refuses min_p and
logit_bias the same way (`SamplingParams._validate_spec_decode`, vllm/sampling_params.py:1182);
this adds top-k to that check, on the CPU platform only. Greedy requests are unaffected (vLLM sets
top_k to 0 for them).
"""
from __future__ import annotations

MESSAGE = ("top_k is not supported with speculative decoding on vLLM's CPU build: its rejection sampler "
           "fails on top-k requests and would stop the engine. Drop top_k (top_p and temperature work), or "
           "serve without --speculative-model. (A model's generation_config.json can set top_k for every request: "
           "`--generation-config vllm` ignores it.)")


def install() -> None:
    from vllm.exceptions import VLLMValidationError
    from vllm.platforms import current_platform
    from vllm.sampling_params import SamplingParams

    original = SamplingParams._validate_spec_decode
    if getattr(original, "_vllm_ht_top_k", False) or not current_platform.is_cpu():
        return

    def validate_spec_decode(self, speculative_config):
        original(self, speculative_config)
        if speculative_config is not None and self.top_k > 0:
            raise VLLMValidationError(MESSAGE, parameter="top_k", value=self.top_k)

    validate_spec_decode._vllm_ht_top_k = True
    SamplingParams._validate_spec_decode = validate_spec_decode
