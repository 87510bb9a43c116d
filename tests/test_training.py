"""Training on a tiny random Llama: loss masking, the pseudo mask, resume == uninterrupted."""
import pytest
import torch

from vllm_ht.backbone import Backbone
from vllm_ht.config import HiddenTransferConfig
from vllm_ht.projections import TransferProjections
from vllm_ht.training.data import batch_for_step, load_sequences, sample_anchors
from vllm_ht.training.loss import distill_loss
from vllm_ht.training.loss import teacher_logprobs as loss_teacher
from vllm_ht.training.passes import _pseudo_mask, pseudo_pass, real_pass, targets_valid
from vllm_ht.training.train import TrainConfig, Trainer

T, F = True, False


def test_targets_valid_by_hand():
    v = targets_valid(torch.tensor([[3, 4, 5]]), torch.tensor([7]), 2)
    assert v.tolist() == [[[T, T], [T, F], [F, F]]]


def test_pseudo_mask_by_hand():
    # T=4 real tokens; anchors 1 and 2; steps 0, 1 -> rows (1,0), (2,0), (1,1), (2,1)
    m = _pseudo_mask(torch.tensor([[1, 2, 1, 2]]), torch.tensor([0, 0, 1, 1]), 4)[0, 0]
    #                real 0  1  2  3 | (1,0) (2,0) (1,1) (2,1)
    assert m.tolist() == [[T, T, F, F, T, F, F, F],
                          [T, T, T, F, F, T, F, F],
                          [T, T, F, F, T, F, T, F],
                          [T, T, T, F, F, T, F, T]]


def test_invalid_rows_contribute_nothing(tiny_model):
    bb = Backbone(tiny_model)
    draft = torch.randn(1, 3, 2, 32, requires_grad=True)
    teacher = torch.randn(1, 3, 2, 32)
    valid = torch.tensor([[[T, T], [T, F], [F, F]]])
    out = distill_loss(bb, draft, teacher, valid)
    out.loss.backward()
    assert out.counts == [2, 1]
    assert (draft.grad[~valid] == 0).all() and (draft.grad[valid].abs().sum(-1) > 0).all()
    poisoned = draft.detach().clone()
    poisoned[~valid] = 1e4
    assert torch.equal(distill_loss(bb, poisoned, teacher, valid).loss, out.loss.detach())


def test_loss_and_its_hand_written_gradient_match_autograd(tiny_model, monkeypatch):
    """distill_loss's backward is (softmax(q) - p) times the frozen head: it must equal autograd's
    gradient of the plain formula, over several row chunks and with step weights."""
    import vllm_ht.training.loss as loss_mod

    monkeypatch.setattr(loss_mod, "CHUNK_ROWS", 4)               # 3 chunks for 10 valid rows
    bb = Backbone(tiny_model)
    g = torch.Generator().manual_seed(3)
    draft = torch.randn(2, 3, 2, 32, generator=g, requires_grad=True)
    teacher = torch.randn(2, 3, 2, 32, generator=g)
    valid = torch.ones(2, 3, 2, dtype=torch.bool)
    valid[1, 2, 1] = valid[0, 0, 0] = False
    out = distill_loss(bb, draft, teacher, valid, step_weights=[1.0, 0.5])
    out.loss.backward()
    ref_draft = draft.detach().clone().requires_grad_(True)
    logp = torch.log_softmax(bb.logits(teacher[valid]), -1)
    logq = torch.log_softmax(bb.logits(ref_draft[valid]), -1)
    w = torch.tensor([1.0, 0.5])[torch.arange(2).expand_as(valid)[valid]]
    ref = ((logp.exp() * (logp - logq)).sum(-1) * w).sum() / w.sum()
    ref.backward()
    torch.testing.assert_close(out.loss.detach(), ref.detach())
    torch.testing.assert_close(draft.grad, ref_draft.grad)
    assert draft.grad.abs().sum() > 0


def test_teacher_rows_shared_by_pseudo_rows_are_computed_once_and_equal_the_per_row_ones(tiny_model, monkeypatch):
    import vllm_ht.training.train as train_mod

    bb = Backbone(tiny_model)
    final = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(5))
    anchors = torch.tensor([[2, 3, 4], [1, 5, 6]])                  # adjacent anchors share teachers
    tpos = (anchors[:, :, None] + torch.arange(2) + 1).clamp(max=8)
    valid = targets_valid(anchors, torch.tensor([9, 8]), 2)
    rows = []
    monkeypatch.setattr(train_mod, "teacher_logprobs",
                        lambda bb_, x: rows.append(x.shape[0]) or loss_teacher(bb_, x))
    got = train_mod.unique_teacher_logprobs(bb, final, tpos, valid)
    per_row = loss_teacher(bb, final[torch.arange(2)[:, None, None], tpos][valid])
    torch.testing.assert_close(got, per_row)
    assert int(valid.sum()) == 9 and rows == [7]           # 9 valid rows, 7 distinct teacher positions


def test_pseudo_pass_matches_inference_forward(tiny_model):
    """A training pseudo row equals the reference engine's pseudo row for the same anchor."""
    from vllm_ht.reference.cache import KVCache
    from vllm_ht.reference.forward import HTForward, StepInput

    cfg = HiddenTransferConfig.for_model(tiny_model.config, num_steps=2, transfer_layers=[1, 2])
    proj = TransferProjections(cfg)
    with torch.no_grad():
        proj.weight.add_(torch.randn(proj.weight.shape, generator=torch.Generator().manual_seed(2)) * 0.1)
    ids = torch.randint(3, 96, (1, 9), generator=torch.Generator().manual_seed(3))
    bb = Backbone(tiny_model)
    with torch.no_grad():
        train_out = pseudo_pass(bb, proj, cfg, real_pass(bb, ids, cfg), torch.tensor([[4, 6]]))
    fwd, cache = HTForward(tiny_model, proj, cfg), KVCache(4, 2, 8, 64, torch.float32)
    infer = fwd(StepInput(ids[0], torch.arange(9), torch.ones(9, 9, dtype=torch.bool).tril(),
                          torch.tensor([4, 6])), cache)
    torch.testing.assert_close(train_out[0], infer.pseudo_hidden, atol=1e-5, rtol=1e-5)


def test_max_lines_keeps_the_first_lines_of_the_file(tiny_data):
    every = load_sequences(tiny_data, max_len=64)
    first = load_sequences(tiny_data, max_len=64, max_lines=5)
    assert len(every) == 12 and [s.ids for s in first] == [s.ids for s in every[:5]]
    assert len(load_sequences(tiny_data, max_len=64, max_lines=12)) == 12        # exactly the file's lines
    with pytest.raises(ValueError, match="has 12 lines, fewer than the 13 asked for.*make-data"):
        load_sequences(tiny_data, max_len=64, max_lines=13)


def test_a_line_still_being_written_is_a_clear_error_unless_past_the_lines_asked_for(tiny_data, tmp_path):
    lines = tiny_data.read_text().splitlines(keepends=True)
    growing = tmp_path / "growing.jsonl"
    growing.write_text("".join(lines[:6]) + lines[6][:20])          # make-data mid-write of line 7
    assert len(load_sequences(growing, max_len=64, max_lines=6)) == 6
    with pytest.raises(ValueError, match="line 7 is not whole JSON.*--max-sequences 6"):
        load_sequences(growing, max_len=64)
    growing.write_text(lines[0][:20])                                # ... or of its first line
    with pytest.raises(ValueError, match="line 1 is not whole JSON.*stopped mid-line: let make-data finish"):
        load_sequences(growing, max_len=64)


def test_a_resume_on_another_number_of_lines_is_refused(tiny_model, tiny_data, tmp_path):
    from dataclasses import replace

    run = _trainer(tiny_model, tiny_data, tmp_path / "run", 2)
    run = Trainer(replace(run.cfg, max_sequences=8), model=tiny_model)
    run.run(progress=False)
    with pytest.raises(ValueError, match="run on 8 lines of its data, not all: resume with the same --max-sequences"):
        _trainer(tiny_model, tiny_data, tmp_path / "run", 2).load_state()


def test_batches_and_anchors_are_reproducible(tiny_data):
    seqs = load_sequences(tiny_data, max_len=64)
    a, b = batch_for_step(seqs, 5, 4, seed=3), batch_for_step(seqs, 5, 4, seed=3)
    assert torch.equal(a.ids, b.ids)
    anch = sample_anchors(a, 6, 2, torch.Generator().manual_seed(0))
    assert (anch >= (a.prompt_lens - 1)[:, None]).all() and (anch + 2 <= a.lengths[:, None] - 1).all()


def _trainer(tiny_model, tiny_data, out, steps):
    cfg = TrainConfig(model="tiny", data=str(tiny_data), out=str(out), num_steps=2, transfer_layers=[2, 2],
                      steps=steps, batch_size=4, anchors=5, max_len=64, warmup=2, save_every=2, medusa=True)
    return Trainer(cfg, model=tiny_model)


def test_resume_equals_uninterrupted(tiny_model, tiny_data, tmp_path):
    full = _trainer(tiny_model, tiny_data, tmp_path / "full", 4)
    full.run(progress=False)
    part = _trainer(tiny_model, tiny_data, tmp_path / "part", 4)
    part.cfg.steps = 2               # stop early (as if killed after the step-2 save) ...
    part.run(progress=False)
    resumed = _trainer(tiny_model, tiny_data, tmp_path / "part", 4)  # ... and start again
    resumed.run(progress=False)
    assert resumed.step == 4
    assert torch.equal(resumed.projections.weight, full.projections.weight)
    assert torch.equal(resumed.medusa.weight, full.medusa.weight)
    assert not torch.equal(full.projections.weight, TransferProjections(full.ht_config).weight)  # it learned
    assert (tmp_path / "full" / "config.json").is_file() and (tmp_path / "full" / "projections.safetensors").is_file()


def test_learning_curve_evaluates_every_snapshot_once(tiny_model, tiny_data, tmp_path, monkeypatch):
    """Snapshots at every save (steps 2 and 4) -> one curve row each, with the anchors seen; the
    row of the last snapshot equals evaluating the final projections; a second call evaluates nothing."""
    import json

    import vllm_ht.training.curve as curve
    from vllm_ht.training.evaluate import evaluate, ht_drafter

    trainer = _trainer(tiny_model, tiny_data, tmp_path / "run", 4)
    trainer.run(progress=False)
    bb = Backbone(tiny_model)
    held_out = load_sequences(str(tiny_data), 64)[:4]
    rows = curve.learning_curve(bb, tmp_path / "run", held_out, progress=False)
    assert [(r["step"], r["anchors_seen"]) for r in rows] == [(2, 2 * 4 * 5), (4, 4 * 4 * 5)]
    final = evaluate(bb, trainer.ht_config, {"ht": ht_drafter(bb, trainer.projections, trainer.ht_config)},
                     held_out, progress=False)["ht"]
    assert rows[-1]["top1"] == [round(final.topr(d, 1), 4) for d in (1, 2)]
    assert json.loads((tmp_path / "run" / curve.CURVE_FILE).read_text())["rows"] == rows
    monkeypatch.setattr(curve, "evaluate", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-evaluated")))
    assert curve.learning_curve(bb, tmp_path / "run", held_out, progress=False) == rows
    assert curve.plot_learning_curve(rows, tmp_path / "curve.png").stat().st_size > 1000


def test_a_resumed_run_keeps_one_history_line_per_step(tiny_model, tiny_data, tmp_path):
    import json

    part = _trainer(tiny_model, tiny_data, tmp_path / "run", 4)
    part.cfg.steps = 2                      # saved at step 2; then step 3 ran and the process died
    part.run(progress=False)
    with open(tmp_path / "run" / "history.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "loss": 0.0}) + "\n")
    _trainer(tiny_model, tiny_data, tmp_path / "run", 4).run(progress=False)   # resumes at 2
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_a_run_continued_from_a_checkpoint_starts_from_its_weights_and_counts_its_anchors(
        tiny_model, tiny_data, tmp_path):
    """--init-from: the new run starts from the checkpoint's projections and Medusa heads; its
    snapshots count anchors on top of the checkpoint's (step 0 is the checkpoint itself), also
    after a resume; a checkpoint with other projection settings is refused with the fix."""
    import json
    from dataclasses import replace

    first = _trainer(tiny_model, tiny_data, tmp_path / "first", 4)
    first = Trainer(replace(first.cfg, save_dtype="float32"), model=tiny_model)   # exact round trip
    first.run(progress=False)                                                      # 4 x 4 x 5 = 80 anchors
    cont = replace(first.cfg, out=str(tmp_path / "more"), steps=2, init_from=str(tmp_path / "first"))
    probe = Trainer(cont, model=tiny_model)
    probe.init_from(cont.init_from)
    assert torch.equal(probe.projections.weight, first.projections.weight)
    assert torch.equal(probe.medusa.weight, first.medusa.weight)
    assert probe.anchors_before == 80

    Trainer(replace(cont, steps=1), model=tiny_model).run(progress=False)          # stopped after step 1 ...
    more = Trainer(cont, model=tiny_model)
    more.run(progress=False)                                                       # ... and resumed
    assert more.step == 2 and not torch.equal(more.projections.weight, first.projections.weight)
    snaps = sorted((tmp_path / "more" / "snapshots").glob("step_*.pt"))
    states = [torch.load(s, weights_only=False) for s in snaps]
    assert [s["anchors_seen"] for s in states] == [80, 100, 120]
    assert torch.equal(states[0]["projections"]["weight"], first.projections.weight)
    prov = json.loads((tmp_path / "more" / "config.json").read_text())["provenance"]
    assert prov["anchors_seen"] == 120 and prov["init_from"]["anchors_seen"] == 80

    other = replace(cont, out=str(tmp_path / "other"), transfer_layers=[1, 1])
    with pytest.raises(ValueError, match="transfer_layers.*--transfer-layers"):
        Trainer(other, model=tiny_model).run(progress=False)
    # resuming the folder as another run (without --init-from) is refused, not silently mixed
    with pytest.raises(ValueError, match="started from .*first.*the same --init-from"):
        Trainer(replace(cont, init_from=None, steps=3), model=tiny_model).run(progress=False)
    # a run started afresh in that folder keeps none of its snapshots or learning curve
    (tmp_path / "more" / "learning_curve.json").write_text("{}")
    afresh = Trainer(replace(cont, init_from=None, steps=2), model=tiny_model)
    afresh.run(progress=False, resume=False)
    assert not (tmp_path / "more" / "learning_curve.json").exists()
    assert sorted(p.name for p in (tmp_path / "more" / "snapshots").glob("*.pt")) == ["step_000002.pt"]
    assert torch.load(tmp_path / "more" / "snapshots" / "step_000002.pt", weights_only=False)["anchors_seen"] == 40


def test_anchors_seen_of_a_checkpoint():
    from vllm_ht.training.train import checkpoint_anchors as anchors_seen

    assert anchors_seen({"anchors_seen": 1234, "train": {"steps": 1, "batch_size": 1, "anchors": 1}}) == 1234
    # the shipped checkpoint's provenance predates the field: steps x batch x anchors of its run
    assert anchors_seen({"train": {"steps": 1500, "batch_size": 8, "anchors": 64}}) == 768_000
    assert anchors_seen({}) == 0
