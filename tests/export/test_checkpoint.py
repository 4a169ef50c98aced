import json

import pytest

from export.checkpoint import CheckpointError, check_model_dir, load_checkpoint, model_fingerprint


def test_missing_dir(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        check_model_dir(tmp_path / "nope")


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        check_model_dir(tmp_path)


def test_non_llama_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="'gpt2' model"):
        check_model_dir(tmp_path)


def test_corrupt_weights_are_a_clear_error(tmp_path, tiny_model_dir):
    for f in tiny_model_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="could not load"):
        load_checkpoint(tmp_path)


def test_fingerprint_tells_models_apart(tmp_path, tiny_model_dir, real_model_dir):
    assert model_fingerprint(tiny_model_dir) == model_fingerprint(tiny_model_dir)
    assert model_fingerprint(tiny_model_dir) != model_fingerprint(real_model_dir)
