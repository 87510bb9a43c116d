import torch

from vllm_ht.config import HiddenTransferConfig
from vllm_ht.projections import TransferProjections


def _cfg(**kw):
    return HiddenTransferConfig(base_model="t", architecture="LlamaForCausalLM", num_hidden_layers=4,
                                hidden_size=8, vocab_size=16, num_steps=3, **kw)


def test_identity_init():
    proj = TransferProjections(_cfg())
    h = torch.randn(5, 8)
    assert torch.equal(proj(h), h[:, None].expand(5, 3, 8))
    for s in range(3):
        assert torch.equal(proj.step(h, s), h)


def test_step_matches_batched_forward_with_bias():
    proj = TransferProjections(_cfg(bias=True))
    with torch.no_grad():
        proj.weight.normal_()
        proj.bias.normal_()
    h = torch.randn(5, 8)
    out = proj(h)
    for s in range(3):
        torch.testing.assert_close(out[:, s], proj.step(h, s))
        torch.testing.assert_close(out[:, s], h @ proj.weight[s].T + proj.bias[s])
