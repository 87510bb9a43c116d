"""Requests with unusual or chain-only sampling parameters, one engine each for plain vLLM and HT
(fp32, forced 4-node trees + lookup), one request at a time so each request's drafts are its own.

Chain-only features (runner.chain_only_reason): verification applies temperature, top-k and top-p
only, so a request using anything else must get no drafts at all and decode exactly as plain vLLM.
Other unusual parameters (n > 1, a near-zero temperature, stop strings, max_tokens=1, ignore_eos)
are verified as usual: greedy ones must give plain's tokens, sampled ones must draft. A plain greedy
request in the same run must draft, so "no drafts" is a property of the features, not of the run.
"""
import json
import re

import pytest
from e2e_helpers import run_engine, trained_checkpoint

from vllm_ht.vllm.runner import chain_only_reason

# each chain-only reason, and the request parameters that trigger it
CHAIN_ONLY = {
    "logprobs": {"logprobs": 2},
    "prompt logprobs": {"prompt_logprobs": 1},
    "presence penalty": {"presence_penalty": 0.5},
    "frequency penalty": {"frequency_penalty": 0.5},
    "repetition penalty": {"repetition_penalty": 1.3},
    "structured output": {"structured_outputs": {"choice": ["yes", "no", "maybe"]}},
    "bad words": {"bad_words": ["the"]},
    "min tokens": {"min_tokens": 40, "max_tokens": 48},
    "allowed token ids": {"allowed_token_ids": list(range(200, 5000))},
}
# chain-only too, but vLLM refuses them with any speculative method before they reach HT
# (SamplingParams._validate_spec_decode, vllm/sampling_params.py:1182): the server e2e checks the
# refusal is a clear 4xx and the server keeps serving
REFUSED_BY_VLLM = {
    "min_p": {"min_p": 0.1},
    "logit bias": {"logit_bias": {"330": 3.0}},
}
# not chain-only: drafted and verified; the greedy ones identical to plain, the sampled ones (SAMPLED) drafting
UNUSUAL = {
    "plain greedy (control)": {},
    # n > 1 needs T > 0 in vLLM; no sampled top_k: vLLM 0.32's CPU rejection sampler dies on it under
    # any speculative method, so HT refuses it there (vllm_ht/vllm/top_k_guard.py; the server e2e
    # checks the 400)
    "n=2": {"n": 2, "temperature": 0.8, "seed": 5},
    # vLLM raises a temperature in (0, 0.01) to 0.01 (SamplingParams.__post_init__,
    # vllm/sampling_params.py:557): a sampled request, not a greedy one
    "temperature 1e-6": {"temperature": 1e-6, "seed": 11},
    "stop string": {"stop": [" and "]},
    "max_tokens=1": {"max_tokens": 1},
    "ignore_eos": {"ignore_eos": True, "max_tokens": 40},
}
# sampled (seeded) requests: tokens are draws, not plain's; the sampling e2e checks the distribution
SAMPLED = ("n=2", "temperature 1e-6")
CASES = {**CHAIN_ONLY, **UNUSUAL}
NAMES = list(CASES)


def _sp(kw: dict):
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    kw = dict(kw)
    if "structured_outputs" in kw:
        kw["structured_outputs"] = StructuredOutputsParams(**kw["structured_outputs"])
    return SamplingParams(**kw)


def test_every_chain_only_reason_is_covered():
    """Each chain-only case triggers a reason and the unusual ones none; every reason
    chain_only_reason can name is exercised here or listed as untested with why, so a new reason
    without a case fails."""
    import inspect

    from vllm_ht.vllm import runner

    exercised = {chain_only_reason(_sp(kw)) for kw in (*CHAIN_ONLY.values(), *REFUSED_BY_VLLM.values())}
    assert None not in exercised
    assert all(chain_only_reason(_sp(kw)) is None for kw in UNUSUAL.values())
    # thinking budget needs a reasoning parser; logprob token ids and watermarking are vLLM extras
    untested = {"thinking budget", "logprob token ids", "watermarking"}
    src = inspect.getsource(runner.chain_only_reason)
    named = set(re.findall(r'"([a-z_ ]+)":', src))
    assert named == exercised | untested, f"chain_only_reason names {named}: add a case for each"


@pytest.fixture(scope="module")
def runs(model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("params")
    params = tmp / "params.json"
    params.write_text(json.dumps([{"max_tokens": 32, **CASES[n]} for n in NAMES]))
    args = ["--limit", str(len(NAMES)), "--request-params", str(params), "--batch-sizes", "1"]
    plain = run_engine(model_dir, tmp / "plain.json", *args)["runs"]["1"]
    ht = run_engine(model_dir, tmp / "ht.json", "--method", "ht", "--checkpoint", str(trained_checkpoint()),
                    "--num-nodes", "4", *args)["runs"]["1"]
    return plain, ht


@pytest.mark.parametrize("name", NAMES)
def test_request_identical_to_plain_and_drafts_only_where_allowed(runs, name):
    plain, ht = runs
    i = NAMES.index(name)
    chunk = ht["chunks"][i]
    assert chunk["start"] == i and chunk["size"] == 1
    if name not in SAMPLED:
        assert ht["choices"][i] == plain["choices"][i], f"{name}: differs from plain vLLM"
    if name in CHAIN_ONLY:
        assert chunk["num_drafts"] == 0, f"{name}: a chain-only request got {chunk['num_drafts']} drafts"
    elif name in ("plain greedy (control)", "ignore_eos", *SAMPLED):
        assert chunk["num_drafts"] > 0 and chunk["num_accepted"] > 0, f"{name}: {chunk}"
    if name == "n=2":
        assert len(ht["choices"][i]) == 2
    if name == "max_tokens=1":
        assert len(ht["outputs"][i]) == 1
    if name == "ignore_eos":
        assert len(ht["outputs"][i]) == 40
