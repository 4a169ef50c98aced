"""Static steps (export/static_steps.py, runtime/backends/packing.py): every step padded to one of a few
T over every cell of the cache, as GPUs run them. On the CPU they must give every real row what the
dynamic step gives it (to rounding; bitwise in the row-exact quantized graphs), no padded row or masked
cell may reach a real row, and every method on static steps must stay token-identical to vanilla on
the same static steps. Tiny random Llama (torch, onnxruntime fp32 and int8) and the real SmolLM2."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoConfig

from export.checkpoint import load_checkpoint
from export.manifest import Manifest, ShapeError
from export.onnx_export import ExportConfig, export_onnx
from export.static_steps import step_sizes
from export.step_model import StepModel
from runtime import Generator
from runtime.backends.base import StepTensors
from runtime.backends.torch_backend import TorchBackend
from runtime.draft import Draft, Layout
from runtime.loading import engine_graph, load_pretrained, open_backend
from runtime.methods import build_method
from tests.conftest import TRAINED_FIXTURES, first_difference
from tests.export.test_quantize import int8_onnx  # noqa: F401 (fixture)
from tools.bench.prompts import load_prompts

MAX_CONTEXT, MAX_TREE = 256, 16
SIZES = (5, 16, 64)          # static step sizes of the tiny backends: the tree of 5, 3 x 5 packed, prefill


@pytest.fixture(scope="module")
def fp32_onnx(tiny_dir, tmp_path_factory) -> Manifest:
    out = tmp_path_factory.mktemp("engines") / "vanilla"
    return export_onnx(ExportConfig(tiny_dir, out, max_context=MAX_CONTEXT, max_tree=MAX_TREE), log=lambda _: None)


def tiny_backend(kind: str, tiny_dir, manifest: Manifest | None, static: bool):
    sizes = SIZES if static else None
    if kind == "torch":
        hf, _ = load_checkpoint(tiny_dir)
        return TorchBackend(StepModel(hf), MAX_CONTEXT, max_batch=3, step_sizes=sizes)
    return open_backend(engine_graph(manifest, "cpu", MAX_CONTEXT), "cpu", max_batch=3, step_sizes=sizes)


def binary_tree(size: int) -> Layout:
    return Layout.from_parents([-1] + [(i - 1) // 2 for i in range(1, size)])


def run_script(backend, vocab: int, seed: int = 0, tamper=None) -> list[torch.Tensor]:
    """A fixed script of steps: three sequences, prefills of different lengths (one alone, two packed), then
    packed trees with a few nodes committed each (so later steps read every commit), one sequence closed
    half-way (its cells freed, then reused). The real rows' logits of every step, in order. `tamper(inputs,
    real)` may change a static step's inputs before it runs (`real`: the number of real rows)."""
    if tamper is not None:
        run = backend._run

        def tampered(inputs: StepTensors):
            tamper(backend, inputs, real[0])
            return run(inputs)
        backend._run, real = tampered, [0]
    rng = np.random.default_rng(seed)
    slots = [backend.open_sequence() for _ in range(3)]
    rounds = [[(0, Layout.chain(30))], [(1, Layout.chain(12)), (2, Layout.chain(7))]]
    rounds += [[(s, binary_tree(t)) for s, t in zip(range(3), sizes)] for sizes in ((5, 3, 1), (1, 5, 5), (5, 5, 2))]
    rounds += [[(1, binary_tree(5)), (2, binary_tree(4))], [(0, Layout.chain(9)), (2, binary_tree(5))]]
    logits = []
    for number, work in enumerate(rounds):
        if number == 5:   # sequence 0 leaves; a new one takes its place (and its freed cells)
            backend.close_sequence(slots[0])
            slots[0] = backend.open_sequence()
        drafts = [(slots[s], Draft(rng.integers(0, vocab, layout.size), layout)) for s, layout in work]
        if tamper is not None:
            real[0] = sum(d.size for _, d in drafts)
        outputs = backend.step_batch(drafts)
        logits += [o.logits.clone() for o in outputs]
        backend.commit_batch([(slot, [0, 1][: draft.size]) for slot, draft in drafts])
    if tamper is not None:
        backend._run = run
    return logits


@pytest.mark.parametrize("kind", ["torch", "onnxruntime"])
def test_the_static_step_gives_every_real_row_the_dynamic_steps_logits(kind, tiny_dir, fp32_onnx):
    backends = [tiny_backend(kind, tiny_dir, fp32_onnx, static) for static in (False, True)]
    assert backends[1].info.step_sizes == SIZES and backends[0].info.step_sizes is None
    vocab = backends[0].info.vocab_size
    dynamic, static = (run_script(b, vocab) for b in backends)
    assert len(dynamic) == len(static) == 16
    for number, (want, got) in enumerate(zip(dynamic, static)):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5, msg=f"{kind}, output {number}")
        assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_in_the_row_exact_quantized_graph_static_and_dynamic_rows_are_bitwise_equal(int8_onnx, tiny_dir):  # noqa: F811
    """The int8 graph's attention is row-exact (export/quantize.py): a row's logits do not depend on how
    many cells or rows the step binds, so padding to a static shape changes no bit."""
    backends = [tiny_backend("onnxruntime", tiny_dir, int8_onnx, static) for static in (False, True)]
    dynamic, static = (run_script(b, b.info.vocab_size) for b in backends)
    assert all(torch.equal(got, want) for got, want in zip(static, dynamic))


def garbage_everywhere_unseen(backend, inputs: StepTensors, real: int) -> None:
    """Large finite garbage in every cell no sequence owns and random tokens in the padded rows."""
    cache = backend._cache
    free = torch.from_numpy(cache.positions < 0)
    generator = torch.Generator().manual_seed(inputs.size)
    for layer in range(len(cache.keys)):
        shape = cache.keys[layer][free].shape
        cache.keys[layer][free] = (torch.rand(shape, generator=generator) * 2e4 - 1e4).to(cache.keys.dtype)
        cache.values[layer][free] = (torch.rand(shape, generator=generator) * 2e4 - 1e4).to(cache.values.dtype)
    inputs.ids[real:] = torch.randint(0, backend.info.vocab_size, (inputs.size - real,), generator=generator)


@pytest.mark.parametrize("kind", ["torch", "onnxruntime"])
def test_no_padded_row_and_no_masked_cell_reaches_a_real_row(kind, tiny_dir, fp32_onnx):
    """Same static shapes, so any change in a real row comes from what it must not see: bitwise equal."""
    backend = tiny_backend(kind, tiny_dir, fp32_onnx, True)
    clean = run_script(backend, backend.info.vocab_size)
    backend = tiny_backend(kind, tiny_dir, fp32_onnx, True)
    dirty = run_script(backend, backend.info.vocab_size, tamper=garbage_everywhere_unseen)
    assert all(torch.equal(got, want) for got, want in zip(dirty, clean))

    def unmasked(backend, inputs: StepTensors, real: int) -> None:   # the check itself can fail:
        garbage_everywhere_unseen(backend, inputs, real)              # with the past mask gone, garbage shows
        inputs.past_mask.zero_()
    leaky = run_script(tiny_backend(kind, tiny_dir, fp32_onnx, True), backend.info.vocab_size, tamper=unmasked)
    assert not all(torch.equal(got, want) for got, want in zip(leaky, clean))


def test_static_steps_refuse_what_they_cannot_hold(tiny_dir, fp32_onnx):
    backend = tiny_backend("onnxruntime", tiny_dir, fp32_onnx, True)
    slot = backend.open_sequence()
    with pytest.raises(ValueError, match="exceeds this engine's largest static step \\(64 nodes\\)"):
        backend.step_batch([(slot, Draft.chain(list(range(65))))])
    with pytest.raises(ShapeError, match="takes steps of"):
        open_backend(engine_graph(fp32_onnx, "cpu", MAX_CONTEXT), "cpu", step_sizes=(5, 10_000))
    assert step_sizes(5, 3) == (5, 10, 15, 64)


def test_the_generator_prefills_long_prompts_in_static_chunks(tiny_dir, fp32_onnx):
    """A prompt longer than the largest static step goes in chunks; the tokens are the dynamic run's."""
    prompt = " ".join(f"word{i}" for i in range(30))
    dynamic = Generator.from_engine(fp32_onnx.dir, max_context=MAX_CONTEXT)
    static = Generator.from_engine(fp32_onnx.dir, max_context=MAX_CONTEXT, static_steps=True)
    assert static.backend.info.step_sizes == step_sizes(1) and len(static.encode(prompt)) > 64
    want = dynamic.generate(prompt, max_new_tokens=16).token_ids
    assert static.generate(prompt, max_new_tokens=16).token_ids == want


# --- the real model -----------------------------------------------------------------------------------
REAL_CONTEXT = 512   # every static step binds every cell: a small cache keeps the CPU tests quick


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_real_model_static_rows_match_dynamic(backend, real_model_dir):
    config = AutoConfig.from_pretrained(real_model_dir)
    method = build_method("vanilla", real_model_dir, config.vocab_size, config.hidden_size, backend=backend)
    runners = [load_pretrained(backend, real_model_dir, method, max_context=REAL_CONTEXT, max_batch=3,
                               static_steps=static)[0] for static in (False, True)]
    dynamic, static = (run_script(r, r.info.vocab_size, seed=1) for r in runners)
    for number, (want, got) in enumerate(zip(dynamic, static)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=f"{backend}, output {number}")
        assert torch.equal(got.argmax(-1), want.argmax(-1))


def real_static_lossless(backend: str, model_dir, methods, prompts, new_tokens: int) -> list[str]:
    """Mismatches of each method on static steps against vanilla on the same static steps."""
    def generator(method: str) -> Generator:
        return Generator.from_pretrained(model_dir, method=method, backend=backend, max_context=REAL_CONTEXT,
                                         static_steps=True)
    vanilla = generator("vanilla")
    want = {item.id: vanilla.generate(item.prompt, max_new_tokens=new_tokens).token_ids for item in prompts}
    bad = []
    for method in methods:
        gen = generator(method)
        assert gen.backend.info.step_sizes is not None
        for item in prompts:
            first = first_difference(gen.generate(item.prompt, max_new_tokens=new_tokens).token_ids, want[item.id])
            if first is not None:
                bad.append(f"{method} {item.id}: first difference at new token {first}")
    return bad


def real_prompts(count: int):
    return [p for pair in zip(load_prompts("mtbench", limit=count), load_prompts("humaneval", limit=count))
            for p in pair][:count]


def methods_on_static_steps(backend: str, model_dir, request, count: int, new_tokens: int) -> None:
    methods = ["ngram", "ppd", "hybrid", "ht"]
    for fixture in {TRAINED_FIXTURES[m] for m in methods if m in TRAINED_FIXTURES}:
        request.getfixturevalue(fixture)
    bad = real_static_lossless(backend, model_dir, methods, real_prompts(count), new_tokens)
    assert not bad, f"methods on static {backend} steps that differ from vanilla: {bad}"


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_real_model_every_method_on_static_steps_equals_vanilla_on_them(backend, real_model_dir, request):
    methods_on_static_steps(backend, real_model_dir, request, 2, 32)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_real_model_every_method_on_static_steps_equals_vanilla_on_them_20_prompts(backend, real_model_dir, request):
    methods_on_static_steps(backend, real_model_dir, request, 20, 64)
