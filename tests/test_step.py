"""The HT step without an engine: HTStep / pseudo-row layout against step.py's worked example, the
transfer op, the runner's scheduled tree under scheduler cuts, its persistent input buffers with
padding, KV compaction moves, the sampling hook's hold on seeded generators (against a stand-in
for vLLM's sampler) and the custom logits processor check."""
from types import SimpleNamespace

import pytest
import torch

from vllm_ht.kernels import unpack_window_mask
from vllm_ht.kernels.cache_layout import ROWS, read_slots
from vllm_ht import hybrid
from vllm_ht.tree import TokenTree
from vllm_ht.vllm import transfer
from vllm_ht.vllm.runner import HTRunnerMixin, StepState
from vllm_ht.vllm.step import HTStep

T, F = True, False
SMALL_TREE = TokenTree.from_paths([[0], [1]])     # root + (0,) + (1,)


def worked_example(start: int = 4, joins=None) -> HTStep:
    step = HTStep.build([3, 1], {0: SMALL_TREE})
    positions = torch.tensor([10, 11, 11, 20])      # tree rows at root + depth; the decode row at 20
    step.add_pseudo_rows({0: [0, 1, 2], 1: [0]}, depth=2, start=start, positions=positions,
                         joins=joins or {5: [0, 1, 2]})
    return step


def test_real_window_mask_is_the_worked_example():
    step = worked_example()
    assert step.real_visible.tolist() == [[T, F, F], [T, T, F], [T, F, T], [T, F, F]]


def test_pseudo_layout_is_the_worked_example():
    p = worked_example().pseudo
    assert p.num_rows == 8 and p.start == 4
    assert p.anchors.tolist() == [0, 1, 2, 3] and p.anchor_seq.tolist() == [0, 0, 0, 1]
    assert p.query_start_loc.tolist() == [0, 6, 8]
    assert p.window_rows.tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 9, 3, 10, 11]
    assert p.window_start_loc.tolist() == [0, 9, 12]
    # anchor position + s + 1, anchor-major
    assert p.positions.tolist() == [11, 12, 12, 13, 12, 13, 21, 22]
    mask = unpack_window_mask(p.masks[5], 9)
    assert mask[3].tolist() == [T, T, F, F, F, T, T, F, F]          # pseudo row (a=1, s=1)
    assert mask[2].tolist() == [T, T, F, F, F, T, F, F, F]          # (a=1, s=0): its own step 0 only
    assert mask[6, :3].tolist() == [T, T, F]                        # request 1: row 3, then its steps 0, 1
    assert mask[7, :3].tolist() == [T, T, T]                        # decode anchor: itself + its group


def test_joint_mask_gives_real_rows_their_own_window_and_no_pseudo_key():
    p = worked_example().pseudo
    joint = unpack_window_mask(p.joint_masks[5], 9)
    assert joint[:3].tolist() == [[T, F, F] + [F] * 6, [T, T, F] + [F] * 6, [T, F, T] + [F] * 6]
    assert torch.equal(joint[3:9], unpack_window_mask(p.masks[5], 9)[:6])      # request 0's pseudo rows
    assert joint[9, :3].tolist() == [T, F, F]                                # request 1's real row


def test_steps_joining_later_are_invisible_until_they_join():
    p = worked_example(joins={5: [0], 8: [1, 2]}).pseudo
    assert p.group_for_layer(4) is None and p.group_for_layer(6) == 5 and p.group_for_layer(9) == 8
    early, late = unpack_window_mask(p.masks[5], 9), unpack_window_mask(p.masks[8], 9)
    assert early[1].tolist() == [T, F, F, T, F, F, F, F, F]          # (a=0, s=1) sees step 0 only
    assert late[1].tolist() == [T, F, F, T, T, F, F, F, F]
    assert p.joins == {5: [0], 8: [1]}                                 # step 2 is beyond depth 2


def test_padding_rows_stay_before_the_pseudo_rows():
    p = worked_example(start=6).pseudo                  # two padding rows (4, 5) after the real rows
    assert p.window_rows.tolist() == [0, 1, 2, 6, 7, 8, 9, 10, 11, 3, 12, 13]
    hidden = torch.arange(14.0)[:, None].repeat(1, 3)
    assert worked_example(start=6).pseudo_hidden(hidden)[:, :, 0].tolist() == [[6, 7], [8, 9], [10, 11], [12, 13]]


def test_transfer_op_writes_projected_anchors_and_zero_residual(monkeypatch):
    step = worked_example(start=4)
    monkeypatch.setattr(transfer, "current_step", lambda: step)
    gen = torch.Generator().manual_seed(0)
    d = 6
    hidden, residual = torch.randn(12, d, generator=gen), torch.randn(12, d, generator=gen)
    weight, bias = torch.randn(3, d, d, generator=gen), torch.randn(3, d, generator=gen)
    h0, r0 = hidden.clone(), residual.clone()
    hidden, residual = transfer.ht_transfer(hidden, residual, weight, bias, 5, [0, 1, 2])
    stream = h0[:4] + r0[:4]
    for a in range(4):
        for s in range(2):
            row = 4 + 2 * a + s
            torch.testing.assert_close(hidden[row], stream[a] @ weight[s].T + bias[s])
            assert torch.all(residual[row] == 0)
    assert torch.equal(hidden[:4], h0[:4]) and torch.equal(residual[:4], r0[:4])   # real rows untouched
    same, _ = transfer.ht_transfer(hidden, residual, weight, bias, 7, [])           # no step joins here
    assert torch.equal(same, hidden) and same.data_ptr() != hidden.data_ptr()     # outputs never alias inputs


def _runner(**attrs):
    return SimpleNamespace(**attrs)


def test_scheduled_tree_follows_scheduler_cuts():
    tree = TokenTree.from_paths([[0], [1], [0, 0]])
    draft = hybrid.merge(tree, [7, 8, 9], [0, 1, 3], [7, 5, 2], lookup_anchor=True)   # lookup nodes 1, 4, 5
    assert draft.tokens == (7, 8, 9, 5, 2) and draft.lookup_nodes == (1, 4, 5) and draft.anchors == (0, 1, 3, 5)
    fake = _runner(ht_trees={"r": draft}, ht=StepState(sched=None))
    assert HTRunnerMixin._scheduled_tree(fake, 0, "r", [7, 8, 9, 5, 2]) == (draft.tree, [0, 1, 3, 5])
    assert fake.ht.drafts[0] == draft
    cut_tree, anchors = HTRunnerMixin._scheduled_tree(fake, 0, "r", [7, 8])       # nodes 3.. were cut
    assert cut_tree == tree.prefix(3) and anchors == [0, 1]
    assert fake.ht.drafts[0].lookup_nodes == (1,) and fake.ht.drafts[0].sources == (0, 3, 1)
    chain, anchors = HTRunnerMixin._scheduled_tree(fake, 1, "r", [7, 5])        # not what we proposed
    assert chain.paths == ((0,), (0, 0)) and anchors is None and 1 not in fake.ht.drafts
    assert HTRunnerMixin._scheduled_tree(fake, 2, "other", [1])[0].paths == ((0,),)


def test_pseudo_inputs_live_in_persistent_buffers():
    fake = _runner(_ht_ids=torch.zeros(0, dtype=torch.int32), _ht_pos=torch.zeros(0, dtype=torch.int64),
                   model_config=SimpleNamespace(max_model_len=22))
    step = worked_example(start=4)
    ids, pos = HTRunnerMixin._with_pseudo_rows(fake, torch.tensor([5, 6, 7, 8], dtype=torch.int32),
                                               torch.tensor([10, 11, 11, 20]), step.pseudo)
    assert ids.tolist() == [5, 6, 7, 8] + [0] * 8
    assert pos.tolist() == [10, 11, 11, 20, 11, 12, 12, 13, 12, 13, 21, 21]     # clamped to max_model_len - 1
    storage = fake._ht_pos.data_ptr()
    _, pos2 = HTRunnerMixin._with_pseudo_rows(fake, torch.tensor([1, 2, 3, 4], dtype=torch.int32),
                                              torch.tensor([1, 2, 2, 3]), step.pseudo)
    assert pos2.data_ptr() == storage                          # written in place, not reallocated


def test_compaction_moves_accepted_nodes_next_to_the_root():
    block, heads, dim = 4, 1, 2
    caches = [torch.arange(3 * block * 2 * dim, dtype=torch.float32).view(3, heads, block, 2 * dim) for _ in range(2)]
    originals = [c.clone() for c in caches]
    block_table = torch.tensor([[0, 1], [2, 0]], dtype=torch.int32)
    tree = TokenTree.from_paths([[0], [1], [1, 0]])             # accepted root -> node 2 -> node 3
    step = HTStep.build([4, 1], {0: tree})
    fake = _runner(kv_caches=caches, input_batch=SimpleNamespace(num_computed_tokens_cpu=[3, 6]),
                   ht=StepState(sched=None, step=step, accepted={0: [0, 2, 3], 1: [0]}, block_table=block_table,
                                cache_layout=ROWS))
    fake._ht_context_positions = lambda s: HTRunnerMixin._ht_context_positions(fake, s)
    HTRunnerMixin._compact(fake, step)
    slot = lambda pos: int(block_table[0, pos // block]) * block + pos % block      # noqa: E731
    for cache, orig in zip(caches, originals):
        # context 3: node 2 (position 5) -> 4, node 3 (position 6) -> 5; the root at 3 stays
        assert torch.equal(read_slots(cache, torch.tensor([slot(4), slot(5)]), ROWS),
                           read_slots(orig, torch.tensor([slot(5), slot(6)]), ROWS))
        assert torch.equal(read_slots(cache, torch.tensor([slot(3)]), ROWS), read_slots(orig, torch.tensor([slot(3)]), ROWS))
        assert torch.equal(cache[2], orig[2])                   # request 1 (no tree) untouched


@pytest.mark.parametrize("depth", [1, 3])
def test_only_the_rows_the_next_tree_reads(depth):
    step = HTStep.build([1], {})
    step.add_pseudo_rows({0: [0]}, depth=depth, start=1, positions=torch.tensor([7]), joins={3: [0, 1, 2]})
    assert step.pseudo.num_rows == depth and step.pseudo.positions.tolist() == list(range(8, 8 + depth))


class _StockSampler:
    """Stands in for vLLM's `_sample`: greedy tokens, and one draw from every generator it sees
    (vLLM's draws per request and per draft row)."""
    def _sample(self, logits, spec_decode_metadata):
        self.seen = dict(self.input_batch.generators)
        for gen in self.seen.values():
            torch.rand(3, generator=gen)
        return SimpleNamespace(sampled_token_ids=logits.argmax(-1, keepdim=True))


class _Runner(HTRunnerMixin, _StockSampler):
    pass


def _runner_with(untreed: set[int], seeds: dict[int, int]):
    """Two requests decoding one row each, no trees: 0 sampled (T=0.8), 1 greedy; generators by seed."""
    import numpy as np

    r = _Runner.__new__(_Runner)
    gens = {i: torch.Generator().manual_seed(s) for i, s in seeds.items()}
    params = [SimpleNamespace(temperature=0.8, top_k=0, top_p=1.0), SimpleNamespace(temperature=0.0, top_k=0, top_p=1.0)]
    r.requests = {rid: SimpleNamespace(sampling_params=params[i], generator=gens.get(i)) for i, rid in enumerate("ab")}
    r.input_batch = SimpleNamespace(generators=dict(gens), req_ids=["a", "b"], num_reqs=2, vocab_size=50)
    r.discard_request_mask = SimpleNamespace(np=np.zeros(2, dtype=bool))
    r.__dict__["_ht_tp_group"] = None                      # TP=1 (cached_property, set directly)
    r.ht = StepState(sched=None, step=HTStep.build([1, 1], {}), untreed=untreed)
    return r, gens


def test_seeded_request_without_a_tree_draws_by_the_verifier_rule_with_its_generator():
    from vllm_ht.verify import SamplingParams, sample_token

    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(3))
    r, gens = _runner_with({0, 1}, {0: 11})
    out = r._sample(logits, None)
    want = sample_token(logits[0], SamplingParams(0.8), torch.Generator().manual_seed(11))
    assert out.sampled_token_ids[:, 0].tolist() == [want, int(logits[1].argmax())]
    assert r.seen == {} and r.input_batch.generators == gens       # vLLM's sampler did not see it; restored
    after_one_draw = torch.Generator().manual_seed(11)
    sample_token(logits[0], SamplingParams(0.8), after_one_draw)
    assert torch.equal(gens[0].get_state(), after_one_draw.get_state())   # exactly one draw


def test_requests_outside_untreed_keep_vllms_sampling():
    """A request HT does not decide this step (not draft-eligible, a discarded prefill chunk, or an
    engine that cannot draft): vLLM's sampler uses its generator and its token stands."""
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(3))
    r, gens = _runner_with(set(), {0: 11})
    out = r._sample(logits, None)
    assert r.seen == {0: gens[0]}
    assert out.sampled_token_ids[:, 0].tolist() == logits.argmax(-1).tolist()


def test_custom_logits_processors_are_named_and_builtins_are_not():
    from vllm.v1.sample.logits_processor import BUILTIN_LOGITS_PROCESSORS

    from vllm_ht.vllm.runner import custom_logits_processors

    class WatermarkProcessor:
        pass

    builtins = [cls.__new__(cls) for cls in BUILTIN_LOGITS_PROCESSORS]
    assert custom_logits_processors(SimpleNamespace(all=builtins)) == []
    assert custom_logits_processors(SimpleNamespace(all=[*builtins, WatermarkProcessor()])) == ["WatermarkProcessor"]


def test_discarded_samples_leave_the_generator_as_before_sampling():
    """A partial prefill chunk's sample is discarded: vLLM's rewind (`set_offset`, CUDA only) does not
    see the generator, and its state is put back to the snapshot taken before sampling."""
    class Bookkeeping:
        def _bookkeeping_sync(self):
            self.seen = dict(self.input_batch.generators)

    class Runner(HTRunnerMixin, Bookkeeping):
        pass

    r = Runner.__new__(Runner)
    gen = torch.Generator().manual_seed(5)
    before = gen.get_state()
    torch.rand(4, generator=gen)                           # the discarded draw
    r.input_batch = SimpleNamespace(generators={0: gen})
    r.ht = StepState(sched=None, rng_snapshots={0: before})
    r._bookkeeping_sync()
    assert r.seen == {} and r.input_batch.generators == {0: gen} and r.ht.rng_snapshots == {}
    assert torch.equal(gen.get_state(), before)
