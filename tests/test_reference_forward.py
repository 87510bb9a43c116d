"""HTForward on the real default model: the tree oracle, pseudo-row isolation, the mask by hand."""
import pytest
import torch

from vllm_ht.reference.forward import HTForward, StepInput
from vllm_ht.tree import TokenTree

T, F = True, False


def _prefill(engine, prompt):
    n = len(prompt)
    engine.cache.reset()
    out = engine.forward(StepInput(torch.tensor(prompt), torch.arange(n), torch.ones(n, n, dtype=torch.bool).tril(),
                                   torch.empty(0, dtype=torch.long), torch.tensor([n - 1])), engine.cache)
    engine.cache.compact(list(range(n)))
    return out


def test_mask_by_hand():
    # 2 cached tokens; real rows r0 <- r1 (chain); anchor r1 with pseudo steps 0, 1
    window = torch.tensor([[T, F], [T, T]])
    m = HTForward._mask(window, anchors=torch.tensor([1]), p_anchor=torch.tensor([0, 0]),
                        p_step=torch.tensor([0, 1]), num_cached=2)
    #                 cache    r0 r1  p0 p1
    assert m.tolist() == [[T, T, T, F, F, F],
                          [T, T, T, T, F, F],
                          [T, T, T, T, T, F],
                          [T, T, T, T, T, T]]


@pytest.fixture(scope="module")
def tree_step(engine):
    """A prefilled prompt and one tree step with pseudo rows on every node."""
    prompt = engine.encode_chat("Name three primary colours.")
    _prefill(engine, prompt)
    tree = TokenTree.from_paths([(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 1, 0)])
    tokens = torch.tensor([504, 314, 260, 1064, 28, 30, 2111, 12, 198])
    n = engine.cache.length
    step = StepInput(tokens, tree.positions(n), tree.mask, torch.arange(tree.num_nodes))
    out = engine.forward(step, engine.cache)
    engine.cache.length = n  # drop this step's rows: the fixture's steps are read-only experiments
    return prompt, tree, tokens, step, out


def test_tree_oracle(engine, tree_step):
    """Every tree row's logits equal a plain causal pass over prompt + its root-to-node path."""
    prompt, tree, tokens, _, out = tree_step
    for node in range(tree.num_nodes):
        ids = prompt + tokens[tree.path_to(node)].tolist()
        with torch.inference_mode():
            ref = engine.model(torch.tensor([ids])).logits[0, -1].float()
        torch.testing.assert_close(out.real_logits[node], ref, atol=2e-4, rtol=1e-4)
        assert out.real_logits[node].argmax() == ref.argmax()


def test_pseudo_rows_do_not_touch_real_rows(engine, tree_step):
    _, _, _, step, out = tree_step
    n = engine.cache.length
    bare = engine.forward(StepInput(step.tokens, step.positions, step.window_mask,
                                    torch.empty(0, dtype=torch.long)), engine.cache)
    engine.cache.length = n
    torch.testing.assert_close(bare.real_logits, out.real_logits, atol=1e-4, rtol=1e-4)  # fp32, other shapes
    assert torch.equal(bare.real_logits.argmax(-1), out.real_logits.argmax(-1))


def test_pseudo_groups_are_isolated(engine, tree_step):
    """Anchor 4's pseudo states do not depend on which other nodes carry pseudo rows."""
    _, _, _, step, out = tree_step
    n = engine.cache.length
    alone = engine.forward(StepInput(step.tokens, step.positions, step.window_mask, torch.tensor([4])),
                           engine.cache)
    engine.cache.length = n
    torch.testing.assert_close(alone.pseudo_hidden[0], out.pseudo_hidden[4], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(out.pseudo_hidden[4], out.pseudo_hidden[5])
