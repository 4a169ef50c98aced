"""The TensorRT backend: alignment rules, the refusal of an engine built elsewhere (before any plan
byte is deserialized), and the binding logic run on the CPU through a stand-in TensorRT that executes
the bound pointers with onnxruntime (tests/export/fake_tensorrt.py). The real engine is tested only
where tensorrt and a CUDA GPU are present."""

from __future__ import annotations

import dataclasses
import gc
import shutil
import weakref

import numpy as np
import pytest
import torch

import export.engine
from export.manifest import ManifestError
from export.onnx_export import ExportConfig, export_onnx
from export.trt.build import build_engine
from export.trt.key import PLAN_NAME, DeviceFacts, EngineMismatchError, EngineRecord
from runtime import Generator
from runtime.backends import BackendClosedError
from runtime.backends.ort_backend import OrtBackend
from runtime.loading import find_trt_engine, open_backend, open_engine, tensorrt_graph
from runtime.methods import engine_method
from runtime.backends.aligned import ALIGNMENT, TrtRuntimeError, aligned_cache, aligned_empty, aligned_rows, check_address
from runtime.backends.trt_backend import TrtBackend
from runtime.draft import Draft, Layout
from runtime.generator import eos_token_ids
from tests.export.fake_tensorrt import FakeStreams, FakeTensorRT

MAX_CONTEXT, MAX_TREE = 256, 16
H100 = DeviceFacts("NVIDIA H100 80GB HBM3", "9.0", 132, "10.16.1.11")
PROMPTS = ["Hello", "Write a poem about the sea", "1 2 3 4 5 6 1 2 3 4 5 6"]


def binary_tree(size: int) -> Layout:
    return Layout.from_parents([-1] + [(i - 1) // 2 for i in range(1, size)])


@pytest.fixture(scope="module")
def engine(tiny_dir, tmp_path_factory):
    """A tiny fp32 export with a (stand-in) TensorRT engine built beside it for H100."""
    out = tmp_path_factory.mktemp("engines") / "vanilla"
    manifest = export_onnx(ExportConfig(tiny_dir, out, max_context=MAX_CONTEXT, max_tree=MAX_TREE, validate=False),
                           log=lambda _: None)
    build_engine(manifest, "h100", 5, trt=FakeTensorRT(), device=H100, log=lambda _: None)
    return manifest


def fake_backend(manifest, trt: FakeTensorRT | None = None, facts: DeviceFacts = H100,
                 max_context: int | None = None, max_batch: int | None = None,
                 streams: FakeStreams | None = None) -> TrtBackend:
    """The loader (engine.json's key and the plan's hash checked against `facts`), then the backend on the
    stand-in TensorRT."""
    graph = tensorrt_graph(manifest, "cpu", max_context, facts=facts)
    return TrtBackend(graph, "cpu", tensorrt=trt or FakeTensorRT(), max_batch=max_batch, streams=streams)


# --- alignment ---------------------------------------------------------------------------------------
def test_check_address_refuses_null_and_unaligned_pointers():
    check_address("past_key.0", 0x7F0000000100)
    with pytest.raises(TrtRuntimeError, match="null pointer"):
        check_address("past_key.0", 0)
    with pytest.raises(TrtRuntimeError, match="not 256-byte aligned \\(offset 64\\)"):
        check_address("past_key.3", 0x7F0000000140)


@pytest.mark.parametrize("rows, row_bytes", [(101, 384), (2048, 384), (7, 256), (5, 4), (33, 96), (1, 1000)])
def test_aligned_rows_is_the_fewest_rows_that_keep_blocks_aligned(rows, row_bytes):
    got = aligned_rows(rows, row_bytes)
    assert got >= rows and got * row_bytes % ALIGNMENT == 0
    assert not any(r * row_bytes % ALIGNMENT == 0 for r in range(rows, got))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.int64])
def test_aligned_empty_starts_on_a_256_byte_boundary(dtype):
    for numel in (1, 3, 1000):
        tensor = aligned_empty(numel, dtype, torch.device("cpu"))
        assert tensor.data_ptr() % ALIGNMENT == 0 and tensor.numel() == numel and tensor.dtype == dtype


def test_every_layer_block_of_the_cache_is_aligned_for_any_max_context():
    cache = aligned_cache(3, 101, 3, 64, torch.float16, torch.device("cpu"))   # 101 rows x 384 bytes: odd
    assert cache.max_context == cache.capacity == 101 and cache.keys.shape[1] >= 101
    for block in (*cache.keys, *cache.values):
        assert block.data_ptr() % ALIGNMENT == 0 and block.is_contiguous()
    new = torch.ones(3, 101, 3, 64, dtype=torch.float16)
    slot = cache.open()
    cache.commit(slot, new, new, range(101))
    with pytest.raises(ValueError, match="max_context 101"):
        cache.check_room(slot, 1)                                                # padding rows are never used


# --- refusals before deserializing ---------------------------------------------------------------------
@pytest.mark.parametrize("change, what", [
    (dict(tensorrt_version="11.4.0.106"), "TensorRT version"),
    (dict(compute_capability="8.9"), "compute capability"),
    (dict(gpu_name="NVIDIA L4"), "GPU: built with NVIDIA H100"),
])
def test_an_engine_built_elsewhere_is_refused_before_deserializing(engine, change, what):
    trt = FakeTensorRT()
    with pytest.raises(EngineMismatchError, match=f"{what}.*make engine GPU="):
        fake_backend(engine, trt, dataclasses.replace(H100, **change))
    assert trt.deserialized == 0


def test_an_engine_of_other_onnx_or_a_corrupt_plan_is_refused_before_deserializing(engine, tmp_path):
    copy = dataclasses.replace(engine, dir=shutil.copytree(engine.dir, tmp_path / "copy"))
    record = EngineRecord.load(copy.dir)
    trt = FakeTensorRT()
    other = dataclasses.replace(record.key, onnx={**record.key.onnx, "model.onnx": "0" * 64})
    dataclasses.replace(record, key=other).write(copy.dir)
    with pytest.raises(EngineMismatchError, match="ONNX file model.onnx"):
        fake_backend(copy, trt)
    record.write(copy.dir)
    plan = copy.dir / PLAN_NAME
    plan.write_bytes(plan.read_bytes()[:-1] + b" ")
    with pytest.raises(ManifestError, match="does not match the sha256"):
        fake_backend(copy, trt)
    assert trt.deserialized == 0


def test_a_plan_tensorrt_cannot_deserialize_raises_its_logged_reason(engine, tmp_path):
    copy = dataclasses.replace(engine, dir=shutil.copytree(engine.dir, tmp_path / "copy"))
    (copy.dir / PLAN_NAME).write_bytes(b"\x00not a plan")
    record = EngineRecord.load(copy.dir)
    from export.manifest import sha256_file

    plan = dataclasses.replace(record.plan, sha256=sha256_file(copy.dir / PLAN_NAME), size=11)
    dataclasses.replace(record, plan=plan).write(copy.dir)
    with pytest.raises(TrtRuntimeError, match="could not deserialize .* not a serialized engine"):
        fake_backend(copy)


def test_the_real_backend_needs_a_cuda_device(engine):
    with pytest.raises(ValueError, match="runs on a CUDA device"):
        tensorrt_graph(engine, "cpu")


def test_from_engine_picks_tensorrt_for_a_tensorrt_dir_on_cuda(engine):
    """On device cuda a dir with engine.json goes to TensorRT (here: not importable, so it says so);
    on the CPU the same dir runs its ONNX on onnxruntime."""
    if importlib_has("tensorrt"):
        pytest.skip("asserts the error of a machine without tensorrt")
    with pytest.raises(ImportError, match="tensorrt is not importable"):
        Generator.from_engine(engine.dir, device="cuda")
    assert isinstance(Generator.from_engine(engine.dir).backend, OrtBackend)


def importlib_has(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# --- static steps, run through the stand-in -------------------------------------------------------------
def test_every_step_runs_at_a_static_shape_and_matches_onnxruntime(engine):
    """Steps of every size run at one of the engine's static sizes (5 and 64 here) over all 256 cells, one
    context per size, and their real rows equal onnxruntime's dynamic step (fp32: to rounding)."""
    trt = FakeTensorRT()
    backends = [open_engine(engine.dir, max_context=MAX_CONTEXT), fake_backend(engine, trt, max_context=MAX_CONTEXT)]
    assert backends[1].info.step_sizes == (5, 64) and backends[1].info.max_step_tokens == 64
    rng = np.random.default_rng(0)
    steps = [(Layout.chain(30), None)] + [(binary_tree(t), [0, 1] if t > 1 else [0]) for t in (1, 5, 16, 3, 9, 2)]
    for layout, commit in steps:
        draft = Draft(rng.integers(0, engine.model.vocab_size, layout.size), layout)
        want, got = (b.step(draft) for b in backends)
        assert got.logits.shape == want.logits.shape and got.logits.dtype == want.logits.dtype
        torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5, msg=f"T={layout.size}")
        torch.testing.assert_close(got.positions, want.positions)
        for b in backends:
            b.commit(commit or list(range(layout.size)))
    assert backends[0].length == backends[1].length == 30 + 1 + 2 * 5
    kv = [MAX_CONTEXT, engine.model.num_kv_heads, engine.model.head_dim]
    runs = [(context.runs, size) for context, size in zip(trt.contexts, (5, 64))]
    assert [len(r) for r, _ in runs] == [4, 3]      # T = 1, 5, 3, 2 at 5; the prefill, 16 and 9 at 64
    assert all(shapes["input_ids"] == [size] and shapes["past_key.0"] == kv and shapes["past_mask"] == [size, kv[0]]
               for r, size in runs for _, shapes in r)


def test_each_size_is_captured_once_then_replayed_and_bound_once(engine):
    trt = FakeTensorRT()
    streams = FakeStreams(trt)
    backend = fake_backend(engine, trt, streams=streams)
    bound = [dict(context.addresses) for context in trt.contexts]
    backend.step(Draft.chain(np.arange(20)))
    backend.commit(range(20))
    for t in (3, 4, 5, 2):
        backend.step(Draft(np.arange(t), binary_tree(t)))
        backend.commit([0])
    assert (streams.captures, streams.replays) == (2, 5)     # two sizes used, five steps
    assert [dict(context.addresses) for context in trt.contexts] == bound   # nothing rebound after construction
    assert trt.pending[FakeStreams.HANDLE] == []


def test_reading_outputs_before_the_engine_stream_is_waited_for_reads_stale_outputs(engine):
    """The model of the stream rule: the caller's stream must wait for the engine's before the readout. A
    backend that skipped that wait (here: a stream that never orders the caller after the engine) reads
    outputs the engine has not written yet."""
    draft = Draft.chain(np.arange(12))
    want = open_engine(engine.dir, max_context=MAX_CONTEXT).step(draft).logits.clone()
    trt = FakeTensorRT()
    ordered = fake_backend(engine, trt, streams=FakeStreams(trt)).step(draft).logits
    torch.testing.assert_close(ordered, want, atol=1e-5, rtol=1e-5)
    trt = FakeTensorRT()
    unordered = fake_backend(engine, trt, streams=FakeStreams(trt, order_after_engine=False))
    unordered._buffers["logits"].fill_(float("nan"))
    assert torch.isnan(unordered.step(draft).logits).all()


def test_fp16_engines_bind_fp16_buffers(tiny_dir, tmp_path):
    manifest = export_onnx(ExportConfig(tiny_dir, tmp_path / "fp16", dtype="fp16", max_context=MAX_CONTEXT,
                                        max_tree=MAX_TREE, validate=False), log=lambda _: None)
    build_engine(manifest, "h100", 5, trt=FakeTensorRT(), device=H100, log=lambda _: None)
    backends = [open_engine(manifest.dir, max_context=MAX_CONTEXT), fake_backend(manifest, FakeTensorRT())]
    draft = Draft.chain(np.arange(7))
    want, got = (b.step(draft).logits for b in backends)
    assert got.dtype == torch.float16 and backends[1]._buffers["past_mask"].dtype == torch.float16
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=1e-2)


def test_steps_outside_the_engine_are_refused(engine):
    backend = fake_backend(engine, max_context=MAX_CONTEXT)
    with pytest.raises(ValueError, match="exceeds this engine's largest static step \\(64 nodes\\)"):
        backend.step(Draft.chain(np.arange(65)))
    with pytest.raises(ManifestError, match="hold 1 sequence\\(s\\) of max_context 256, not 2"):
        fake_backend(engine, max_batch=2)
    with pytest.raises(ManifestError, match="re-export with --max-context 512"):
        fake_backend(engine, max_context=512)


def test_output_shapes_come_from_the_engine_and_a_mismatch_is_refused(engine, monkeypatch):
    """The backend asks each context for its output shapes (get_tensor_shape) rather than trusting the
    manifest: an engine whose logits come out at another width is refused, naming the fix."""
    from tests.export.fake_tensorrt import Context

    backend = fake_backend(engine, max_context=MAX_CONTEXT)   # shapes that agree: accepted
    assert backend.info.step_sizes == (5, 64)
    shape_of = Context.get_tensor_shape
    monkeypatch.setattr(Context, "get_tensor_shape",
                        lambda self, name: (*shape_of(self, name)[:-1], 7) if name == "logits" else shape_of(self, name))
    with pytest.raises(TrtRuntimeError, match="the engine's logits is \\[5, 7\\] at T=5 over 256 cells"):
        fake_backend(engine, max_context=MAX_CONTEXT)


def test_generation_on_the_trt_backend_equals_onnxruntime(engine):
    """Through the decode loop: prompts longer than the largest static step are prefilled in chunks."""
    reference = Generator.from_engine(engine.dir, method="ngram")
    built = engine_method(engine, "ngram")
    trt = Generator(fake_backend(engine), reference.tokenizer, built.proposer, eos_token_ids(reference.tokenizer))
    long = " ".join(PROMPTS * 5)
    assert len(reference.encode(long)) > 64
    for prompt in [*PROMPTS, long]:
        want = reference.generate(prompt, max_new_tokens=24)
        got = trt.generate(prompt, max_new_tokens=24)
        assert got.token_ids == want.token_ids, prompt
        chunks = -(-len(reference.encode(prompt)) // 64)
        assert got.stats.steps == want.stats.steps + chunks - 1


def test_the_engine_for_this_gpu_is_found_by_its_key(engine, tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(export.engine, "ARTIFACTS_DIR", tmp_path / "artifacts")
    with pytest.raises(EngineMismatchError, match="none under .*make engine GPU=nvidia-h100-80gb-hbm3"):
        find_trt_engine(tiny_dir, "vanilla", None, H100)
    for target, facts in (("a100", dataclasses.replace(H100, gpu_name="NVIDIA A100-SXM4-80GB")), ("h100", H100)):
        directory = export.engine.engine_dir(tiny_dir, target, "vanilla")
        shutil.copytree(engine.dir, directory)
        copy = dataclasses.replace(engine, dir=directory)
        build_engine(copy, target, 5, trt=FakeTensorRT(), device=facts, force=True, log=lambda _: None)
    assert find_trt_engine(tiny_dir, "vanilla", None, H100).dir == export.engine.engine_dir(tiny_dir, "h100", "vanilla")
    with pytest.raises(EngineMismatchError, match="refused: .*a100/vanilla: GPU: built with NVIDIA A100"):
        find_trt_engine(tiny_dir, "vanilla", None, dataclasses.replace(H100, gpu_name="NVIDIA H200"))
    with pytest.raises(EngineMismatchError, match="trained tensors"):
        find_trt_engine(tiny_dir, "vanilla", "ab" * 32, H100)


# --- the real thing ----------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none visible to torch)")
def test_real_tensorrt_engine_matches_onnxruntime(tiny_dir, tmp_path):
    """Build an fp16 engine of the tiny model with the real TensorRT and compare its steps with
    onnxruntime (CPU) running the same fp16 ONNX."""
    pytest.importorskip("tensorrt", reason="tensorrt is not installed (pip install .[tensorrt])")
    manifest = export_onnx(ExportConfig(tiny_dir, tmp_path / "engine", dtype="fp16", max_context=MAX_CONTEXT,
                                        max_tree=MAX_TREE, validate=False), log=lambda _: None)
    build_engine(manifest, "test", 5)
    backends = [open_engine(manifest.dir, max_context=MAX_CONTEXT), open_backend(tensorrt_graph(manifest, "cuda", MAX_CONTEXT))]
    # fp16 parity: TensorRT's fp16 kernels against onnxruntime's on the same fp16 ONNX; logits within
    # 3e-2 + 1e-2 x |logit|, and the argmax equal wherever the top two are more than 5e-2 apart.
    rng = np.random.default_rng(0)
    steps = [(Layout.chain(30), None)] + [(binary_tree(t), [0, 1] if t > 1 else [0]) for t in (1, 5, 16, 3)]
    for layout, commit in steps:
        draft = Draft(rng.integers(0, manifest.model.vocab_size, layout.size), layout)
        want, got = (b.step(draft).logits.float().cpu() for b in backends)
        torch.testing.assert_close(got, want, atol=3e-2, rtol=1e-2, msg=f"T={layout.size}")
        gap = want.topk(2).values
        clear = (gap[:, 0] - gap[:, 1]) > 5e-2            # argmax agrees wherever the top two are not a tie
        assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear]), f"T={layout.size}"
        for b in backends:
            b.commit(commit or list(range(layout.size)))


def test_a_closed_backend_has_released_its_context_and_engine(engine):
    trt = FakeTensorRT()
    backend = fake_backend(engine, trt, max_context=MAX_CONTEXT)
    backend.step(Draft.chain(np.arange(5)))
    trt.contexts.clear()   # the stand-in's own list of the contexts it made (other tests read their runs)
    released = [weakref.ref(backend.contexts[0]), weakref.ref(backend.engine)]
    with backend:
        pass
    gc.collect()
    assert [ref() for ref in released] == [None, None]
    with pytest.raises(BackendClosedError, match="was closed"):
        backend.step(Draft.chain(np.arange(5)))
