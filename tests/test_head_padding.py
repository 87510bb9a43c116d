"""Head padding for tensor parallelism (an exactly equivalent model) and the CPU worker binding."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from vllm_ht.config import ConfigError
from vllm_ht.head_padding import PADDED_MARKER, pad_heads, padded_head_counts, splits_heads
from vllm_ht.vllm.env import _parse_id_list, split_cores, world_size_from_argv


@pytest.mark.parametrize("heads, kv, tp, want", [(9, 3, 2, (12, 4)), (9, 3, 3, (9, 3)), (32, 8, 4, (32, 8)),
                                                  (9, 3, 4, (12, 4)), (6, 6, 4, (8, 8)), (9, 3, 1, (9, 3)),
                                                  (8, 1, 8, (8, 1)), (12, 3, 6, (12, 3)), (12, 3, 8, (32, 8))])
def test_padded_head_counts(heads, kv, tp, want):
    got = padded_head_counts(heads, kv, tp)
    assert got == want
    assert splits_heads(*got, tp) and got[0] // got[1] == heads // kv


@pytest.mark.parametrize("heads, kv, tp, ok", [(9, 3, 3, True), (9, 3, 2, False), (24, 3, 6, True),
                                                (12, 3, 4, False), (8, 1, 8, True), (8, 2, 4, True),
                                                (12, 4, 8, False)])
def test_splits_heads_is_vllms_rule(heads, kv, tp, ok):
    """vLLM: tp | heads, and tp | kv when kv >= tp, else kv | tp (KV heads replicated)."""
    assert splits_heads(heads, kv, tp) is ok


@pytest.mark.parametrize("heads, kv, tp", [(9, 4, 2), (9, 3, 0)])
def test_padded_head_counts_refuses(heads, kv, tp):
    with pytest.raises(ConfigError):
        padded_head_counts(heads, kv, tp)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=3, num_key_value_heads=1, head_dim=16, max_position_embeddings=128,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    for p in model.parameters():  # well away from zero, so a wrongly placed pad would show
        p.data.normal_(0, 0.3)
    out = tmp_path_factory.mktemp("tiny") / "model"
    model.save_pretrained(out)
    return out


def test_padded_model_computes_the_same_logits(tiny_dir, tmp_path):
    padded = pad_heads(tiny_dir, tmp_path / "tp2", 2, progress=False)
    cfg = json.loads((padded / "config.json").read_text())
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (6, 2, 16)
    assert (padded / PADDED_MARKER).is_file()
    ids = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)(ids).logits
        got = AutoModelForCausalLM.from_pretrained(padded, dtype=torch.float32)(ids).logits
    assert want.abs().mean() > 0.1
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_pad_heads_is_idempotent_and_rebuilds_stale_copies(tiny_dir, tmp_path):
    first = pad_heads(tiny_dir, tmp_path / "tp2", 2, progress=False)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert pad_heads(tiny_dir, tmp_path / "tp2", 2, progress=False) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    (first / PADDED_MARKER).write_text("made by an older version")
    pad_heads(tiny_dir, tmp_path / "tp2", 2, progress=False)
    assert (first / "model.safetensors").stat().st_mtime_ns != stamp


@pytest.mark.parametrize("config, says", [({"model_type": "gpt2"}, "Llama-family"),
                                          ({"model_type": "llama", "attention_bias": True}, "attention biases")])
def test_pad_heads_refuses_what_it_cannot_pad(tmp_path, config, says):
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=says):
        pad_heads(other, tmp_path / "other-tp2", 2, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]   # nothing half-written left


def test_split_cores():
    assert split_cores([0, 1], 2) == "0|1"
    assert split_cores([0, 1, 2, 3, 4], 2) == "0,1|2,3"
    assert split_cores([4, 5, 6, 7], 4) == "4|5|6|7"
    assert split_cores([0], 2) is None


def test_parse_id_list():
    assert _parse_id_list("0-2,5") == [0, 1, 2, 5]
    assert _parse_id_list("0") == [0]


def test_world_size_from_argv():
    assert world_size_from_argv(["serve", "m", "--tensor-parallel-size", "2"]) == 2
    assert world_size_from_argv(["serve", "m", "-tp=2", "-pp", "2"]) == 4
    assert world_size_from_argv(["serve", "m", "--port", "8000"]) == 1
    assert world_size_from_argv(["serve", "m", "--tensor_parallel_size", "2"]) == 2
