"""The top-k guard (vllm_ht/vllm/top_k_guard.py) on vLLM's own SamplingParams: sampled top-k under
speculative decoding is refused with the fix named; greedy, top_k 0 / -1 / >= vocab and requests
without speculative decoding pass. The server e2e checks the 400 over HTTP."""
import pytest
from vllm.exceptions import VLLMValidationError
from vllm.sampling_params import SamplingParams

from vllm_ht.vllm.top_k_guard import install


class _Target:
    def get_vocab_size(self):
        return 1000


class _SpecConfig:
    target_model_config = _Target()


@pytest.fixture(scope="module", autouse=True)
def guard():
    install()
    install()                                   # idempotent: plugins load more than once


def test_sampled_top_k_is_refused_with_the_fix():
    with pytest.raises(VLLMValidationError, match="top_k is not supported.*override-generation-config"):
        SamplingParams(temperature=0.7, top_k=20)._validate_spec_decode(_SpecConfig())


@pytest.mark.parametrize("kw", [dict(temperature=0.0, top_k=20), dict(temperature=0.7, top_k=0),
                                dict(temperature=0.7, top_k=-1), dict(temperature=0.7, top_k=1000),
                                dict(temperature=0.7, top_p=0.9)])
def test_what_works_passes(kw):
    SamplingParams(**kw)._validate_spec_decode(_SpecConfig())


def test_without_speculative_decoding_top_k_passes():
    SamplingParams(temperature=0.7, top_k=20)._validate_spec_decode(None)


def test_vllms_own_refusals_still_apply():
    with pytest.raises(VLLMValidationError, match="min_p"):
        SamplingParams(temperature=0.7, min_p=0.1)._validate_spec_decode(_SpecConfig())
