"""vllm_ht/training/distill.py: a resumed `make-data` appends only to lines made the same way."""
import json
from dataclasses import replace

import pytest

from vllm_ht.training.distill import DistillJob, check_resume, done_prompts, meta_path

DONE = {0: "a", 1: "b"}          # id -> prompt of the lines already in the file


def _job(tmp_path, **kw):
    return DistillJob(model="/models/SmolLM2-135M-Instruct", out=tmp_path / "train.jsonl", prompts=["a", "b", "c"],
                      dtype="float32", **kw)


def test_a_resume_under_other_settings_is_refused_and_names_them(tmp_path):
    job = _job(tmp_path)
    check_resume(job, {})                             # a new file: its settings are recorded
    assert json.loads(meta_path(job.out).read_text())["dtype"] == "float32"
    check_resume(job, DONE)                           # same settings: goes on
    check_resume(replace(job, first=1), DONE)         # answering fewer prompts does not touch the lines
    for changed, key in ((replace(job, dtype="bfloat16"), "dtype"), (replace(job, seed=1), "seed"),
                         (replace(job, max_tokens=512), "max_tokens")):
        with pytest.raises(ValueError, match=f"2 sequences made with other settings.*'{key}'.*another --out"):
            check_resume(changed, DONE)
    assert json.loads(meta_path(job.out).read_text())["dtype"] == "float32"   # a refusal keeps the record


def test_lines_answering_another_prompt_list_are_refused(tmp_path):
    """Another --num or prompt file gives other prompts under the same ids: checked line by line."""
    job = _job(tmp_path)
    with pytest.raises(ValueError, match="1 of its 2 sequences answer other prompts"):
        check_resume(replace(job, prompts=["a", "x", "c"]), DONE)
    with pytest.raises(ValueError, match="1 of its 2 sequences answer other prompts"):
        check_resume(replace(job, prompts=["a"]), DONE)           # a shorter list: id 1 is not in it


def test_lines_without_a_record_are_resumed_with_a_warning_and_then_recorded(tmp_path, caplog):
    job = _job(tmp_path)
    check_resume(job, {0: "a"})
    assert "not checked" in caplog.text
    with pytest.raises(ValueError, match="other settings"):
        check_resume(replace(job, dtype="bfloat16"), {0: "a"})


def test_done_ids_reads_each_complete_line_and_stops_at_a_torn_one(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"id": 0, "prompt": "a", "prompt_ids": [1], "response_ids": [2]}) + "\n"
                    + '{"id": 1, "prom')
    assert done_prompts(path) == {0: "a"}
