"""Fused projection input (config.fuse_layers): e = W_s h^l + sum_f U_{s,f} h^f, trained and
evaluated offline; serving refuses such a checkpoint with the fix."""

import pytest
import torch

from vllm_ht.backbone import Backbone
from vllm_ht.checkpoint import load_checkpoint
from vllm_ht.config import ConfigError, HiddenTransferConfig
from vllm_ht.projections import TransferProjections
from vllm_ht.training.data import collate, load_sequences
from vllm_ht.training.passes import real_pass
from vllm_ht.training.real_cache import RealPassCache
from vllm_ht.training.train import TrainConfig, Trainer


def _cfg(**kw):
    return HiddenTransferConfig(base_model="t", architecture="LlamaForCausalLM", num_hidden_layers=4,
                                hidden_size=8, vocab_size=16, num_steps=2, transfer_layers=[3, 3], **kw)


def test_fused_layers_must_lie_below_every_transfer_layer():
    assert _cfg(fuse_layers=[0, 2]).fuse_layers == [0, 2]
    for bad in ([3], [1, 1], [-1]):
        with pytest.raises(ConfigError, match="fuse_layers"):
            _cfg(fuse_layers=bad)
    cfg = _cfg(fuse_layers=[1])
    assert HiddenTransferConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match=r"layers \[1\].*without --fuse-layers"):
        cfg.check_servable()
    _cfg().check_servable()                                   # an unfused checkpoint serves


def test_fused_step_adds_the_mapped_lower_states():
    proj = TransferProjections(_cfg(fuse_layers=[1, 2]))
    h, f1, f2 = torch.randn(3, 5, 8).unbind(0)
    for s in range(2):                                        # zero-initialised: the unfused map
        assert torch.equal(proj.step(h, s, [f1, f2]), h)
    with torch.no_grad():
        proj.fuse_weight.normal_()
    for s in range(2):
        want = h @ proj.weight[s].T + f1 @ proj.fuse_weight[s, 0].T + f2 @ proj.fuse_weight[s, 1].T
        torch.testing.assert_close(proj.step(h, s, [f1, f2]), want)
    with pytest.raises(ValueError, match="1 fused inputs given; the projections take 2"):
        proj.step(h, 0, [f1])
    with pytest.raises(ValueError, match="fused inputs"):
        proj(h)


def test_real_pass_keeps_the_fused_layers_states(tiny_model, tiny_data):
    cfg = HiddenTransferConfig.for_model(tiny_model.config, num_steps=2, transfer_layers=[3, 3], fuse_layers=[0, 1])
    batch = collate(load_sequences(tiny_data, max_len=64)[:3])
    real = real_pass(Backbone(tiny_model), batch.ids, cfg)
    want = tiny_model(batch.ids, output_hidden_states=True).hidden_states      # [0] = embeddings
    for layer in (0, 1, 3):
        torch.testing.assert_close(real.hidden[layer], want[layer])


def _trainer(tiny_model, tiny_data, out, **kw):
    cfg = TrainConfig(model="tiny", data=str(tiny_data), out=str(out), num_steps=2, transfer_layers=[3, 3],
                      fuse_layers=[1], steps=3, batch_size=4, anchors=5, max_len=64, warmup=1, save_every=3,
                      save_dtype="float32", **kw)
    return Trainer(cfg, model=tiny_model)


def test_fused_training_learns_the_fused_map_and_exports_it(tiny_model, tiny_data, tmp_path):
    trainer = _trainer(tiny_model, tiny_data, tmp_path / "run")
    trainer.run(progress=False)
    assert trainer.projections.fuse_weight.abs().sum() > 0    # the zero-initialised map moved
    cfg, proj = load_checkpoint(tmp_path / "run")
    assert cfg.fuse_layers == [1]
    assert torch.equal(proj.fuse_weight, trainer.projections.fuse_weight.detach())


def test_fused_training_with_the_real_cache_equals_without(tiny_model, tiny_data, tmp_path):
    plain = _trainer(tiny_model, tiny_data, tmp_path / "plain")
    plain.run(progress=False)
    cached = _trainer(tiny_model, tiny_data, tmp_path / "cached", real_cache=str(tmp_path / "cache"),
                      real_cache_dtype="float32")
    cached.run(progress=False)
    assert cached.real_cache.layers == [1, 3]                 # the fused layer's states are on disk too
    torch.testing.assert_close(cached.projections.fuse_weight, plain.projections.fuse_weight, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="another setup"):   # an unfused cache is not reused for it
        RealPassCache(tmp_path / "cache", Backbone(tiny_model),
                      HiddenTransferConfig.for_model(tiny_model.config, num_steps=2, transfer_layers=[3, 3]))


def test_resuming_a_run_with_other_projections_names_the_fix(tiny_model, tiny_data, tmp_path):
    _trainer(tiny_model, tiny_data, tmp_path / "run").run(progress=False)     # fused [1], saved at step 3
    other = _trainer(tiny_model, tiny_data, tmp_path / "run")
    other.cfg.fuse_layers = [0, 1]
    with pytest.raises(ValueError, match=r"fuse_layers.*another --out"):
        other.load_state()
