"""The start-up self-check (vllm_ht/vllm/self_check.py) refuses to speculate where verification
would not be exact. A fault is injected into the engine's own probe step (test-only option
`test_self_check_fault`): one wrong bit in a tree mask, or K/V compacted one slot off. The check
must name it; the engine then serves plain vLLM's tokens with no drafts ("on", the default), or
stops at start-up ("strict"). That the check passes on a healthy engine is asserted by the
compiled fp32 e2e (test_compiled_e2e.py), the TP=2 e2e, and, where bf16 is the serving dtype
(native bf16), the bf16 e2e (test_offline_e2e.py)."""
import json

import pytest
from e2e_helpers import plain_greedy, run_engine, run_engine_process, trained_checkpoint

N, TOKENS = 4, 24
ARGS = ["--limit", str(N), "--max-tokens", str(TOKENS), "--ignore-eos", "--batch-sizes", "1"]


def test_a_wrong_mask_bit_turns_drafting_off_and_serves_plain_tokens(model_dir, tmp_path, plain_reference):
    ht = run_engine(model_dir, tmp_path / "ht.json", "--method", "ht", "--checkpoint", str(trained_checkpoint()),
                    "--num-nodes", "8", "--ht-options", json.dumps({"test_self_check_fault": "mask"}), *ARGS)
    check = ht["self_check"]
    failed = [c["name"] for c in check["checks"] if not c["ok"]]
    assert check["passed"] is False and failed == ["tree"], check     # only the mask fault, and it is named
    run = ht["runs"]["1"]
    assert run["num_drafts"] == 0, run                                # a forced 8-node tree, yet no drafts
    assert not {"tree", "pseudo"} & set(run["step_kinds"]), run["step_kinds"]
    assert run["outputs"] == plain_greedy(plain_reference, N, TOKENS)


@pytest.mark.parametrize("fault, check", [("compact", "compact")])
def test_strict_mode_stops_the_engine_and_names_the_check(model_dir, tmp_path, fault, check):
    proc = run_engine_process(model_dir, tmp_path / "x.json", "--method", "ht", "--checkpoint", str(trained_checkpoint()),
                              *ARGS, "--ht-options", json.dumps({"self_check": "strict", "test_self_check_fault": fault}))
    assert proc.returncode != 0 and not (tmp_path / "x.json").exists()
    assert f"self-check failed {check}" in proc.stderr and "self_check='strict'" in proc.stderr, proc.stderr[-3000:]
