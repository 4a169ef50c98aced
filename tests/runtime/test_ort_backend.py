"""The onnxruntime backend: same step as torch, zero-copy buffers, engine dirs, lossless greedy."""

from __future__ import annotations

import gc
import json
import shutil
import weakref

import numpy as np
import pytest
import torch

import export.engine
from export.engine import build_ort_engine
from export.methods import MethodExtras
from export.ort_optimize import optimize_for_ort
from export.checkpoint import load_checkpoint, model_fingerprint
from export.manifest import Manifest, ManifestError, ShapeError
from export.onnx_export import ExportConfig, export_onnx
from export.ppd import PPDConfig, save_prompt_tokens
from export.step_model import StepModel
from runtime import Generator
from runtime.backends import BackendClosedError
from runtime.loading import open_engine
from runtime.backends.torch_backend import TorchBackend
from tests.runtime.test_ppd import TREES
from runtime.draft import Draft, Layout
from runtime.kv_cache import ContextOverflowError

MAX_CONTEXT, MAX_TREE = 256, 16
PROMPTS = ["Hello", "Write a poem about the sea", "1 2 3 4 5 6 1 2 3 4 5 6"]


@pytest.fixture(scope="module")
def engine(tiny_dir, tmp_path_factory) -> Manifest:
    out = tmp_path_factory.mktemp("engines") / "vanilla"
    return export_onnx(ExportConfig(tiny_dir, out, max_context=MAX_CONTEXT, max_tree=MAX_TREE), log=lambda _: None)


@pytest.fixture
def artifacts(tmp_path, monkeypatch):
    """Engine cache of from_pretrained(backend="onnxruntime") in a temp dir."""
    monkeypatch.setattr(export.engine, "ARTIFACTS_DIR", tmp_path / "artifacts")
    return tmp_path / "artifacts"


def binary_tree(size: int) -> Layout:
    return Layout.from_parents([-1] + [(i - 1) // 2 for i in range(1, size)])


def test_ort_step_matches_torch_step(engine, tiny_dir):
    hf, _ = load_checkpoint(tiny_dir)
    backends = [TorchBackend(StepModel(hf), MAX_CONTEXT), open_engine(engine.dir, max_context=MAX_CONTEXT)]
    rng = np.random.default_rng(0)
    # A prefill longer than the decode buffers, then trees of several sizes with 1-2 nodes committed:
    # every step's logits depend on all that was committed before, so they check the commits too.
    steps = [(Layout.chain(30), None)] + [(binary_tree(t), [0, 1] if t > 1 else [0]) for t in (1, 5, 16, 3, 9, 2)]
    for layout, commit in steps:
        draft = Draft(rng.integers(0, engine.model.vocab_size, layout.size), layout)
        outs = [b.step(draft) for b in backends]
        assert outs[1].logits.shape == outs[0].logits.shape and outs[1].logits.dtype == outs[0].logits.dtype
        torch.testing.assert_close(outs[1].logits, outs[0].logits, atol=1e-4, rtol=1e-4, msg=f"T={layout.size}")
        torch.testing.assert_close(outs[1].positions, outs[0].positions)
        for b in backends:
            b.commit(commit or list(range(layout.size)))
    assert backends[0].length == backends[1].length == 30 + 1 + 2 * 5


def test_decode_outputs_live_in_preallocated_buffers(engine):
    backend = open_engine(engine.dir, max_context=MAX_CONTEXT)
    first = backend.step(Draft(np.arange(5), binary_tree(5)))
    pointer = first.logits.data_ptr()
    backend.commit([0])
    second = backend.step(Draft(np.arange(3), binary_tree(3)))
    assert second.logits.data_ptr() == pointer and second.logits.shape == (3, engine.model.vocab_size)
    assert second.positions.tolist() == [1, 2, 2]
    assert second.layout is backend.step(Draft(np.arange(3) + 1, binary_tree(3))).layout   # built once, reused


def test_cpu_readout_runs_on_one_torch_thread(engine):
    """onnxruntime computes the step with its own threads: torch's readout takes one (ModelInfo.readout_threads)."""
    assert open_engine(engine.dir, max_context=MAX_CONTEXT).info.readout_threads == 1


def test_backend_never_writes_the_engine_dir(engine, tmp_path):
    """Loading a dir without its optimised graph optimises in memory: the files stay as they are."""
    copy = shutil.copytree(engine.dir, tmp_path / "copy")
    before = sorted((p.name, p.stat().st_mtime_ns) for p in copy.iterdir())
    open_engine(copy).step(Draft.chain([1, 2, 3]))
    assert sorted((p.name, p.stat().st_mtime_ns) for p in copy.iterdir()) == before


def test_optimized_graph_is_saved_once_by_export_then_loaded(engine, tiny_dir):
    config = ExportConfig(tiny_dir, engine.dir, max_context=MAX_CONTEXT, max_tree=MAX_TREE)
    manifest = build_ort_engine(config, MethodExtras(), log=lambda _: None)
    record = manifest.ort_optimized
    assert record["provider"] == "CPUExecutionProvider" and record["source_sha256"] == manifest.onnx.sha256
    optimized = engine.dir / record["files"][0]["file"]
    mtime = optimized.stat().st_mtime_ns
    assert build_ort_engine(config, MethodExtras(), log=lambda _: None).ort_optimized == record
    backend = open_engine(engine.dir)
    assert backend.session._model_path == str(optimized)
    assert optimized.stat().st_mtime_ns == mtime  # reused, not rewritten


def test_corrupt_optimized_graph_is_refused(engine, tmp_path):
    copy = shutil.copytree(engine.dir, tmp_path / "copy")
    optimize_for_ort(Manifest.load(copy))
    data = copy / Manifest.load(copy).ort_optimized["files"][1]["file"]
    raw = bytearray(data.read_bytes())
    raw[-10] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(ManifestError, match="does not match the sha256"):
        open_engine(copy)


def test_steps_outside_the_profiles_are_refused(engine):
    backend = open_engine(engine.dir, max_context=MAX_CONTEXT)
    backend.step(Draft.chain(np.arange(240)))                      # the longest prefill
    backend.commit(range(240))
    with pytest.raises(ContextOverflowError, match="max_context 256"):   # the sequence's own budget
        backend.step(Draft(np.arange(17), binary_tree(17)))
    backend.step(Draft(np.arange(16), binary_tree(16)))            # exactly fills the context
    with pytest.raises(RuntimeError, match="needs a step"):
        open_engine(engine.dir, max_context=MAX_CONTEXT).commit([0])
    with pytest.raises(ManifestError, match="re-export with --max-context 512"):
        open_engine(engine.dir, max_context=512)


def test_from_engine_refuses_a_tree_larger_than_the_engine(engine):
    with pytest.raises(ShapeError, match="max tree size 16"):
        Generator.from_engine(engine.dir, method="ngram", max_nodes=MAX_TREE + 4)


def test_from_pretrained_and_from_engine_match_torch(tiny_dir, artifacts):
    reference = Generator.from_pretrained(tiny_dir, max_context=512)
    ort = Generator.from_pretrained(tiny_dir, backend="onnxruntime", max_context=512)
    engine_dir = artifacts / "engines" / tiny_dir.name / "cpu" / "vanilla"
    assert ort.backend.manifest.dir == engine_dir and (engine_dir / "manifest.json").is_file()
    from_dir = Generator.from_engine(engine_dir)
    ngram = Generator.from_engine(engine_dir, method="ngram")
    for prompt in PROMPTS:
        want = reference.generate(prompt, max_new_tokens=24).token_ids
        assert len(set(want)) > 3  # the tiny model's text varies, so a wrong step shows
        for gen in (ort, from_dir, ngram):
            assert gen.generate(prompt, max_new_tokens=24).token_ids == want


def test_from_pretrained_reexports_a_stale_engine(tiny_dir, artifacts, tmp_path, real_model_dir):
    Generator.from_pretrained(tiny_dir, backend="onnxruntime", max_context=512)
    engine_dir = artifacts / "engines" / tiny_dir.name / "cpu" / "vanilla"
    manifest = json.loads((engine_dir / "manifest.json").read_text())
    manifest["model"]["fingerprint"] = "0" * 16                 # as if exported from another checkpoint
    (engine_dir / "manifest.json").write_text(json.dumps(manifest))
    gen = Generator.from_pretrained(tiny_dir, backend="onnxruntime", max_context=512)
    assert gen.backend.manifest.model.fingerprint == model_fingerprint(tiny_dir)


def test_tiny_ppd_on_onnxruntime_is_lossless(tiny_dir, artifacts, tmp_path):
    hidden = load_checkpoint(tiny_dir)[0].config.hidden_size
    torch.manual_seed(1)
    checkpoint = save_prompt_tokens(tmp_path / "ppd.safetensors", torch.randn(4, hidden), PPDConfig(2, 2),
                                    model_fingerprint(tiny_dir), dtype=torch.float32)
    tree = tmp_path / "tree.json"
    tree.write_text(json.dumps(TREES))
    options = {"checkpoint": str(checkpoint), "tree": str(tree)}
    vanilla = Generator.from_pretrained(tiny_dir, max_context=512)
    ppd = Generator.from_pretrained(tiny_dir, method="ppd", backend="onnxruntime", max_context=512, **options)
    engine_dir = artifacts / "engines" / tiny_dir.name / "cpu" / "ppd"
    assert ppd.backend.manifest.dir == engine_dir and ppd.backend.info.num_extra_tokens == 4
    from_dir = Generator.from_engine(engine_dir, **options)
    for prompt in PROMPTS:
        want = vanilla.generate(prompt, max_new_tokens=24).token_ids
        assert ppd.generate(prompt, max_new_tokens=24).token_ids == want
        assert from_dir.generate(prompt, max_new_tokens=24).token_ids == want
    # Other prompt tokens than the ones in the graph are refused, not silently mixed.
    other = save_prompt_tokens(tmp_path / "other.safetensors", torch.randn(4, hidden), PPDConfig(2, 2),
                               model_fingerprint(tiny_dir), dtype=torch.float32)
    with pytest.raises(ValueError, match="not the ones exported"):
        Generator.from_engine(engine_dir, checkpoint=str(other), tree=str(tree))


def test_engine_dir_carries_its_ppd_tree(tiny_dir, artifacts, tmp_path):
    """`make engine` installs the device's tree into the engine dir; from_engine runs it by default."""
    from export.engine import engine_tree_path, install_tree

    hidden = load_checkpoint(tiny_dir)[0].config.hidden_size
    checkpoint = save_prompt_tokens(tmp_path / "ppd.safetensors", torch.randn(4, hidden), PPDConfig(2, 2),
                                    model_fingerprint(tiny_dir), dtype=torch.float32)
    tree = tmp_path / "tree.json"
    tree.write_text(json.dumps(TREES))
    ppd = Generator.from_pretrained(tiny_dir, method="ppd", backend="onnxruntime", max_context=512,
                                    checkpoint=str(checkpoint), tree=str(tree))
    installed = install_tree(ppd.backend.manifest, tree)
    assert installed == engine_tree_path(ppd.backend.manifest) == ppd.backend.manifest.dir / "ppd-tree.json"
    from_dir = Generator.from_engine(ppd.backend.manifest.dir, checkpoint=str(checkpoint))  # no tree: the installed one
    assert from_dir.proposer.trees == ppd.proposer.trees
    # A tree without prompt-token chains where the installed one has them would change the layout.
    assert from_dir.proposer.max_draft_tokens == ppd.proposer.max_draft_tokens


def test_a_closed_backend_has_released_its_session_and_refuses_to_step(engine):
    """close() frees the onnxruntime session (no reference left for the garbage collector to find
    later) and the cache; using the backend afterwards is a clear error, closing again is harmless."""
    backend = open_engine(engine.dir, max_context=MAX_CONTEXT)
    backend.step(Draft.chain([1, 2, 3]))
    # The C++ session and its IOBinding (which holds the C++ session, not the Python wrapper).
    natives = [weakref.ref(backend.session._sess), weakref.ref(backend._binding._iobinding)]
    backend.close()
    gc.collect()
    assert [ref() for ref in natives] == [None, None]
    with pytest.raises(BackendClosedError, match="was closed"):
        backend.step(Draft.chain([1, 2, 3]))
    with pytest.raises(BackendClosedError, match="was closed"):
        backend.commit([0])
    backend.close()


def test_a_generator_is_a_context_manager_that_releases_its_engine(engine):
    with Generator.from_engine(engine.dir, method="ngram") as gen:
        session = weakref.ref(gen.backend.session._sess)
        assert gen.generate("Hello", max_new_tokens=4).token_ids
    gc.collect()
    assert session() is None
    with pytest.raises(BackendClosedError, match="load the engine again"):
        gen.generate("Hello", max_new_tokens=4)
