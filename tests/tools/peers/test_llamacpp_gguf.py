"""The llamacpp peer's GGUF cache: keyed by checkpoint fingerprint and llama.cpp version, written atomically."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from export.checkpoint import model_fingerprint
from export.paths import DEFAULT_MODEL_DIR, REPO_ROOT
from tools.peers import llamacpp_gguf
from tools.peers.llamacpp_gguf import LLAMACPP_VERSION, GgufError, ensure_gguf, gguf_name


@pytest.fixture
def fake_tools(tmp_path, monkeypatch):
    """Artifacts in tmp_path; conversion and quantization record their calls and write a small file."""
    calls: list[tuple[str, str]] = []
    monkeypatch.setattr(llamacpp_gguf, "ARTIFACTS_DIR", tmp_path / "artifacts")

    def convert(model_dir, target: Path, log) -> None:
        calls.append(("f32", Path(target).name))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"GGUF f32")

    def quantize(source: Path, target: Path, gguf_type: str, threads, log) -> None:
        calls.append((gguf_type, source.name))
        target.write_bytes(b"GGUF " + gguf_type.encode())

    monkeypatch.setattr(llamacpp_gguf, "_convert_f32", convert)
    monkeypatch.setattr(llamacpp_gguf, "_quantize", quantize)
    return calls


def test_ggufs_are_made_once_per_checkpoint_and_remade_when_it_changes(fake_tools, tiny_model_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    q8 = ensure_gguf(model, "q8_0", log=lambda _: None)
    fingerprint = model_fingerprint(model)
    assert q8.name == f"q8_0-{fingerprint}-llamacpp{LLAMACPP_VERSION}.gguf" == gguf_name("q8_0", fingerprint)
    assert [kind for kind, _ in fake_tools] == ["f32", "q8_0"]              # q8_0 is quantized from the f32
    assert ensure_gguf(model, "q8_0", log=lambda _: None) == q8 and len(fake_tools) == 2  # cached: no work

    config = model / "config.json"
    config.write_text(config.read_text().replace('"rms_norm_eps"', '"pad": 0, "rms_norm_eps"'))  # a new checkpoint
    f32 = ensure_gguf(model, "f32", log=lambda _: None)
    assert model_fingerprint(model) != fingerprint and model_fingerprint(model) in f32.name
    assert len(fake_tools) == 3
    assert sorted(p.name for p in f32.parent.iterdir()) == sorted([f32.name, q8.name])  # the stale f32 is gone


def test_q4_1_of_the_default_model_is_the_shipped_gguf(fake_tools, tmp_path, tiny_model_dir):
    from export.checkpoint import packaged_gguf_path

    assert ensure_gguf(DEFAULT_MODEL_DIR, "q4_1") == packaged_gguf_path()
    assert fake_tools == []
    # Any other checkpoint: llama.cpp's quantizer on its own f32 GGUF.
    assert ensure_gguf(tiny_model_dir, "q4_1", log=lambda _: None).name.startswith("q4_1-")
    assert [kind for kind, _ in fake_tools] == ["f32", "q4_1"]


def test_unknown_type_and_missing_converter_name_the_fix(tmp_path, monkeypatch, tiny_model_dir):
    with pytest.raises(ValueError, match="unknown llama.cpp weight type 'q5_k'; choose one of f32, q8_0, q4_1"):
        ensure_gguf(tiny_model_dir, "q5_k")
    monkeypatch.setattr(llamacpp_gguf, "ARTIFACTS_DIR", tmp_path / "artifacts")
    with pytest.raises(GgufError, match="converter .* is missing.*run `make peers`"):
        ensure_gguf(tiny_model_dir, "f32", log=lambda _: None)
    assert not any((tmp_path / "artifacts").rglob("*.gguf*"))  # nothing half-written


def test_the_makefile_pins_the_same_llama_cpp_version():
    pinned = re.search(r"^LLAMACPP_VERSION := (\S+)$", (REPO_ROOT / "Makefile").read_text(), re.M)
    assert pinned is not None and pinned.group(1) == LLAMACPP_VERSION
