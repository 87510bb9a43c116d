"""The real-pass disk cache (training/real_cache.py) on a tiny random Llama: a cached step gives the
uncached loss and gradients, the files are really what a cached step reads, and a cache made for
another setup is refused."""

import pytest
import torch

from vllm_ht.backbone import Backbone
from vllm_ht.config import HiddenTransferConfig
from vllm_ht.projections import TransferProjections
from vllm_ht.training.data import batch_for_step, collate, load_sequences, sample_anchors
from vllm_ht.training.loss import distill_loss
from vllm_ht.training.passes import pseudo_pass, real_pass, targets_valid
from vllm_ht.training.real_cache import RealPassCache
from vllm_ht.training.train import TrainConfig, Trainer

K = 2


def _config(model, layers=(1, 2)):
    return HiddenTransferConfig.for_model(model.config, base_model="tiny", num_steps=K, transfer_layers=list(layers))


def _loss(bb, config, proj, real, batch):
    anchors = sample_anchors(batch, 5, K, torch.Generator().manual_seed(0))
    valid = targets_valid(anchors, batch.lengths, K)
    tpos = (anchors[:, :, None] + torch.arange(K) + 1).clamp(max=batch.ids.shape[1] - 1)
    teacher = real.final[torch.arange(anchors.shape[0])[:, None, None], tpos]
    out = distill_loss(bb, pseudo_pass(bb, proj, config, real, anchors), teacher, valid)
    proj.zero_grad()
    out.loss.backward()
    return float(out.loss.detach()), proj.weight.grad.clone()


def test_a_cached_step_gives_the_uncached_loss_and_gradients(tiny_model, tiny_data, tmp_path):
    bb, config = Backbone(tiny_model), _config(tiny_model)
    seqs = load_sequences(tiny_data, max_len=64)
    cache = RealPassCache(tmp_path / "cache", bb, config, dtype="float32")
    for i in range(0, len(seqs), 5):                          # filled in batches of another make-up
        cache.real_pass(collate(seqs[i : i + 5]))
    assert cache.misses == len(seqs) and cache.hits == 0
    batch = collate([seqs[i] for i in (7, 2, 11, 4)])        # other order, other padding
    proj = TransferProjections(config)
    with torch.no_grad():
        proj.weight.add_(0.05 * torch.randn(proj.weight.shape, generator=torch.Generator().manual_seed(2)))
    want = _loss(bb, config, proj, real_pass(bb, batch.ids, config), batch)
    got = _loss(bb, config, proj, cache.real_pass(batch), batch)
    assert cache.hits == 4 and cache.misses == len(seqs)     # read from the files, nothing recomputed
    assert got[0] == pytest.approx(want[0], rel=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-6)
    # the files are what a cached step reads: spoil one sequence's teacher states and the loss moves
    f = cache._file(seqs[2].ids)
    item = torch.load(f, weights_only=True)
    item["final"] = torch.zeros_like(item["final"])
    torch.save(item, f)
    assert _loss(bb, config, proj, cache.real_pass(batch), batch)[0] != pytest.approx(want[0], rel=1e-3)


def test_training_with_the_cache_equals_training_without(tiny_model, tiny_data, tmp_path):
    """Three epochs: the first fills the cache, the next two read it; the weights match an uncached run."""
    def run(out, cache):
        cfg = TrainConfig(model="tiny", data=str(tiny_data), out=str(out), num_steps=K, transfer_layers=[2, 2],
                          steps=9, batch_size=4, anchors=5, max_len=64, warmup=2, save_every=100,
                          real_cache=cache, real_cache_dtype="float32")
        t = Trainer(cfg, model=tiny_model)
        t.run(progress=False)
        return t

    plain, cached = run(tmp_path / "a", None), run(tmp_path / "b", str(tmp_path / "cache"))
    assert cached.real_cache.misses == 12 and cached.real_cache.hits == 24
    torch.testing.assert_close(cached.projections.weight, plain.projections.weight, rtol=1e-4, atol=1e-6)
    assert not torch.equal(plain.projections.weight, TransferProjections(plain.ht_config).weight)  # it learned


def test_a_cache_for_another_setup_is_refused(tiny_model, tmp_path):
    bb = Backbone(tiny_model)
    RealPassCache(tmp_path / "c", bb, _config(tiny_model, (1, 2)), dtype="bfloat16")
    with pytest.raises(ValueError, match="another setup.*transfer_layers.*another --real-cache folder"):
        RealPassCache(tmp_path / "c", bb, _config(tiny_model, (2, 2)), dtype="bfloat16")
    with pytest.raises(ValueError, match="dtype"):
        RealPassCache(tmp_path / "c", bb, _config(tiny_model, (1, 2)), dtype="float32")


def test_bf16_storage_a_step_reads_the_same_values_whatever_the_cache_held(tiny_model, tiny_data, tmp_path):
    """bf16 storage rounds: the step that fills the cache must read the rounded values too (else a
    resumed run would differ from an uninterrupted one), also in a batch only partly cached."""
    bb, config = Backbone(tiny_model), _config(tiny_model)
    seqs = load_sequences(tiny_data, max_len=64)
    batch = batch_for_step(seqs, 0, 4, seed=0)
    proj = TransferProjections(config)
    want = _loss(bb, config, proj, real_pass(bb, batch.ids, config), batch)[0]
    partly = RealPassCache(tmp_path / "partly", bb, config, dtype="bfloat16")
    partly.real_pass(collate([seqs[i] for i in range(len(seqs)) if i % 2]))    # half of them, say
    cache = RealPassCache(tmp_path / "c16", bb, config, dtype="bfloat16")
    losses = [_loss(bb, config, proj, c.real_pass(batch), batch)[0] for c in (cache, cache, partly)]
    assert cache.misses == 4 and cache.hits == 4 and 0 < partly.hits < 4
    assert losses[0] == losses[1] == losses[2]
    assert losses[0] == pytest.approx(want, rel=2e-2) and losses[0] != want
