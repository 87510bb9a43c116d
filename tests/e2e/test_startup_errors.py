"""Bad HT setups stop before vLLM allocates anything, with a message naming the fix."""
import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from vllm_ht.checkpoint import save_checkpoint
from vllm_ht.config import ConfigError, HiddenTransferConfig
from vllm_ht.options import MAX_LOOKUP_NODES
from vllm_ht.projections import TransferProjections
from vllm_ht.vllm.engine_args import expand_namespace, ht_engine_kwargs


def _checkpoint(tmp_path: Path, **overrides) -> Path:
    cfg = HiddenTransferConfig(**{"base_model": "other", "architecture": "LlamaForCausalLM", "num_hidden_layers": 30,
                                  "hidden_size": 576, "vocab_size": 49152, **overrides})
    save_checkpoint(tmp_path / "ck", cfg, TransferProjections(cfg))
    return tmp_path / "ck"


def test_missing_checkpoint(model_dir, tmp_path):
    with pytest.raises(ConfigError, match="does not exist.*--ht-checkpoint"):
        ht_engine_kwargs(str(model_dir), checkpoint=str(tmp_path / "nope"))


def test_checkpoint_for_another_model(model_dir, tmp_path):
    with pytest.raises(ConfigError, match="hidden_size=768 but the model has hidden_size=576.*vllm-ht train"):
        ht_engine_kwargs(str(model_dir), checkpoint=str(_checkpoint(tmp_path, hidden_size=768)))
    with pytest.raises(ConfigError, match="vocab_size=32000"):
        ht_engine_kwargs(str(model_dir), checkpoint=str(_checkpoint(tmp_path, vocab_size=32000)))


def test_transfer_layer_out_of_range(model_dir, tmp_path):
    ck = _checkpoint(tmp_path)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["transfer_layers"] = [15, 15, 31]
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"transfer_layers\[2\]=31 is out of range.*1\.\.29"):
        ht_engine_kwargs(str(model_dir), checkpoint=str(ck))


def test_a_fused_input_checkpoint_is_refused_with_the_fix(model_dir, tmp_path):
    ck = _checkpoint(tmp_path, base_model="SmolLM2-135M-Instruct", fuse_layers=[5, 10])
    with pytest.raises(ConfigError, match=r"fuses the states of layers \[5, 10\].*trained without --fuse-layers"):
        ht_engine_kwargs(str(model_dir), checkpoint=str(ck))


def test_corrupt_weights(model_dir, tmp_path):
    ck = _checkpoint(tmp_path)
    (ck / "projections.safetensors").write_bytes(b"junk")
    with pytest.raises(ConfigError, match="corrupt"):
        ht_engine_kwargs(str(model_dir), checkpoint=str(ck))


def test_unsupported_architecture(model_dir, tmp_path):
    fake = tmp_path / "gpt2ish"
    fake.mkdir()
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["Qwen2ForCausalLM"], "qwen2"
    (fake / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="Qwen2ForCausalLM; Hidden Transfer in vLLM supports LlamaForCausalLM"):
        ht_engine_kwargs(str(fake))


PARALLEL_FLAGS = {
    "tp2": (["--tensor-parallel-size", "2"], ["does not divide the model's attention heads (9 query, 3 KV)",
                                              "vllm-ht prepare-model --pad-heads-for-tp 2"]),
    "ray": (["--distributed-executor-backend", "ray"], ["CPU platform does not support the Ray executor",
                                                        "drop --distributed-executor-backend"]),
}


@pytest.fixture(scope="module")
def refused(model_dir, tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Every `vllm serve` this module expects to be refused, started together (three at a time):
    each spends ~17 s of one core importing vLLM before it refuses, so on 2 cores they take about
    half the time one after the other would."""
    from concurrent.futures import ThreadPoolExecutor

    tmp = tmp_path_factory.mktemp("refused")
    exe = shutil.which("vllm", path=str(Path(sys.executable).parent))
    corrupt = _checkpoint(tmp / "corrupt", hidden_size=576)
    (corrupt / "projections.safetensors").write_bytes(b"junk")
    ht = ["--speculative-model", "hidden_transfer"]
    argvs = {
        "hidden_size": [*ht, "--ht-checkpoint", str(_checkpoint(tmp / "wide", hidden_size=768))],
        "corrupt": [*ht, "--ht-checkpoint", str(corrupt)],
        "no_method": ["--ht-checkpoint", str(_checkpoint(tmp / "plain"))],
        "pipeline": [*ht, "--pipeline-parallel-size", "2"],
        **{name: [*ht, *flags] for name, (flags, _) in PARALLEL_FLAGS.items()},
    }

    def serve(argv):
        try:
            return subprocess.run([exe, "serve", str(model_dir), *argv], capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired as e:   # fails its own test only (returncode None, the reason in stderr)
            return subprocess.CompletedProcess(e.cmd, None, "", f"vllm serve did not stop within 300 s: {e.stderr!r}")

    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(zip(argvs, pool.map(serve, argvs.values())))


def test_vllm_serve_refuses_before_starting_the_engine(refused):
    proc = refused["hidden_size"]
    assert proc.returncode != 0
    assert "vllm-ht: checkpoint hidden_size=768 but the model has hidden_size=576" in proc.stderr
    assert "EngineCore" not in proc.stderr  # stopped in the API process, nothing was allocated


def test_vllm_serve_refuses_a_corrupt_checkpoint_file(refused):
    proc = refused["corrupt"]
    assert proc.returncode != 0
    assert "vllm-ht:" in proc.stderr and "corrupt" in proc.stderr
    assert "EngineCore" not in proc.stderr


def test_ht_flags_without_the_method_are_refused(refused):
    proc = refused["no_method"]
    assert proc.returncode != 0 and "need --speculative-model hidden_transfer" in proc.stderr


def test_pipeline_parallelism_is_refused_at_startup(refused):
    proc = refused["pipeline"]
    assert proc.returncode != 0
    assert "does not support pipeline parallelism" in proc.stderr and "--pipeline-parallel-size 1" in proc.stderr
    assert "EngineCore" not in proc.stderr


@pytest.mark.parametrize("case", list(PARALLEL_FLAGS))
def test_unworkable_parallel_setups_are_refused_at_startup(refused, case):
    proc = refused[case]
    assert proc.returncode != 0
    for text in PARALLEL_FLAGS[case][1]:
        assert text in proc.stderr
    assert "EngineCore" not in proc.stderr


def test_tensor_parallel_check_offline(model_dir):
    with pytest.raises(ConfigError, match="--tensor-parallel-size 4 does not divide"):
        ht_engine_kwargs(str(model_dir), tensor_parallel_size=4)  # 9 % 4
    ht_engine_kwargs(str(model_dir), tensor_parallel_size=3)  # 9 / 3 and 3 / 3 split


def test_identity_kwargs_shape(model_dir):
    kw = ht_engine_kwargs(str(model_dir), num_nodes=4)
    assert kw["speculative_config"]["method"] == "custom_class"
    # the pseudo tree's 4 nodes + room for the lookup chain of hybrid trees
    assert kw["speculative_config"]["num_speculative_tokens"] == 4 + MAX_LOOKUP_NODES
    off = ht_engine_kwargs(str(model_dir), num_nodes=4, options={"lookup": False})
    assert off["speculative_config"]["num_speculative_tokens"] == 4
    assert kw["hf_overrides"] == {"architectures": ["HTLlamaForCausalLM"]}
    assert kw["additional_config"]["vllm_ht"]["checkpoint"] is None


def _serve_args(model_dir, extra: dict) -> argparse.Namespace:
    return argparse.Namespace(model=str(model_dir), speculative_model="hidden_transfer", ht_checkpoint=None,
                              ht_num_nodes=None, speculative_config=None, pipeline_parallel_size=1,
                              distributed_executor_backend=None, tensor_parallel_size=1, hf_overrides=None,
                              additional_config={"vllm_ht": extra})


def test_additional_config_options_survive_the_short_form(model_dir, monkeypatch):
    """`--speculative-model hidden_transfer --additional-config '{"vllm_ht": {...}}'` keeps the
    user's HT options (the README's way to set costs or the CPU cache layout)."""
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"))
    args = _serve_args(model_dir, {"cpu_cache_layout": "rows", "step_overhead": 0.5, "row_budget": 8})
    expand_namespace(args)
    ht = args.additional_config["vllm_ht"]
    assert (ht["cpu_cache_layout"], ht["step_overhead"], ht["row_budget"]) == ("rows", 0.5, 8)
    assert args.speculative_config["num_speculative_tokens"] == 7          # row_budget 8 - the root
    with pytest.raises(SystemExit, match=r"unknown Hidden Transfer option\(s\) \['row_cots'\]"):
        expand_namespace(_serve_args(model_dir, {"row_cots": 0.1}))
