import json

import pytest
import torch
from safetensors.torch import save_file

from vllm_ht.checkpoint import WEIGHTS_FILE, load_checkpoint, save_checkpoint
from vllm_ht.config import ConfigError, HiddenTransferConfig
from vllm_ht.projections import TransferProjections

SMOL = dict(base_model="smol", architecture="LlamaForCausalLM", num_hidden_layers=30,
            hidden_size=576, vocab_size=49152)


class FakeHFConfig:  # the attributes check_model reads from a transformers PretrainedConfig
    def __init__(self, **kw):
        self.architectures = ["LlamaForCausalLM"]
        self.hidden_size, self.vocab_size, self.num_hidden_layers = 576, 49152, 30
        self.__dict__.update(kw)


def test_defaults_and_roundtrip(tmp_path):
    cfg = HiddenTransferConfig(**SMOL, tree_templates={2: [[0], [1]]})
    assert cfg.transfer_layers == [15, 15, 15]
    cfg.save(tmp_path)
    again = HiddenTransferConfig.load(tmp_path)
    assert again == cfg


@pytest.mark.parametrize("layers,needle", [([0, 15, 15], "transfer_layers[0]=0 is out of range"),
                                           ([15, 15, 30], "transfer_layers[2]=30 is out of range"),
                                           ([15, 15], "give one transfer layer per step")])
def test_transfer_layer_errors(layers, needle):
    with pytest.raises(ConfigError, match=__import__("re").escape(needle)) as e:
        HiddenTransferConfig(**SMOL, transfer_layers=layers)
    assert "1..29" in str(e.value) or "per step" in str(e.value)


def test_unsupported_architecture():
    with pytest.raises(ConfigError, match="GPT2LMHeadModel.*not supported.*Llama"):
        HiddenTransferConfig(**{**SMOL, "architecture": "GPT2LMHeadModel"})


@pytest.mark.parametrize("field,value", [("hidden_size", 768), ("vocab_size", 32000), ("num_hidden_layers", 24)])
def test_model_mismatch_names_field_and_fix(field, value):
    cfg = HiddenTransferConfig(**SMOL)
    with pytest.raises(ConfigError, match=f"{field}=.*{field}={value}.*vllm-ht train"):
        cfg.check_model(FakeHFConfig(**{field: value}))


def test_model_with_unsupported_architecture():
    cfg = HiddenTransferConfig(**SMOL)
    with pytest.raises(ConfigError, match="Gemma3ForCausalLM is not supported"):
        cfg.check_model(FakeHFConfig(architectures=["Gemma3ForCausalLM"]))


def test_bad_template_rejected():
    with pytest.raises(ConfigError, match="tree_templates\\[3\\] has 2 paths"):
        HiddenTransferConfig(**SMOL, tree_templates={3: [[0], [1]]})
    with pytest.raises(ConfigError, match="deeper than num_steps"):
        HiddenTransferConfig(**SMOL, num_steps=2, tree_templates={3: [[0], [0, 0], [0, 0, 0]]})


def test_checkpoint_roundtrip_and_dtype(tmp_path):
    cfg = HiddenTransferConfig(**SMOL, bias=True, dtype="bfloat16")
    proj = TransferProjections(cfg)
    with torch.no_grad():
        proj.weight.add_(torch.randn_like(proj.weight) * 0.01)
    save_checkpoint(tmp_path, cfg, proj)
    cfg2, proj2 = load_checkpoint(tmp_path)
    assert cfg2 == cfg and proj2.bias is not None
    torch.testing.assert_close(proj2.weight, proj.weight.detach().to(torch.bfloat16).float())


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist.*--ht-checkpoint"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(ConfigError, match="config.json is missing"):
        load_checkpoint(tmp_path)
    HiddenTransferConfig(**SMOL).save(tmp_path)
    with pytest.raises(ConfigError, match=f"{WEIGHTS_FILE} is missing"):
        load_checkpoint(tmp_path)


def test_corrupt_files(tmp_path):
    cfg = HiddenTransferConfig(**SMOL, num_steps=2)
    save_checkpoint(tmp_path, cfg, TransferProjections(cfg))
    (tmp_path / WEIGHTS_FILE).write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ConfigError, match="corrupt"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json is corrupt"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**SMOL, "colour": "red"}))
    with pytest.raises(ConfigError, match="unknown config fields \\['colour'\\]"):
        load_checkpoint(tmp_path)


def test_weights_that_do_not_match_config(tmp_path):
    cfg = HiddenTransferConfig(**SMOL, num_steps=2)
    cfg.save(tmp_path)
    save_file({"weight": torch.zeros(2, 64, 64)}, str(tmp_path / WEIGHTS_FILE))
    with pytest.raises(ConfigError, match="do not belong together"):
        load_checkpoint(tmp_path)


def test_joins_group_steps_by_transfer_layer():
    assert HiddenTransferConfig(**SMOL, transfer_layers=[15, 15, 20]).joins == {15: [0, 1], 20: [2]}
