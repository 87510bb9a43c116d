"""vLLM's default mode (compiled) with HT is lossless too: with a forced tree, greedy fp32 tokens
equal compiled plain vLLM's. Steps without pseudo rows run vLLM's compiled graph; steps with pseudo
rows run the layers eagerly with vLLM's CPU kernels swapped in (HTLlamaForCausalLM._cpu_kernels),
so both kinds of step, and the swap, are exercised. (The eager suites cover the rest.)"""
from e2e_helpers import run_engine, trained_checkpoint

N, TOKENS = 10, 48
ARGS = ["--limit", str(N), "--max-tokens", str(TOKENS), "--ignore-eos", "--batch-sizes", "1"]


def test_compiled_ht_identical_to_compiled_plain(model_dir, tmp_path):
    plain = run_engine(model_dir, tmp_path / "plain.json", *ARGS, eager=False)
    ht = run_engine(model_dir, tmp_path / "ht.json", "--method", "ht", "--checkpoint", str(trained_checkpoint()),
                    "--num-nodes", "8", "--pseudo-nodes", "3", *ARGS, eager=False)
    got, want = ht["runs"]["1"]["outputs"], plain["runs"]["1"]["outputs"]
    assert len(got) == len(want) == N and all(len(o) == TOKENS for o in got)
    mismatched = [i for i, (a, b) in enumerate(zip(got, want)) if a != b]
    assert not mismatched, f"prompts {mismatched} differ from compiled plain vLLM"
    tau = ht["runs"]["1"]["mean_accepted_length"]
    assert tau is not None and tau > 1.3, f"tau {tau}: trees were not really verified"
