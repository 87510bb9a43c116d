"""Refuse top-k sampling with speculative decoding on vLLM 0.32's CPU build, with a clear 400.

vLLM's rejection sampler (shared by every speculative method, its own `ngram` included) fails on
the CPU build for a request with top-k: when no request in the step has a draft token,
`apply_top_k_only` takes max() of an empty tensor (vllm/v1/sample/ops/topk_topp_sampler.py:529);
when some have, the top-k values expanded per draft token (`expand_batch_to_tokens`, a Triton
kernel that the CPU build does not run) are garbage and the gather goes out of bounds (line 533).
Either way the engine process dies and every running request is lost. vLLM refuses min_p and
logit_bias the same way (`SamplingParams._validate_spec_decode`, vllm/sampling_params.py:1182);
this adds top-k to that check, on the CPU platform only, for any speculative method. Greedy
requests are unaffected (vLLM sets top_k to 0 for them), and so is a top_k of at least the
vocabulary size (vLLM treats it as no top-k).
"""
from __future__ import annotations

MESSAGE = ("top_k is not supported with speculative decoding on vLLM's CPU build: its rejection sampler "
           "fails on top-k requests and would stop the engine. Send top_k 0 (top_p and temperature work), "
           "or serve without speculative decoding. Where the model's generation_config.json sets top_k "
           "for every request, serve with --override-generation-config '{\"top_k\": 0}'.")


def refuses(top_k: int, vocab_size: int | None) -> bool:
    """A sampled request's top_k that vLLM's CPU rejection sampler would die on."""
    return 0 < top_k < (vocab_size or float("inf"))


def install() -> None:
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams

    original = SamplingParams._validate_spec_decode
    if getattr(original, "_vllm_ht_top_k", False):
        return

    def validate_spec_decode(self, speculative_config):
        original(self, speculative_config)
        if speculative_config is None:
            return
        target = getattr(speculative_config, "target_model_config", None)
        if refuses(self.top_k, target.get_vocab_size() if target is not None else None):
            raise VLLMValidationError(MESSAGE, parameter="top_k", value=self.top_k)

    validate_spec_decode._vllm_ht_top_k = True
    SamplingParams._validate_spec_decode = validate_spec_decode
