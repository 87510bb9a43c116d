"""Hidden Transfer under vLLM tensor parallelism on the CPU build (gloo, multiprocessing executor).

The default model has 9 query / 3 KV heads, which do not split over 2 ranks; its exactly
equivalent head-padded copy (12 / 4, zero heads; vllm_ht/head_padding.py) does. TP=2 HT on the
copy must give plain vLLM's greedy tokens at TP=1 on the original, one request at a time and as a
mixed batch, with drafts really accepted (every rank verifies; the first rank's decision is applied).
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from e2e_helpers import run_engine, trained_checkpoint

N, TOKENS = 6, 48
# a fixed 4-node tree: the cost policy drafts nothing at batch 5 on this CPU, and the point here is
# tree verification across ranks at every batch size
ARGS = ["--limit", str(N), "--max-tokens", str(TOKENS), "--ignore-eos", "--batch-sizes", "1,5", "--num-nodes", "4"]


@pytest.fixture(scope="module")
def padded_dir(model_dir):
    """The user's way: `vllm-ht prepare-model --pad-heads-for-tp 2` prints the copy's folder."""
    proc = subprocess.run([sys.executable, "-m", "vllm_ht.cli", "prepare-model", "--pad-heads-for-tp", "2"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    folder = Path(proc.stdout.strip().splitlines()[-1])
    assert folder != Path(model_dir) and json.loads((folder / "config.json").read_text())["num_key_value_heads"] == 4
    return folder


@pytest.fixture(scope="module")
def plain_tp1(model_dir, tmp_path_factory):
    return run_engine(model_dir, tmp_path_factory.mktemp("tp") / "plain.json", *ARGS)


@pytest.fixture(scope="module")
def ht_tp2(padded_dir, tmp_path_factory):
    return run_engine(padded_dir, tmp_path_factory.mktemp("tp") / "ht_tp2.json", "--method", "ht",
                      "--checkpoint", str(trained_checkpoint()), "--tensor-parallel-size", "2", *ARGS,
                      single_process=False)


def test_ht_tp2_identical_to_plain_tp1(ht_tp2, plain_tp1):
    for bs in ("1", "5"):
        got, want = ht_tp2["runs"][bs]["outputs"], plain_tp1["runs"][bs]["outputs"]
        assert len(got) == len(want) == N and all(len(o) == TOKENS for o in got)
        mismatched = [i for i, (a, b) in enumerate(zip(got, want)) if a != b]
        assert not mismatched, f"batch {bs}: prompts {mismatched} differ from plain vLLM at TP=1"


def test_ht_tp2_accepts_drafts(ht_tp2):
    assert ht_tp2["self_check"]["passed"] is True, ht_tp2["self_check"]   # both ranks' probes, merged
    for bs in ("1", "5"):
        run = ht_tp2["runs"][bs]
        assert run["num_drafts"] > 0, f"batch {bs}: no trees were verified"
        assert run["mean_accepted_length"] > 1.3, f"batch {bs}: tau {run['mean_accepted_length']}"


# a fixed lookup length too: the policy's length is priced with this machine's measured step costs,
# which differ between TP sizes, and seeded sampling draws differently for other tree shapes
SAMPLED = ["--limit", "5", "--max-tokens", "32", "--ignore-eos", "--batch-sizes", "1,5", "--temperature", "0.8",
           "--seed", "7", "--num-nodes", "4", "--ht-options", '{"lookup_nodes": 2}']


@pytest.fixture(scope="module")
def sampled_runs(padded_dir, tmp_path_factory):
    """Seeded sampling with HT at TP=1 and TP=2 on the same (padded) model."""
    out = tmp_path_factory.mktemp("tp")
    common = ["--method", "ht", "--checkpoint", str(trained_checkpoint()), *SAMPLED]
    return {tp: run_engine(padded_dir, out / f"sampled_tp{tp}.json", "--tensor-parallel-size", str(tp), *common,
                           single_process=tp == 1)
            for tp in (1, 2)}


def test_seeded_sampling_under_tp2_matches_tp1(sampled_runs):
    """Every rank verifies with its copy of the request's generator and the first rank's result is
    applied: the sampled tokens are those of one process with the same seeds."""
    for bs in ("1", "5"):
        one, two = sampled_runs[1]["runs"][bs], sampled_runs[2]["runs"][bs]
        assert all(len(o) == 32 for o in two["outputs"])
        assert two["outputs"] == one["outputs"], f"batch {bs}: TP=2 sampled other tokens than TP=1"
        assert two["num_drafts"] > 0 and two["num_accepted"] > 0
