"""The TensorRT engine builder around the TensorRT API: profiles from the manifest, the engine.json key
and the refusal of each mismatch, the build through a stand-in TensorRT (tests/export/fake_tensorrt.py),
and the errors of `python -m export engine --target <gpu>` on a machine that cannot build it."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import export.engine
import export.trt.build
import export.trt.host
import export.devices
from export.__main__ import main
from export.engine import TargetError, check_target
from export.manifest import TREE_AXIS, FileRecord, ManifestError, ShapeError
from export.methods import METHODS
from export.onnx_export import ExportConfig, export_onnx
from export.paths import REPO_ROOT
from export.ppd import PPDConfig
from export.trt.build import TrtBuildError, build_engine, network_flags
from export.trt.host import HostFacts, missing_for_target
from export.trt.key import (ENGINE_JSON, PLAN_NAME, TIMING_CACHE_NAME, BuilderSettings, DeviceFacts, EngineKey,
                            EngineMismatchError, EngineRecord, check_engine)
from export.static_steps import step_sizes
from export.trt.profiles import select_profile, static_profiles, tree_size
from tests.export.fake_tensorrt import FAKE_CACHE, FakeTensorRT
from trees import load_ppd_trees

MAX_CONTEXT, MAX_TREE = 256, 16
H100 = DeviceFacts("NVIDIA H100 80GB HBM3", "9.0", 132, "10.16.1.11")


@pytest.fixture(scope="module")
def manifest(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("engines") / "vanilla"
    return export_onnx(ExportConfig(tiny_dir, out, max_context=MAX_CONTEXT, max_tree=MAX_TREE, validate=False),
                       log=lambda _: None)


@pytest.fixture
def engine_copy(manifest, tmp_path):
    """A private copy of the export to build into (builds write beside the ONNX)."""
    import shutil

    return dataclasses.replace(manifest, dir=Path(shutil.copytree(manifest.dir, tmp_path / "engine")))


# --- profiles ---------------------------------------------------------------------------------------
def profiles(manifest, tree: int = 5, max_batch: int = 1):
    return static_profiles(manifest, step_sizes(tree, max_batch), max_batch * MAX_CONTEXT)


def test_every_profile_is_one_static_step_over_all_cells(manifest):
    small, prefill = profiles(manifest)
    assert (small.name, prefill.name) == ("T=5", "T=64") and small.static and prefill.static
    m = manifest.model
    kv = [MAX_CONTEXT, m.num_kv_heads, m.head_dim]
    assert small.shapes["input_ids"] == ([5], [5], [5]) and small.shapes["past_key.0"] == (kv, kv, kv)
    assert small.shapes["past_mask"] == ([5, MAX_CONTEXT],) * 3 and set(small.shapes) == set(manifest.input_names)
    assert prefill.shapes["tree_mask"] == ([64, 64],) * 3


@pytest.mark.parametrize("tree, max_batch, sizes", [(5, 1, (5, 64)), (1, 1, (1, 64)), (12, 4, (12, 24, 48, 64)),
                                                     (20, 4, (20, 40, 80))])
def test_step_sizes_cover_the_tree_for_each_batch_and_a_prefill_chunk(tree, max_batch, sizes):
    assert step_sizes(tree, max_batch) == sizes


def test_static_steps_the_manifest_cannot_take_are_refused(manifest):
    with pytest.raises(ManifestError, match="steps of at most 256 nodes over 4096 cells, not 300 over 256"):
        static_profiles(manifest, (5, 300), MAX_CONTEXT)
    with pytest.raises(ManifestError, match="not 64 over 5000"):
        static_profiles(manifest, (5, 64), 5000)


@pytest.mark.parametrize("ensemble", [1, 2])
def test_tree_size_is_the_largest_draft_the_proposer_makes(ensemble):
    """The opt T the engine is tuned for is the T the decode loop runs: checked against the proposer."""
    from runtime.proposers.ppd import PPDProposer

    tree_file = METHODS["ppd"].hand_picked_tree
    trees = load_ppd_trees(tree_file)
    proposer = PPDProposer(PPDConfig(trees.num_prompt_tokens, ensemble), trees, vocab_size=1000)
    assert tree_size(tree_file, ensemble) == proposer.max_draft_tokens


def test_a_step_selects_the_smallest_static_size_that_holds_it(manifest):
    chosen = profiles(manifest)
    assert select_profile(chosen, 5, MAX_CONTEXT) == 0 and select_profile(chosen, 64, MAX_CONTEXT) == 1
    with pytest.raises(ShapeError, match="no optimization profile covers T=5, S=100"):
        select_profile(chosen, 5, 100)                # a static step binds every cell


# --- the key ---------------------------------------------------------------------------------------
def test_key_round_trips_and_records_what_ties_an_engine(manifest):
    key = EngineKey.build(manifest, profiles(manifest), BuilderSettings(), H100)
    assert EngineKey.from_json(json.loads(json.dumps(key.to_json()))) == key
    assert key.onnx == {r.file: r.sha256 for r in (manifest.onnx, *manifest.external_data)} and len(key.onnx) == 2
    data = key.to_json()
    assert data["device"] == {"gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "sm_count": 132,
                              "tensorrt_version": "10.16.1.11"}
    assert data["builder"] == {"tf32": False, "optimization_level": 3, "strongly_typed": True}
    assert data["dtype"] == manifest.dtype and [p["name"] for p in data["profiles"]] == ["T=5", "T=64"]
    assert key.mismatches(manifest, H100) == []


@pytest.mark.parametrize("change, what", [
    (dict(tensorrt_version="11.4.0.106"), "TensorRT version: built with 10.16.1.11, this machine has 11.4.0.106"),
    (dict(compute_capability="8.0"), "compute capability: built with 9.0, this machine has 8.0"),
    (dict(gpu_name="NVIDIA A100-SXM4-80GB"), "GPU: built with NVIDIA H100 80GB HBM3, this machine has NVIDIA A100"),
    (dict(sm_count=114), "SM count: built with 132, this machine has 114"),
])
def test_each_device_mismatch_is_refused_with_the_fix(manifest, change, what):
    record = EngineRecord(EngineKey.build(manifest, profiles(manifest), BuilderSettings(), H100),
                          FileRecord(PLAN_NAME, "0" * 64, 1), "h100")
    present = dataclasses.replace(H100, **change)
    assert len(record.key.mismatches(manifest, present)) == 1
    with pytest.raises(EngineMismatchError, match=what) as info:
        check_engine(record, manifest, present)
    rebuild = f"make engine GPU={export.devices.device_key('cuda', present.gpu_name)}"
    assert rebuild in str(info.value) and "on this machine" in str(info.value)


def test_an_engine_from_other_onnx_bytes_is_refused(manifest):
    key = EngineKey.build(manifest, profiles(manifest), BuilderSettings(), H100)
    data = manifest.external_data[0]
    reexported = dataclasses.replace(manifest, external_data=(dataclasses.replace(data, sha256="f" * 64),))
    problems = key.mismatches(reexported, H100)
    assert problems == [f"ONNX file {data.file}: the engine was built from sha256 {data.sha256[:16]}, the manifest "
                        f"has ffffffffffffffff"]
    fp16 = dataclasses.replace(manifest, dtype="float16")
    assert [p.split(":")[0] for p in key.mismatches(fp16, H100)] == ["dtype"]


def test_an_engine_whose_profiles_no_longer_fit_the_manifests_inputs_is_refused(manifest):
    key = EngineKey.build(manifest, profiles(manifest), BuilderSettings(), H100)
    fewer = dataclasses.replace(manifest, inputs=tuple(i for i in manifest.inputs if i.name != "past_mask"))
    assert [p.split(":")[0] for p in key.mismatches(fewer, H100)] == ["profiles"]
    other_tree = EngineKey.build(manifest, profiles(manifest, 9), BuilderSettings(), H100)
    assert other_tree.mismatches(manifest, H100) == [] and other_tree != key    # another engine, still this contract


# --- the build (stand-in TensorRT) ---------------------------------------------------------------------
@pytest.mark.parametrize("version, flags", [("10.16.1.11", 1 << 1), ("11.4.0.106", 0)])
def test_network_flags_are_strongly_typed_on_10_and_none_on_11(version, flags):
    assert network_flags(FakeTensorRT(version)) == flags


def test_network_flags_refuse_a_tensorrt_without_strong_typing():
    old = SimpleNamespace(__version__="8.6.1", NetworkDefinitionCreationFlag=SimpleNamespace())
    with pytest.raises(TrtBuildError, match="no strongly typed networks"):
        network_flags(old)


def test_build_writes_plan_timing_cache_and_key(engine_copy):
    trt = FakeTensorRT()
    record = build_engine(engine_copy, "h100", 5, trt=trt, device=H100, log=lambda _: None)
    directory = engine_copy.dir
    assert trt.builds == [{"flags": 1 << 1, "tf32": False, "level": 3, "profiles": 2}]
    assert EngineRecord.load(directory) == record and record.target == "h100"
    assert record.key == EngineKey.build(engine_copy, profiles(engine_copy), BuilderSettings(), H100)
    assert record.plan.size == (directory / PLAN_NAME).stat().st_size
    assert (directory / TIMING_CACHE_NAME).read_bytes() == FAKE_CACHE + b"1"
    plan = json.loads((directory / PLAN_NAME).read_text())
    assert plan["profiles"][0]["input_ids"] == [[5], [5], [5]] and plan["profiles"][1]["input_ids"] == [[64]] * 3
    assert not [p for p in directory.iterdir() if ".tmp-" in p.name]


def test_an_up_to_date_engine_is_kept_and_a_rebuild_reuses_the_timing_cache(engine_copy):
    trt = FakeTensorRT()
    build_engine(engine_copy, "h100", 5, trt=trt, device=H100, log=lambda _: None)
    mtime = (engine_copy.dir / PLAN_NAME).stat().st_mtime_ns
    build_engine(engine_copy, "h100", 5, trt=trt, device=H100, log=lambda _: None)
    assert len(trt.builds) == 1 and (engine_copy.dir / PLAN_NAME).stat().st_mtime_ns == mtime
    build_engine(engine_copy, "h100", 7, trt=trt, device=H100, log=lambda _: None)          # another tree size
    assert len(trt.builds) == 2 and (engine_copy.dir / TIMING_CACHE_NAME).read_bytes() == FAKE_CACHE + b"2"
    newer = dataclasses.replace(H100, tensorrt_version="10.16.2.1")
    record = build_engine(engine_copy, "h100", 7, trt=FakeTensorRT("10.16.2.1"), device=newer, log=lambda _: None)
    assert record.key.device == newer


@pytest.mark.parametrize("trt, message", [
    (FakeTensorRT(fail_build=True), "could not build an engine .* out of GPU memory"),
    (FakeTensorRT(parse_errors=("node 12 (Attention): unsupported",)), "could not parse .* node 12 \\(Attention\\)"),
])
def test_a_failed_build_raises_tensorrts_reason_and_writes_nothing(engine_copy, trt, message):
    before = sorted(p.name for p in engine_copy.dir.iterdir())
    with pytest.raises(TrtBuildError, match=message):
        build_engine(engine_copy, "h100", 5, trt=trt, device=H100, log=lambda _: None)
    assert sorted(p.name for p in engine_copy.dir.iterdir()) == before


def test_a_failed_rebuild_leaves_the_previous_engine_intact(engine_copy):
    first = build_engine(engine_copy, "h100", 5, trt=FakeTensorRT(), device=H100, log=lambda _: None)
    with pytest.raises(TrtBuildError):
        build_engine(engine_copy, "h100", 5, trt=FakeTensorRT(fail_build=True), device=H100, force=True,
                     log=lambda _: None)
    assert EngineRecord.load(engine_copy.dir) == first
    assert build_engine(engine_copy, "h100", 5, trt=FakeTensorRT(), device=H100, log=lambda _: None) == first


def test_build_refuses_onnx_files_that_are_not_the_manifests(engine_copy):
    data = engine_copy.dir / engine_copy.external_data[0].file
    data.write_bytes(data.read_bytes()[:-4] + b"\0\0\0\1")
    with pytest.raises(ValueError, match="does not match the sha256"):
        build_engine(engine_copy, "h100", 5, trt=FakeTensorRT(), device=H100, log=lambda _: None)
    assert not (engine_copy.dir / ENGINE_JSON).exists()


# --- what a GPU target needs ------------------------------------------------------------------------
NO_TRT = "tensorrt is not importable (pip install .[tensorrt])"


@pytest.mark.parametrize("host, missing", [
    (HostFacts(None, "", None), [NO_TRT, "no CUDA GPU visible to torch"]),
    (HostFacts("10.16.1.11", "", None), ["no CUDA GPU visible to torch"]),
    (HostFacts(None, "", "NVIDIA H100 80GB HBM3"), [NO_TRT]),
    (HostFacts("10.16.1.11", "", "NVIDIA A100-SXM4-80GB"), ["GPU present is NVIDIA A100-SXM4-80GB, target asks for h100"]),
    (HostFacts("10.16.1.11", "", "NVIDIA H100 80GB HBM3"), []),
])
def test_a_gpu_target_names_exactly_what_is_missing(host, missing):
    got = missing_for_target("h100", host)
    assert len(got) == len(missing) and all(g.startswith(m) for g, m in zip(got, missing)), got


def test_check_target_passes_cpu_and_refuses_a_gpu_with_everything_missing():
    check_target("cpu", HostFacts(None, "", None))
    with pytest.raises(TargetError, match="'h100'.*tensorrt is not importable.*; no CUDA GPU"):
        check_target("h100", HostFacts(None, "", None))


@pytest.mark.skipif(torch.cuda.is_available() or importlib.util.find_spec("tensorrt") is not None,
                    reason="asserts the errors of a machine without tensorrt and without a CUDA GPU")
def test_make_engine_for_a_gpu_on_this_machine_fails_before_writing(tmp_path):
    env = {**os.environ, "PPDEPLOY_ARTIFACTS": str(tmp_path / "artifacts")}
    done = subprocess.run([sys.executable, "-m", "export", "engine", "--target", "h100", "--method", "vanilla"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "tensorrt is not importable (pip install .[tensorrt]" in done.stderr
    assert "no CUDA GPU visible to torch" in done.stderr
    assert not (tmp_path / "artifacts").exists()


def test_a_gpu_that_is_not_the_target_is_named_and_nothing_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(export.trt.host, "probe_host", lambda: HostFacts("10.16.1.11", "", "NVIDIA A100-SXM4-80GB"))
    out = tmp_path / "engine"
    assert main(["engine", "--target", "h100", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "GPU present is NVIDIA A100-SXM4-80GB, target asks for h100" in err
    assert "--target nvidia-a100-sxm4-80gb" in err                     # the name that builds for this GPU
    assert not out.exists()


def test_gpu_target_exports_fp16_and_builds_the_engine(tiny_dir, tmp_path, monkeypatch):
    """`python -m export engine --target h100` end to end with TensorRT and the GPU stood in for."""
    trt = FakeTensorRT()
    monkeypatch.setattr(export.trt.host, "probe_host", lambda: HostFacts(trt.__version__, "", H100.gpu_name))
    monkeypatch.setattr(export.trt.host, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(export.trt.build, "present_facts", lambda device, version: H100)
    monkeypatch.setattr(export.devices, "present_device", lambda device: ("cuda", H100.gpu_name))
    out = tmp_path / "engine"
    argv = ["engine", "--target", "h100", "--method", "vanilla", "--model", str(tiny_dir), "--out", str(out),
            "--max-context", str(MAX_CONTEXT), "--max-tree", str(MAX_TREE), "--no-validate"]
    assert main(argv) == 0
    record = EngineRecord.load(out)
    assert record.key.dtype == "float16" and record.key.device == H100 and record.target == "h100"
    # vanilla: one-token steps for 1..16 sequences (the default --max-batch), and the prefill chunk
    assert [p.axes[TREE_AXIS].max for p in record.key.profiles] == [1, 2, 4, 8, 16, 64]
    assert {PLAN_NAME, TIMING_CACHE_NAME, ENGINE_JSON, "manifest.json"} <= {p.name for p in out.iterdir()}
