"""vllm_ht/training/distill.py: a resumed `make-data` appends only to lines made the same way."""
import json
from dataclasses import replace

import pytest

from vllm_ht.training.distill import DistillJob, check_resume, meta_path


def _job(tmp_path, **kw):
    return DistillJob(model="/models/SmolLM2-135M-Instruct", out=tmp_path / "train.jsonl", prompts=["a", "b"],
                      dtype="float32", **kw)


def test_a_resume_under_other_settings_is_refused_and_names_them(tmp_path):
    job = _job(tmp_path)
    check_resume(job, set())                          # a new file: its settings are recorded
    assert json.loads(meta_path(job.out).read_text())["dtype"] == "float32"
    check_resume(job, {0, 1})                         # same settings: goes on
    for changed, key in ((replace(job, dtype="bfloat16"), "dtype"), (replace(job, seed=1), "seed"),
                         (replace(job, max_tokens=512), "max_tokens")):
        with pytest.raises(ValueError, match=f"2 sequences made with other settings.*'{key}'.*another --out"):
            check_resume(changed, {0, 1})
    assert json.loads(meta_path(job.out).read_text())["dtype"] == "float32"   # a refusal keeps the record


def test_lines_without_a_record_are_resumed_with_a_warning_and_then_recorded(tmp_path, caplog):
    job = _job(tmp_path)
    check_resume(job, {0})
    assert "not checked" in caplog.text
    with pytest.raises(ValueError, match="other settings"):
        check_resume(replace(job, dtype="bfloat16"), {0})
