"""The two GPU-only hazards, reached through vLLM's CPU build (tests/e2e/padded_worker.py):

  padding     vLLM's GPU runner pads token counts to CUDA-graph capture sizes; the padded input
              rows must never be read as real rows, and pseudo rows go after them (the padded
              attention metadata of full graphs, which HT declines, is covered by a unit test in
              tests/test_gpu_path.py);
  positions   tree positions (root + depth) must be written into the runner's persistent
              positions buffer, which captured graphs read, never into a copy.

With every batch padded to a multiple of 8 by vLLM's own padding path, HT's fp32 greedy tokens
equal plain vLLM's, trees are verified, and every forward passed the persistent-buffer check."""
from pathlib import Path

from e2e_helpers import plain_greedy, run_engine, trained_checkpoint

N, TOKENS = 5, 32
ARGS = ["--limit", str(N), "--max-tokens", str(TOKENS), "--ignore-eos", "--batch-sizes", "1,8"]


def test_padded_batches_stay_lossless_and_positions_stay_in_the_persistent_buffer(model_dir, tmp_path, monkeypatch,
                                                                                  plain_reference):
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))       # the engine process imports the test worker
    plain = plain_greedy(plain_reference, N, TOKENS)
    ht = run_engine(model_dir, tmp_path / "ht.json", "--method", "ht", "--checkpoint", str(trained_checkpoint()),
                    "--num-nodes", "8", "--pseudo-nodes", "3", "--worker-cls", "padded_worker.PaddedHTWorker", *ARGS)
    # lookup chains only (no pseudo rows): trees whose steps keep vLLM's buffers (and, on GPU, its graphs)
    chains = run_engine(model_dir, tmp_path / "chains.json", "--method", "ht", "--checkpoint",
                        str(trained_checkpoint()), "--ht-options", '{"pseudo": false, "lookup_nodes": 4}',
                        "--worker-cls", "padded_worker.PaddedHTWorker", *ARGS)
    for bs in ("1", "8"):
        for name, engine, kind, buffer in (("pseudo rows", ht, "tree+pseudo", "positions: HT's buffer"),
                                           ("lookup chains", chains, "tree", "positions: vLLM's buffer")):
            run = engine["runs"][bs]
            assert run["outputs"] == plain, f"{name}, batch {bs}: padded HT differs from plain"
            kinds = run["step_kinds"]
            assert kinds.get("padded", 0) > 0 and kinds.get(kind, 0) > 0, (name, kinds)   # padded, trees verified
            assert kinds.get(buffer, 0) > 0, (name, kinds)           # every forward passed the buffer check
            assert run["num_accepted"] > 0, (name, run["num_accepted"])
