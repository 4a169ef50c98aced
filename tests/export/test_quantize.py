"""Weight-only quantized engine variants (export/quantize.py) on a tiny random Llama: the manifest
records, engine dirs per variant, staleness, refusing mixed variants, the CLI, row independence."""

from __future__ import annotations

import collections
import json

import numpy as np
import onnx
import pytest
import torch

import export.engine
from export.__main__ import main as export_main
from export.engine import engine_dir, prepare_engine, stale_reason
from export.manifest import Manifest, ManifestError
from export.methods import MethodExtras
from export.onnx_export import ExportConfig
from export.quantize import ROW_EXACT_ATTENTION, SCHEMES, QuantScheme, VariantError, engine_variant, quantize_export
from export.row_independence import (ROW_TOLERANCES, StepRunner, binary_tree_parents, check_batch_independence,
                                     check_row_independence, pad_rows,
                                     tree_mask)
from runtime import Generator
from runtime.loading import open_engine
from runtime.draft import Draft

MAX_CONTEXT, MAX_TREE = 256, 16
CONTEXT_FLAGS = ["--max-context", str(MAX_CONTEXT), "--max-tree", str(MAX_TREE)]


@pytest.fixture(scope="module")
def int8_onnx(tiny_dir, tmp_path_factory) -> Manifest:
    """`python -m export onnx --quantize int8`: the fp32 export is made in a temp dir and removed."""
    out = tmp_path_factory.mktemp("onnx") / "int8"
    assert export_main(["onnx", "--model", str(tiny_dir), "--out", str(out), "--quantize", "int8", *CONTEXT_FLAGS]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["int8"]   # no temp dir left behind
    return Manifest.load(out)


@pytest.fixture
def artifacts(tmp_path, monkeypatch):
    monkeypatch.setattr(export.engine, "ARTIFACTS_DIR", tmp_path / "artifacts")
    return tmp_path / "artifacts"


def test_manifest_records_the_quantization(int8_onnx):
    record = int8_onnx.quantization
    scheme = SCHEMES["int8"]
    assert engine_variant(int8_onnx) == "int8"
    assert {k: record[k] for k in ("variant", "scheme", "bits", "block_size", "accuracy_level")} == {
        "variant": "int8", "scheme": "MatMulNBits", "bits": 8, "block_size": scheme.block_size,
        "accuracy_level": scheme.accuracy_level}
    assert record["quantized_sha256"] == int8_onnx.onnx.sha256 and record["source_sha256"] != int8_onnx.onnx.sha256
    assert record["row_independence"]["ok"] and record["batch_independence"]["ok"]
    graph = onnx.load(str(int8_onnx.onnx_path), load_external_data=False)
    ops = collections.Counter(n.op_type for n in graph.graph.node)
    # 2 layers x (qkv, o, gate_up, down) + the LM head; the embedding Gather keeps the fp32 [H, V] table.
    assert record["quantized_matmuls"] == ops["MatMulNBits"] == 9
    assert any(n.op_type == "Gather" and n.input[0] == "step.lm_head_t" for n in graph.graph.node)
    assert (int8_onnx.dir / "tokenizer.json").is_file()


def test_engine_dirs_per_variant_and_staleness(tiny_dir, artifacts):
    int4 = prepare_engine(tiny_dir, "vanilla", MethodExtras(), max_context=MAX_CONTEXT, max_tree=MAX_TREE,
                          variant="int4")
    fp32_dir = engine_dir(tiny_dir, "cpu", "vanilla")
    assert int4.dir == fp32_dir.with_name("vanilla-int4") and engine_variant(int4) == "int4"
    # Its source is a row-exact fp32 export made in a temp dir (the fp32 engine keeps the ordinary attention).
    assert int4.quantization["row_exact"] == ROW_EXACT_ATTENTION and int4.ort_optimized is not None
    assert sorted(p.name for p in int4.dir.parent.iterdir()) == ["vanilla-int4"]
    fp32 = prepare_engine(tiny_dir, "vanilla", MethodExtras(), max_context=MAX_CONTEXT, max_tree=MAX_TREE)
    assert "row_exact_attention" not in fp32.exporter and int4.quantization["source_sha256"] != fp32.onnx.sha256
    # 4-bit layers and an 8-bit LM head, as llama.cpp's q4_1 (its peer) keeps the tied embedding / head at q8_0.
    graph = onnx.load(str(int4.onnx_path), load_external_data=False).graph
    bits = {n.output[0]: next(a.i for a in n.attribute if a.name == "bits") for n in graph.node
            if n.op_type == "MatMulNBits"}
    assert int4.quantization["head_bits"] == 8 and bits.pop("logits") == 8
    assert len(bits) == 8 and set(bits.values()) == {4}

    config = ExportConfig(tiny_dir, int4.dir, max_context=MAX_CONTEXT, max_tree=MAX_TREE, variant="int4")
    assert stale_reason(int4.dir, config, MethodExtras()) is None
    assert stale_reason(int4.dir, ExportConfig(tiny_dir, int4.dir, max_context=MAX_CONTEXT, max_tree=MAX_TREE,
                                               variant="int8"), MethodExtras()) == "variant is 'int4', wanted 'int8'"
    assert "variant is 'fp32'" in stale_reason(fp32_dir, config, MethodExtras())
    data = json.loads((int4.dir / "manifest.json").read_text())
    original = json.dumps(data)
    data["quantization"]["row_exact"] = True                             # the all-fp64 attention of an older build
    (int4.dir / "manifest.json").write_text(json.dumps(data))
    assert "'row_exact': True" in stale_reason(int4.dir, config, MethodExtras())
    data = json.loads(original)
    del data["quantization"]["head_bits"]                                # a build from before the 8-bit head
    (int4.dir / "manifest.json").write_text(json.dumps(data))
    assert "'head_bits': None" in stale_reason(int4.dir, config, MethodExtras())
    data = json.loads(original)
    data["quantization"]["block_size"] = 128                             # as if made by another scheme
    (int4.dir / "manifest.json").write_text(json.dumps(data))
    assert stale_reason(int4.dir, config, MethodExtras()).startswith("quantization is")
    again = prepare_engine(tiny_dir, "vanilla", MethodExtras(), max_context=MAX_CONTEXT, max_tree=MAX_TREE,
                           variant="int4")
    assert again.quantization["block_size"] == SCHEMES["int4"].block_size


def test_level_4_refuses_a_graph_without_row_exact_attention(tiny_dir, artifacts, tmp_path):
    fp32 = prepare_engine(tiny_dir, "vanilla", MethodExtras(), max_context=MAX_CONTEXT, max_tree=MAX_TREE)
    with pytest.raises(ManifestError, match="needs an fp32 graph exported with row-exact attention"):
        quantize_export(fp32, tmp_path / "int4", "int4", log=lambda _: None)
    assert not (tmp_path / "int4").exists()
    with pytest.raises(ValueError, match="needs row-exact attention"):
        QuantScheme(4, accuracy_level=4, row_exact=False)
    with pytest.raises(ValueError, match="head_bits must be 4, 8 or None"):
        QuantScheme(4, head_bits=6)


def test_the_lm_head_is_the_matmul_making_logits():
    from onnx import TensorProto, helper

    from export.quantize import lm_head_node

    def graph(op: str):
        node = helper.make_node(op, ["h", "w"], ["logits"], name="head")
        return helper.make_model(helper.make_graph(
            [node], "g", [helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 4])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 8])],
            [helper.make_tensor("w", TensorProto.FLOAT, [4, 8], [0.0] * 32)]))

    assert lm_head_node(graph("MatMul")) == "head"
    with pytest.raises(ValueError, match="one named MatMul making `logits`; the graph has Gemm 'head'"):
        lm_head_node(graph("Gemm"))


def test_a_variant_mismatch_is_refused(int8_onnx, tiny_dir):
    with pytest.raises(VariantError, match="holds the int8 variant of its graph, not fp32"):
        Generator.from_engine(int8_onnx.dir, variant="fp32")
    assert Generator.from_engine(int8_onnx.dir, variant="int8").backend.manifest.quantization is not None
    with pytest.raises(ValueError, match="torch backend has no int8 variant.*backend='onnxruntime'"):
        Generator.from_pretrained(tiny_dir, variant="int8")
    with pytest.raises(VariantError, match="unknown engine variant 'int3'"):
        Generator.from_pretrained(tiny_dir, backend="onnxruntime", variant="int3")


def test_cli_refuses_bad_quantize_values(tiny_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export_main(["onnx", "--model", str(tiny_dir), "--out", str(tmp_path / "x"), "--quantize", "int3"])
    assert exit_info.value.code == 2 and "invalid choice: 'int3'" in capsys.readouterr().err
    assert export_main(["engine", "--model", str(tiny_dir), "--target", "h100", "--quantize", "int8"]) == 2
    assert "--quantize int8 makes an onnxruntime engine" in capsys.readouterr().err
    assert export_main(["onnx", "--model", str(tiny_dir), "--out", str(tmp_path / "x"), "--quantize", "int8",
                        "--dtype", "fp16"]) == 2
    assert "quantizes the fp32 graph" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("variant", ["int8", "int4"])
def test_tree_rows_match_their_paths_alone(variant, tiny_dir, artifacts):
    """What the backend runs (the saved optimised graph): a T=15 tree step vs each node's own path alone."""
    manifest = prepare_engine(tiny_dir, "vanilla", MethodExtras(), max_context=MAX_CONTEXT, max_tree=MAX_TREE,
                              variant=variant)
    session = open_engine(manifest.dir).session
    rng = np.random.default_rng(1)
    vocab = manifest.model.vocab_size
    report = check_row_independence(session, manifest, rng.integers(0, vocab, 20).tolist(),
                                    rng.integers(0, vocab, 15).tolist(), binary_tree_parents(15),
                                    ROW_TOLERANCES[variant])
    assert report.ok, report.failures()


@pytest.mark.parametrize("variant", ["int8", "int4"])
def test_a_sequences_rows_do_not_depend_on_the_others_in_its_step(variant, tiny_dir, artifacts):
    """Batch invariance, bitwise: three sequences of other lengths packed into one step with their caches
    interleaved (and a one-node tree, which alone runs padded) give every row what it gives alone."""
    manifest = prepare_engine(tiny_dir, "vanilla", MethodExtras(), max_context=MAX_CONTEXT, max_tree=MAX_TREE,
                              variant=variant)
    session = open_engine(manifest.dir).session
    rng = np.random.default_rng(2)
    vocab = manifest.model.vocab_size
    prefixes = [rng.integers(0, vocab, n).tolist() for n in (20, 7, 33)]
    trees = [(rng.integers(0, vocab, n).tolist(), binary_tree_parents(n)) for n in (9, 1, 4)]
    report = check_batch_independence(session, manifest, prefixes, trees, ROW_TOLERANCES[variant])
    assert report.ok and report.max_abs_diff == 0.0, report.failures()
    assert len(report.rows) == 14
    assert manifest.quantization["batch_independence"]["ok"]      # the build checked it too

def test_tiny_variant_is_lossless_against_its_own_vanilla(tiny_dir, artifacts):
    vanilla = Generator.from_pretrained(tiny_dir, backend="onnxruntime", variant="int8", max_context=512)
    ngram = Generator.from_pretrained(tiny_dir, method="ngram", backend="onnxruntime", variant="int8", max_context=512)
    assert vanilla.backend.manifest.dir == ngram.backend.manifest.dir
    for prompt in ["Hello", "1 2 3 4 5 6 1 2 3 4 5 6"]:
        want = vanilla.generate(prompt, max_new_tokens=24).token_ids
        assert len(set(want)) > 3
        assert ngram.generate(prompt, max_new_tokens=24).token_ids == want


@pytest.mark.parametrize("variant", ["int8", "int4"])
def test_committing_in_other_chunks_changes_no_bit(variant, tiny_dir, artifacts):
    """Lossless against one-token decoding needs more than row independence within a step: a token
    committed by a tree step was computed with its ancestors among the step's new keys, one-token
    decoding had them in the cache. The quantized graphs (fp64 attention, export/step_model.py) give
    bitwise the same logits and KV whichever way a prefix is split into steps."""
    manifest = prepare_engine(tiny_dir, "vanilla", MethodExtras(), max_context=MAX_CONTEXT, max_tree=MAX_TREE,
                              variant=variant)
    runner = StepRunner(open_engine(manifest.dir).session, manifest)
    ids = np.random.default_rng(2).integers(0, manifest.model.vocab_size, 24).tolist()
    whole = runner.run(ids, range(24), tree_mask(list(range(-1, 23)), runner.dtype))
    logits, keys, values = [], [], []
    for start, stop in [(0, 9), (9, 10), (10, 17), (17, 24)]:          # a prefill, one token, two chains
        n = stop - start
        out = runner.run(ids[start:stop], range(start, stop), tree_mask(list(range(-1, n - 1)), runner.dtype))
        for i in range(manifest.model.num_layers):
            runner.past[f"past_key.{i}"] = np.concatenate([runner.past[f"past_key.{i}"], out[1][i]])
            runner.past[f"past_value.{i}"] = np.concatenate([runner.past[f"past_value.{i}"], out[2][i]])
        logits.append(out[0]), keys.append(out[1]), values.append(out[2])
    assert np.array_equal(np.concatenate(logits), whole[0])
    assert np.array_equal(np.concatenate(keys, axis=1), whole[1]) and np.array_equal(np.concatenate(values, axis=1), whole[2])


def test_pad_rows_appends_rows_the_real_ones_cannot_see():
    mask = tree_mask([-1], np.float32)
    ids, positions, padded = pad_rows(np.array([5]), np.array([9]), mask, 3)
    assert ids.tolist() == [5, 5, 5] and positions.tolist() == [9, 10, 11]
    assert (padded == 0).tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    same = pad_rows(np.array([5, 6]), np.array([9, 10]), tree_mask([-1, 0], np.float32), 2)
    assert same[0].tolist() == [5, 6] and same[2].shape == (2, 2)


@pytest.mark.parametrize("parents", [[-1], [-1, 0], [-1, 0, 0], [-1, 0, 1, 0]])
def test_pad_rows_pads_as_the_runtime_pads(parents):
    """The build's row check (pad_rows, numpy feeds) and the backends' packing (runtime/backends/packing.py)
    pad a small step by one rule: the same tokens, positions and visibility, the past seen as the last
    real row sees it."""
    import torch

    from runtime.backends.packing import plan_step
    from runtime.kv_cache import KVCache

    tokens, start, rows = np.arange(7, 7 + len(parents)), 30, 5
    cache = KVCache(1, 64, 1, 2)
    slot = cache.open()
    cache.commit(slot, torch.zeros(1, start, 1, 2), torch.zeros(1, start, 1, 2), range(start))
    draft = Draft.from_parents(tokens, parents)
    ids, positions, mask = pad_rows(tokens, draft.buffers.depth + start, tree_mask(parents, np.float32), rows)
    plan = plan_step([(slot, draft)], cache, float(np.finfo(np.float32).min), min_rows=rows)
    assert ids.tolist() == plan.tokens.tolist() and positions.tolist() == plan.positions.tolist()
    assert ((mask == 0) == (plan.tree_mask == 0)).all()
    assert (plan.past_mask == 0).all()


def test_int4_runs_one_node_steps_padded(tiny_dir, artifacts):
    """int4 records a minimum step of two rows (its one-row MatMulNBits kernel differs on AVX2 CPUs,
    export/quantize.py): the backend pads a one-node draft, and its row is bitwise the root's row of a
    larger tree step (which fails without the padding on such a CPU)."""
    assert SCHEMES["int4"].min_step_rows == 2 and SCHEMES["int8"].min_step_rows == 1
    manifest = prepare_engine(tiny_dir, "vanilla", MethodExtras(), max_context=MAX_CONTEXT, max_tree=MAX_TREE,
                              variant="int4")
    assert manifest.min_step_rows == 2 and manifest.quantization["min_step_rows"] == 2
    backend = open_engine(manifest.dir)
    prefix = np.random.default_rng(3).integers(0, manifest.model.vocab_size, 12).tolist()
    backend.step(Draft.chain(prefix))
    backend.commit(range(12))
    alone = backend.step(Draft.chain([11]))
    assert alone.logits.shape == (1, manifest.model.vocab_size) and alone.positions.tolist() == [12]
    alone = alone.logits.clone()
    tree = backend.step(Draft.from_parents([11, 4, 8, 15], [-1, 0, 0, 1]))
    assert torch.equal(tree.logits[0], alone[0])
    backend.commit([0])
    assert backend.length == 13
