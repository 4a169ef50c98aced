"""The manifest contract: stale, mismatched or corrupt engine dirs and too-large trees are refused clearly."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from export.__main__ import main as export_main
from export.engine import TargetError, check_target, ensure_export, stale_reason
from export.manifest import MANIFEST_NAME, Manifest, ManifestError, ShapeError
from export.methods import MethodExtras
from export.onnx_export import ExportConfig, export_onnx
from tests.export.tiny_llama import make_tiny_llama

MAX_CONTEXT, MAX_TREE = 256, 16


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, real_model_dir):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny"), real_model_dir, seed=1)


@pytest.fixture(scope="module")
def pristine(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("engines") / "vanilla"
    export_onnx(ExportConfig(tiny_dir, out, max_context=MAX_CONTEXT, max_tree=MAX_TREE), log=lambda _: None)
    return out


@pytest.fixture
def engine(pristine, tmp_path):
    """A private copy of the export that a test may damage."""
    return shutil.copytree(pristine, tmp_path / "engine")


def edit_manifest(engine, change) -> None:
    path = engine / MANIFEST_NAME
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_round_trip(engine):
    m = Manifest.load(engine)
    assert Manifest.from_json(json.loads((engine / MANIFEST_NAME).read_text()), engine) == m
    assert m.max_tree == MAX_TREE and m.max_context == MAX_CONTEXT


def test_corrupt_weights_are_refused(engine):
    data = engine / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(ManifestError, match=r"model.onnx.data does not match the sha256.*re-export"):
        Manifest.load(engine)


def test_truncated_graph_is_refused(engine):
    graph = engine / "model.onnx"
    graph.write_bytes(graph.read_bytes()[:1000])
    with pytest.raises(ManifestError, match=r"model.onnx has 1000 bytes, the manifest says"):
        Manifest.load(engine)
    # Without the hash check the graph itself is still read, and is unreadable.
    with pytest.raises(ManifestError, match="not a readable ONNX model"):
        Manifest.load(engine, verify_files=False)


def test_missing_file_is_refused(engine):
    (engine / "model.onnx.data").unlink()
    with pytest.raises(ManifestError, match="missing"):
        Manifest.load(engine)


def test_manifest_that_disagrees_with_the_graph_is_refused(engine):
    def rename(data):
        data["inputs"][2]["name"] = "attention_mask"
        data["outputs"][1]["shape"] = [2, "T", 2, 8]
    edit_manifest(engine, rename)
    with pytest.raises(ManifestError) as info:
        Manifest.load(engine)
    message = str(info.value)
    assert "input names" in message and "attention_mask" in message
    assert "output new_keys" in message                   # every disagreement, not only the first


def test_other_format_version_and_bad_json_are_refused(engine):
    edit_manifest(engine, lambda d: d["exporter"].update(format_version=0))
    with pytest.raises(ManifestError, match="manifest format 0.*re-export"):
        Manifest.load(engine)
    (engine / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        Manifest.load(engine)
    (engine / MANIFEST_NAME).unlink()
    with pytest.raises(ManifestError, match="has no manifest.json"):
        Manifest.load(engine)


def test_too_large_tree_is_refused(pristine):
    m = Manifest.load(pristine)
    m.check_tree_size(MAX_TREE)
    with pytest.raises(ShapeError, match=r"tree of 17 nodes is larger than this engine's max tree size 16.*--max-tree 17"):
        m.check_tree_size(MAX_TREE + 1)
    m.check_step_shape(200, 0)                              # a prefill chain: the prefill profile
    m.check_step_shape(10, 250)                             # a packed step: the cells of several sequences
    with pytest.raises(ShapeError, match="exceed this engine's 16 sequences of max_context 256"):
        m.check_step_shape(10, 16 * 256)
    with pytest.raises(ShapeError, match="no profile"):
        m.check_step_shape(16 * 16 + 1, 10)                 # more nodes than max_batch trees, on a cache


def test_stale_when_model_method_or_budget_change(pristine, tiny_dir, tmp_path, real_model_dir):
    config = ExportConfig(tiny_dir, pristine, max_context=MAX_CONTEXT, max_tree=MAX_TREE)
    assert stale_reason(pristine, config, MethodExtras()) is None
    assert "max_tree=16" in stale_reason(pristine, ExportConfig(tiny_dir, pristine, max_context=MAX_CONTEXT, max_tree=32),
                                         MethodExtras())
    other = make_tiny_llama(tmp_path / "other", real_model_dir, seed=2)
    assert "model fingerprint" in stale_reason(pristine, ExportConfig(other, pristine), MethodExtras())
    assert "method" in stale_reason(pristine, ExportConfig(tiny_dir, pristine, method="ppd"),
                                    MethodExtras(torch.zeros(3, 64), {"num_prompt_tokens": 3, "ensemble": 1}))


def test_ensure_export_reuses_fresh_and_replaces_stale(engine, tiny_dir):
    config = ExportConfig(tiny_dir, engine, max_context=MAX_CONTEXT, max_tree=MAX_TREE)
    fresh = ensure_export(config, log=lambda _: None)
    assert not fresh.exported
    raw = bytearray((engine / "model.onnx.data").read_bytes())
    raw[100] ^= 0xFF
    (engine / "model.onnx.data").write_bytes(bytes(raw))
    healed = ensure_export(config, log=lambda _: None)
    assert healed.exported and "sha256" in healed.reason
    Manifest.load(engine)  # consistent again


def test_gpu_target_stops_with_what_is_missing(capsys, monkeypatch):
    """(Each missing piece is tested in tests/export/test_trt_build.py.)"""
    import export.trt.host
    from export.trt.host import HostFacts

    monkeypatch.setattr(export.trt.host, "probe_host", lambda: HostFacts(None, "", None))
    with pytest.raises(TargetError, match="tensorrt is not importable .*; no CUDA GPU visible to torch"):
        check_target("h100")
    assert export_main(["engine", "--target", "a100"]) == 2
    assert "tensorrt is not importable (pip install .[tensorrt])" in capsys.readouterr().err
