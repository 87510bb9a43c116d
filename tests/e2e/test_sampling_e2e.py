"""Sampling inside vLLM is lossless, with power: T=0.8 (and T=0.8 with top-p 0.9), 360
seeded samples of one prompt per engine, 5 tokens each. Tokens at positions 1-4 are decided by tree
verification; position 0, the prefill's, is drawn by the verifier's rule on a one-node tree (the
runner draws every token of a seeded request so, tree or not: vllm_ht/vllm/runner.py). Their
distribution per position must match plain vLLM's (chi-square, Bonferroni over the positions
compared). A negative control runs the same test through the real vLLM wiring with a deliberately
biased verifier (HTOptions.test_biased_verifier): it must fail, so the test can tell a lossless
verifier from a wrong one at this sample size.
Measured power (2-core AVX2 CPU; this test applied to the first 360 of an earlier run's 1,500
samples per arm, positions 1-4): at every (config, position) compared the biased verifier's p-value
was 2.1e-11 or smaller, against a threshold of 1.3e-4; the lossless verifier's smallest was 0.34.
That run had 5,319 drafts in the HT arm and 3,000 in the biased one (1,500 samples each). With
position 0 too (10 comparisons, threshold 1e-4), a run of this test: the biased verifier's p-values
at positions 1-4 were 2.6e-12 or smaller, the lossless one's smallest 0.13 (1,247 drafts); at
position 0 both HT arms drew the same tokens (same seeds, same rule, no tree), p 0.55 and 0.16.
Those runs used the first MT-bench question. With this test's present prompt (129-160 tokens, its
first 128 served from the prefix cache), one run: the biased verifier's p-values were 0.0 in
float64 at 8 of 10 comparisons (positions 1-4), the lossless one's smallest 0.029 (1,240 drafts,
29% accepted); the plain arm's prefills fell from ~12 s to ~3.5 s per batch of 60."""
import json

import pytest
from e2e_helpers import run_engine, trained_checkpoint

# batch 60: plain vLLM 0.32's CPU build dies on seeded requests whose prefill is split in chunks
# (`set_offset` on a CPU generator, gpu_model_runner.py:3502); 60 prompts fit one prefill step
SAMPLES, BATCH, TOKENS = 360, 60, 5
# One prompt of 129-160 tokens after the chat template: vLLM's CPU build keeps KV in blocks of 128
# tokens with prefix caching on, so after the offline tool's warm-up request every request reads
# the prompt's first block from the prefix cache and prefills a few tokens, not the ~55 of an
# MT-bench question (the prefills were most of the plain arm's time). HT thus also samples on
# prompts served from the prefix cache.
PROMPT = ("You are writing for a travel magazine. Our readers are curious, practical people who like short, "
          "vivid openings, concrete details about food, markets, music and the people they meet, and honest "
          "advice about costs, crowds and the best time of year to go. Avoid lists and headings; write flowing "
          "prose in the first person, as if you had just come back from the trip. Compose an engaging travel "
          "blog post about a recent trip to Hawaii, highlighting cultural experiences and must-see attractions "
          "on two of its islands.")
PREFIX_BLOCK = 128
# request i uses CONFIGS[i % 2]. No top-k: vLLM 0.32's CPU rejection sampler dies on top-k requests
# under any speculative method (ngram too); HT's own verifier applies top-k (tests/test_verify.py)
CONFIGS = [{}, {"top_p": 0.9}]
POSITIONS = (0, 1, 2, 3, 4)
ALPHA = 1e-3
ENGINE_TIMEOUT = 1200


def _p_values(a_outputs, b_outputs) -> dict[tuple[int, int], float]:
    """(config, position) -> chi-square p-value of token counts, plain vs HT (tokens seen < 10
    times in both arms pooled into one 'other' column); deterministic positions are left out."""
    from scipy.stats import chi2_contingency

    out = {}
    for c in range(len(CONFIGS)):
        for pos in POSITIONS:
            a = [o[pos] for i, o in enumerate(a_outputs) if i % len(CONFIGS) == c and len(o) > pos]
            b = [o[pos] for i, o in enumerate(b_outputs) if i % len(CONFIGS) == c and len(o) > pos]
            common = [t for t in set(a) | set(b) if a.count(t) + b.count(t) >= 10]
            table = [[a.count(t) for t in common] + [len(a) - sum(a.count(t) for t in common)],
                     [b.count(t) for t in common] + [len(b) - sum(b.count(t) for t in common)]]
            table = [col for col in zip(*table) if sum(col) > 0]
            if len(table) >= 2:
                out[(c, pos)] = chi2_contingency(list(zip(*table))).pvalue
    return out


def _chat_tokens(model_dir, text: str) -> int:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(model_dir)).apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True)
    return len(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.fixture(scope="module")
def arms(model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sampling")
    params = tmp / "params.json"
    params.write_text(json.dumps(CONFIGS))
    prompts = tmp / "prompt.jsonl"
    prompts.write_text(json.dumps({"turns": [PROMPT]}) + "\n")
    assert PREFIX_BLOCK < _chat_tokens(model_dir, PROMPT) <= PREFIX_BLOCK + 32
    args = ["--prompts", str(prompts), "--limit", "1", "--repeat", str(SAMPLES), "--max-tokens", str(TOKENS),
            "--temperature", "0.8", "--seed", "0", "--batch-sizes", str(BATCH), "--request-params", str(params)]
    ht_args = ["--method", "ht", "--checkpoint", str(trained_checkpoint()), "--num-nodes", "4"]
    # on a 2-core AVX2 CPU the HT engine ran past run_engine's default 390 s with 1,500 requests
    plain = run_engine(model_dir, tmp / "p.json", *args, timeout=ENGINE_TIMEOUT)["runs"][str(BATCH)]
    ht = run_engine(model_dir, tmp / "h.json", *ht_args, *args, timeout=ENGINE_TIMEOUT)["runs"][str(BATCH)]
    biased = run_engine(model_dir, tmp / "b.json", *ht_args, "--ht-options", '{"test_biased_verifier": true}',
                        *args, timeout=ENGINE_TIMEOUT)["runs"][str(BATCH)]
    return plain, ht, biased


@pytest.mark.timeout(3 * ENGINE_TIMEOUT)        # the three engines start in the first test's setup
def test_sampled_tokens_follow_the_target_distribution(arms):
    plain, ht, _ = arms
    # verification really decided tokens: many drafts, a real share of them accepted (floor 0.1)
    rate = ht["num_accepted"] / max(ht["num_drafts"], 1)
    print(f"sampling e2e: {ht['num_drafts']} drafts, {rate:.2f} accepted")
    assert ht["num_drafts"] > 500 and rate > 0.1, ht["num_accepted"]
    p = _p_values(plain["outputs"], ht["outputs"])
    assert len(p) >= 6, f"only {len(p)} (config, position) pairs had varying tokens: too little to compare"
    print(f"sampling e2e: lossless arm, smallest p-value {min(p.values()):.2g} over {len(p)} comparisons")
    bad = {k: v for k, v in p.items() if v < ALPHA / len(p)}
    assert not bad, f"HT's sampled tokens differ from plain vLLM's at (config, position) {bad}"


@pytest.mark.timeout(3 * ENGINE_TIMEOUT)        # the three engines start in the first test's setup
def test_negative_control_a_biased_verifier_fails(arms):
    plain, _, biased = arms
    assert biased["num_drafts"] > 500
    p = _p_values(plain["outputs"], biased["outputs"])
    assert len(p) >= 6
    print(f"sampling e2e: biased arm, p-values {', '.join(f'{v:.2g}' for v in sorted(p.values()))}")
    assert min(p.values()) < ALPHA / len(p), f"the biased verifier passed (p-values {p}): the test has no power"
