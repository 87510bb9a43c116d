"""The default policy (no forced tree) drafts, is accepted and stays lossless. Costs come from a
calibration file as `vllm-ht calibrate` writes it (here: cheap rows, so drafting pays and the
policy, not the test, picks the tree and its anchors); fp32 greedy tokens equal plain vLLM's."""
import json

from e2e_helpers import cheap_calibration, plain_greedy, run_engine, trained_checkpoint

N, TOKENS = 5, 48
ARGS = ["--limit", str(N), "--max-tokens", str(TOKENS), "--ignore-eos", "--batch-sizes", "1"]


def test_default_policy_drafts_accepts_and_is_lossless(model_dir, tmp_path, plain_reference):
    calibration = cheap_calibration(tmp_path / "calibration.json")
    ht = run_engine(model_dir, tmp_path / "ht.json", "--method", "ht", "--checkpoint", str(trained_checkpoint()),
                    "--ht-options", json.dumps({"calibration": str(calibration)}), *ARGS)
    run = ht["runs"]["1"]
    assert run["num_drafts"] > 0 and run["num_accepted"] > 0, run
    assert run["outputs"] == plain_greedy(plain_reference, N, TOKENS)
