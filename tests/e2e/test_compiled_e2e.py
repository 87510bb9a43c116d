"""vLLM's default mode (compiled) with HT is lossless: with a forced depth-3 tree, greedy fp32
tokens equal plain vLLM's on 12 prompts x 64 tokens, one request at a time and in mixed batches of
8. Plain vLLM's tokens are the session's eager reference (conftest.py); compiled plain vLLM gave
the same tokens on this machine (2-core AVX2 CPU, fp32: all 12 prompts x 64 at batch 1 and 8), and
should a compiled HT output differ from the eager reference the test starts compiled plain vLLM and
judges HT by it, so a rounding difference between compiled and eager plain cannot fail HT.
HT steps are the same compiled forward over more rows (pseudo rows join through the
transfer op), so the test also counts the kinds of step that ran: with pseudo rows, with and
without trees (16-node trees of depth 3: drafts at depth 3 verified and compacted inside vLLM).
Hybrid trees are on (the default): at batch 1 each tree also holds a prompt-lookup chain, and the
test checks that both sources' drafts were accepted, and that lookup and pseudo rows proposed shared
nodes. At batch 8 the row budget leaves no room for a chain beside the forced 16-node tree.
The engine runs in one process (the offline tool's --single-process): vLLM compiles in its worker
either way, and the served multiprocess layout is what the server e2e runs."""
import pytest
from e2e_helpers import REFERENCE_ARGS, run_engine, trained_checkpoint

N, TOKENS = 12, 64
ARGS = list(REFERENCE_ARGS)           # 12 prompts x 64 tokens, --ignore-eos, batch 1 and 8
# compiling is most of an engine's time: 280 s for the HT engine on a 2-core AVX2 CPU one day, over
# run_engine's default 390 s on the same machine another
ENGINE_TIMEOUT = 560


@pytest.mark.timeout(1500)   # the session's eager reference may start in this test's setup, then 1-2 engines
def test_compiled_ht_identical_to_plain(model_dir, tmp_path, plain_reference):
    ht = run_engine(model_dir, tmp_path / "ht.json", "--method", "ht", "--checkpoint", str(trained_checkpoint()),
                    "--num-nodes", "16", "--pseudo-nodes", "3", *ARGS, eager=False, timeout=ENGINE_TIMEOUT)
    plain, baseline = plain_reference, "plain vLLM (eager reference)"
    if any(ht["runs"][bs]["outputs"] != plain["runs"][bs]["outputs"] for bs in ("1", "8")):
        plain, baseline = run_engine(model_dir, tmp_path / "plain.json", *ARGS, eager=False,
                                     timeout=ENGINE_TIMEOUT), "compiled plain vLLM"
    for bs in ("1", "8"):
        run = ht["runs"][bs]
        got, want = run["outputs"], plain["runs"][bs]["outputs"]
        assert len(got) == len(want) == N and all(len(o) == TOKENS for o in got)
        mismatched = [i for i, (a, b) in enumerate(zip(got, want)) if a != b]
        assert not mismatched, f"batch {bs}: prompts {mismatched} differ from {baseline}"
        assert run["mean_accepted_length"] is not None and run["mean_accepted_length"] > 1.3, \
            f"batch {bs}: tau {run['mean_accepted_length']}: trees were not really verified"
        assert len(run["acceptance_per_depth"]) >= 3, "no depth-3 draft was accepted"
        src = run["sources"]
        assert src["pseudo"]["accepted"] > 0, src
        if bs == "1":
            assert src["lookup"]["accepted"] > 0, src     # both sources verified right
            assert src["both"]["drafted"] > 0, src        # lookup and pseudo rows proposed the same tokens (merged)
        kinds = run["step_kinds"]
        # steps with pseudo rows and a tree, and decode steps with pseudo rows but no tree (after a
        # node without pseudo rows was accepted). Steps without pseudo rows are the policy's
        # no-drafting steps: tests/e2e/test_default_policy_e2e.py and the chain-only tests run those.
        assert kinds.get("tree+pseudo", 0) > 0, kinds
        if bs == "1":
            assert kinds.get("decode+pseudo", 0) > 0, kinds
        assert kinds.get("padded", 0) == 0, kinds          # vLLM's CPU build never pads a batch
    # the start-up self-check ran through the compiled model and passed (tree oracle, pseudo rows, compaction)
    check = ht["self_check"]
    assert check["passed"] is True and [c["name"] for c in check["checks"]] == ["tree", "pseudo", "compact"], check
    # The KV layout the engine really used: vLLM's own packing (its ISA's writer, read by HT's
    # kernels) whenever the start-up probe finds an ISA that packs it the way HT reads. A CPU where
    # no ISA does shows up here as "rows" (correct, slower), not silently.
    assert ht["kv_layout"]["layout"] == "k_transposed" and ht["kv_layout"]["isa"] in ("vec", "vec16"), ht["kv_layout"]
