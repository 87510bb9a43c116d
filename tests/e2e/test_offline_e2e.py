"""vLLM + Hidden Transfer on vLLM's CPU build is lossless: greedy fp32 outputs equal plain vLLM's
on 12 MT-bench prompts x 64 tokens (6 for the identity projections), one request at a time and as
mixed-length batches of 8. Plain vLLM's tokens are the session's reference run (conftest.py)."""
import json

import pytest

from e2e_helpers import REFERENCE_ARGS, cheap_calibration, plain_greedy, run_engine, trained_checkpoint

from vllm_ht.cpu_features import serving_dtype

N, TOKENS = 12, 64
ARGS = list(REFERENCE_ARGS)           # 12 prompts x 64 tokens, --ignore-eos, batch 1 and 8
IDENTITY_N = 6                        # identity projections accept few drafts: each step is a tree step


@pytest.fixture(scope="module")
def plain(plain_reference):
    return plain_reference


@pytest.fixture(scope="module")
def ht_identity(model_dir, tmp_path_factory):
    # the ROWS cache layout (what HT uses where vLLM's CPU packing is not readable, e.g. AMX); the
    # other HT engines here keep vLLM's own packing, this CPU's default
    return run_engine(model_dir, tmp_path_factory.mktemp("e2e") / "ht.json", "--method", "ht", "--num-nodes", "6",
                      "--cpu-cache-layout", "rows", *ARGS, "--limit", str(IDENTITY_N))


@pytest.fixture(scope="module")
def ht_trained(model_dir, tmp_path_factory):
    return run_engine(model_dir, tmp_path_factory.mktemp("e2e") / "ht_trained.json", "--method", "ht",
                      "--checkpoint", str(trained_checkpoint()), "--num-nodes", "8", "--pseudo-nodes", "3", *ARGS)


def _check_identical(result, plain, n=N):
    want = plain_greedy(plain, n, TOKENS)
    for bs in ("1", "8"):
        got = result["runs"][bs]["outputs"]
        assert len(got) == n
        mismatched = [i for i, (a, b) in enumerate(zip(got, want)) if a != b]
        assert not mismatched, f"batch {bs}: prompts {mismatched} differ from plain vLLM"
        assert all(len(o) == TOKENS for o in got)


def test_plain_vllm_is_batch_invariant_in_fp32(plain):
    assert plain["runs"]["1"]["outputs"] == plain["runs"]["8"]["outputs"]  # the premise of the tests below


def test_ht_identity_projections_identical_to_plain(ht_identity, plain):
    _check_identical(ht_identity, plain, IDENTITY_N)
    assert ht_identity["runs"]["1"]["num_drafts"] > 0  # trees were really verified


def test_ht_trained_identical_to_plain_and_accepts_drafts(ht_trained, plain):
    _check_identical(ht_trained, plain)
    for bs in ("1", "8"):
        tau = ht_trained["runs"][bs]["mean_accepted_length"]
        assert tau is not None and tau > 1.3, f"batch {bs}: tau {tau}"


# ---- bf16, the serving default where the CPU computes it natively --------------------------------
# Exact equality cannot hold in bf16 (plain vLLM differs from itself across batch shapes). What can
# hold: HT in bf16 stays as close to the fp32 greedy truth as plain bf16 does. Measured as the mean
# position of the first token differing from fp32 greedy (64 if none), 12 prompts x 64 tokens (eager).
# The margin is plain bf16's own spread across batch shapes (batch 1 vs 8 against the same truth),
# measured in the same run, plus a floor.
BF16_ARGS = ["--limit", str(N), "--max-tokens", str(TOKENS), "--ignore-eos", "--dtype", "bfloat16"]
BF16_MARGIN_FLOOR = 3.0


def _mean_first_difference(outputs, truth) -> float:
    firsts = [next((j for j, (a, b) in enumerate(zip(o, t)) if a != b), TOKENS) for o, t in zip(outputs, truth)]
    return sum(firsts) / len(firsts)


@pytest.mark.skipif(serving_dtype() != "bfloat16",
                    reason="this CPU has no native bf16 (vllm_ht/cpu_features.py): vllm-ht serves fp32 here, "
                           "which the fp32 tests above cover; bf16 runs emulated and is never served by default")
def test_bf16_ht_stays_as_close_to_fp32_greedy_as_plain_bf16(model_dir, tmp_path, plain):
    """At batch 1, where the default policy drafts (hybrid trees): HT bf16 against plain bf16. The
    policy reads a calibration of cheap rows written here, not this machine's, so that it drafts
    regardless of this machine's bf16 costs. Runs where bf16 is the serving dtype (native bf16: AMX,
    AVX512-BF16, Arm BF16). On a 2-core AVX2 CPU, where bf16 is emulated, it failed: HT bf16's mean
    first difference was 23.2 against plain bf16's 28.65 (docs/benchmarks.md)."""
    truth = plain["runs"]["1"]["outputs"]                    # fp32: batch 1 and 8 agree (test above)
    calibration = cheap_calibration(tmp_path / "calibration.json")
    plain16 = run_engine(model_dir, tmp_path / "p16.json", *BF16_ARGS, "--batch-sizes", "1,8")
    ht16 = run_engine(model_dir, tmp_path / "d16.json", "--method", "ht", "--checkpoint", str(trained_checkpoint()),
                      "--ht-options", json.dumps({"calibration": str(calibration)}), *BF16_ARGS, "--batch-sizes", "1")
    at = {bs: _mean_first_difference(plain16["runs"][bs]["outputs"], truth) for bs in ("1", "8")}
    ht = _mean_first_difference(ht16["runs"]["1"]["outputs"], truth)
    margin = max(BF16_MARGIN_FLOOR, 2 * abs(at["1"] - at["8"]))
    print(f"mean first position differing from fp32 greedy: plain bf16 batch 1 {at['1']:.1f}, batch 8 "
          f"{at['8']:.1f}; HT bf16 default policy, batch 1 {ht:.1f} (margin {margin:.1f})")
    assert at["1"] > 2 * margin, (at, margin)                # else the comparison has no power
    assert ht16["runs"]["1"]["num_accepted"] > 100           # trees really decided tokens
    assert ht16["self_check"]["passed"] is True, ht16["self_check"]   # the start-up probe passes in bf16
    assert ht >= at["1"] - margin, (ht, at, margin)
