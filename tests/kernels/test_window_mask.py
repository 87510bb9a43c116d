"""pack_window_mask / unpack_window_mask: the docstring examples, round trips, sign bit."""
import pytest
import torch

from vllm_ht.kernels.window_mask import num_mask_words, pack_window_mask, unpack_window_mask

T, F = True, False


def test_docstring_examples():
    tree = torch.tensor([[T, F, F], [T, T, F], [T, F, T]])
    assert torch.equal(pack_window_mask(tree), torch.tensor([[1], [3], [5]], dtype=torch.int32))
    assert torch.equal(pack_window_mask(torch.tensor([[T, F, T], [F, F, F]])),
                       torch.tensor([[5], [0]], dtype=torch.int32))
    assert torch.equal(pack_window_mask(torch.ones(1, 33, dtype=torch.bool)),
                       torch.tensor([[-1, 1]], dtype=torch.int32))
    bit31 = torch.zeros(1, 32, dtype=torch.bool)
    bit31[0, 31] = True
    assert torch.equal(pack_window_mask(bit31), torch.tensor([[-2**31]], dtype=torch.int32))
    assert torch.equal(unpack_window_mask(torch.tensor([[5], [0]], dtype=torch.int32), 3),
                       torch.tensor([[T, F, T], [F, F, F]]))


@pytest.mark.parametrize("width", [1, 31, 32, 33, 64, 70])
def test_round_trip(width):
    mask = torch.rand(7, width, generator=torch.Generator().manual_seed(width)) < 0.5
    bits = pack_window_mask(mask)
    assert bits.shape == (7, num_mask_words(width)) and bits.dtype == torch.int32
    assert torch.equal(unpack_window_mask(bits, width), mask)


def test_num_mask_words():
    assert [num_mask_words(w) for w in (0, 1, 32, 33, 64, 65)] == [0, 1, 1, 2, 2, 3]


def test_errors():
    with pytest.raises(ValueError, match="bool"):
        pack_window_mask(torch.ones(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="int32"):
        unpack_window_mask(torch.ones(2, 1, dtype=torch.int64), 3)
    with pytest.raises(ValueError, match="words"):
        unpack_window_mask(torch.ones(2, 1, dtype=torch.int32), 33)
