"""ONNX export of the step: graph contract, validation at untraced shapes, tied-weight dedup, PPD rows, fp16."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from export.__main__ import main as export_main
from export.checkpoint import load_checkpoint, model_fingerprint
from export.manifest import Manifest, ManifestError, sha256_file
from export.methods import MethodExtras
from export.onnx_export import IR_VERSION, OPSET, ExportConfig, export_onnx
from export.ppd import PPDConfig, save_prompt_tokens
from export.step_model import StepModel
from export.validate import ValidationError, case_inputs, default_cases, text_ids, validate_step_graph
from tests.export.tiny_llama import make_tiny_llama

MAX_CONTEXT, MAX_TREE = 256, 16


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, real_model_dir):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny"), real_model_dir)


@pytest.fixture(scope="module")
def exported(tiny_dir, tmp_path_factory) -> Manifest:
    out = tmp_path_factory.mktemp("engines") / "vanilla"
    return export_onnx(ExportConfig(tiny_dir, out, max_context=MAX_CONTEXT, max_tree=MAX_TREE), log=lambda _: None)


def test_manifest_describes_the_graph(exported, tiny_dir):
    m = exported
    assert m.input_names == ["input_ids", "position_ids", "tree_mask", "past_mask", "past_key.0", "past_key.1",
                             "past_value.0", "past_value.1"]
    assert m.output_names == ["logits", "new_keys", "new_values"]
    assert m.dynamic_axes()["tree_mask"] == {0: "T", 1: "T"}
    assert m.dynamic_axes()["past_key.1"] == {0: "S"}
    assert m.dynamic_axes()["new_keys"] == {1: "T"}
    assert (m.opset, m.ir_version, m.dtype) == (OPSET, IR_VERSION, "float32")
    assert m.model.fingerprint == model_fingerprint(tiny_dir)
    assert m.method.name == "vanilla" and m.method.num_extra_tokens == 0
    assert {"ppdeploy", "torch", "onnx", "format_version"} <= set(m.exporter)
    assert m.onnx.sha256 == sha256_file(m.onnx_path)
    assert m.dynamic_axes()["past_mask"] == {0: "T", 1: "S"}
    # Profiles: decode trees of up to max_batch sequences (1..max_batch * max_tree), prefill chains up to
    # max_context - max_tree; both over the cells of max_batch sequences.
    cells = m.max_batch * 256 - 16
    assert m.max_batch == 16 and m.profile_shapes("decode")["tree_mask"] == ([1, 1], [16, 16], [256, 256])
    assert m.profile_shapes("decode")["past_key.0"] == ([0, 2, 16], [256, 2, 16], [cells, 2, 16])
    assert m.profile_shapes("decode")["past_mask"] == ([1, 0], [16, 256], [256, cells])
    assert m.profile_shapes("prefill")["input_ids"] == ([1], [128], [240])
    graph = onnx.load(str(m.onnx_path), load_external_data=False)
    assert graph.ir_version == IR_VERSION and graph.opset_import[0].version == OPSET
    onnx.checker.check_model(str(m.onnx_path), full_check=True)


# Node types of the 2-layer tiny Llama's fp32 graph as exported before model families existed: the real
# model's latency profiles and trees were measured on that graph, so a Llama graph keeps exactly these ops
# (the real SmolLM2 graph was checked byte-identical, model.onnx sha256 010e637a..., when families came).
# past_mask (which cache cells each node sees) adds its one Cast per step and one Add per layer (2 here).
LLAMA_GRAPH_OPS = {"Add": 17, "Cast": 19, "Concat": 11, "Constant": 135, "Cos": 1, "Div": 5, "Gather": 5,
                   "Identity": 4, "MatMul": 17, "Mul": 23, "Neg": 2, "Pow": 5, "ReduceMean": 5, "Reshape": 8,
                   "Shape": 4, "Sigmoid": 2, "Sin": 1, "Slice": 20, "Softmax": 2, "Sqrt": 5, "Transpose": 13,
                   "Unsqueeze": 23}


def test_llama_graph_keeps_its_nodes(exported):
    from collections import Counter

    graph = onnx.load(str(exported.onnx_path), load_external_data=False).graph
    assert dict(Counter(node.op_type for node in graph.node)) == LLAMA_GRAPH_OPS
    assert exported.model.family == "llama" and exported.model.sliding_mask_inputs == ()


def test_validation_ran_at_untraced_shapes(exported):
    shapes = {(v["tree_size"], v["cache_length"]) for v in exported.validation}
    assert {(1, 0), (5, 7), (16, 50), (24, 0)} <= shapes          # traced at T=3, S=5
    assert (3, 5) not in shapes
    assert all(v["max_abs_diff"] <= v["tolerance"] for v in exported.validation)
    assert len(exported.validation) == 3 * len(shapes)            # logits, new_keys, new_values per case


def test_tied_embedding_is_stored_once(exported, tiny_dir):
    hf, _ = load_checkpoint(tiny_dir)
    param_bytes = sum(p.numel() * 4 for p in hf.parameters())  # tied: the [V, H] table counts once
    data = exported.external_data[0]
    assert data.size < param_bytes * 1.02
    graph = onnx.load(str(exported.onnx_path), load_external_data=False)
    v, h = hf.config.vocab_size, hf.config.hidden_size
    assert not [i.name for i in graph.graph.initializer if list(i.dims) == [v, h]]


def test_untied_checkpoint_exports_and_validates(tmp_path, real_model_dir):
    model_dir = make_tiny_llama(tmp_path / "untied", real_model_dir, seed=3, tied=False)
    m = export_onnx(ExportConfig(model_dir, tmp_path / "out", max_context=128, max_tree=8), log=lambda _: None)
    assert m.validation and all(v["max_abs_diff"] <= v["tolerance"] for v in m.validation)


def test_validation_reports_every_mismatch_at_once(exported, tiny_dir):
    hf, tokenizer = load_checkpoint(tiny_dir)
    step = StepModel(hf).eval()
    with torch.no_grad():
        step.final_norm.mul_(1.01)  # changes logits only, by far more than the fp32 tolerance
    with pytest.raises(ValidationError) as info:
        validate_step_graph(exported.onnx_path, step, tokenizer, max_tree=MAX_TREE)
    lines = [line for line in str(info.value).splitlines() if "max|diff|" in line]
    assert len(lines) == len(default_cases(MAX_TREE))               # every case, not just the first
    assert all(" logits: " in line for line in lines)               # and only the output that differs


def test_ppd_export_via_cli_bakes_prompt_rows(tiny_dir, tmp_path):
    hidden = load_checkpoint(tiny_dir)[0].config.hidden_size
    rows = torch.randn(4, hidden)
    checkpoint = save_prompt_tokens(tmp_path / "ppd.safetensors", rows, PPDConfig(2, 2), model_fingerprint(tiny_dir),
                                    dtype=torch.float32)
    out = tmp_path / "ppd"
    assert export_main(["onnx", "--model", str(tiny_dir), "--method", "ppd", "--checkpoint", str(checkpoint),
                        "--max-context", "128", "--max-tree", "16", "--out", str(out)]) == 0
    m = Manifest.load(out)
    assert m.method.name == "ppd" and m.method.num_extra_tokens == 4
    assert m.method.options == {"num_prompt_tokens": 2, "ensemble": 2}
    assert m.method.checkpoint.sha256 == sha256_file(checkpoint)
    assert all(v["max_abs_diff"] <= v["tolerance"] for v in m.validation)


def test_validation_trees_carry_prompt_token_ids(tiny_dir):
    hf, tokenizer = load_checkpoint(tiny_dir)
    step = StepModel(hf, torch.randn(4, hf.config.hidden_size))
    tokens = text_ids(tokenizer, step.vocab_size, 80)
    feed = case_inputs(step, tokens, default_cases(16)[2])       # T=16 tree over S=50
    assert (feed["input_ids"] >= step.vocab_size).sum() == 4
    assert feed["past_key.0"].shape == (50, 2, 16)
    assert feed["position_ids"].min() == 50


def test_fp16_graph_is_fp16_with_fp32_softmax(tiny_dir, tmp_path):
    m = export_onnx(ExportConfig(tiny_dir, tmp_path / "fp16", dtype="fp16", max_context=128, max_tree=16),
                    log=lambda _: None)
    assert m.dtype == "float16"
    assert {t.name: t.dtype for t in m.inputs if not t.name.endswith("_ids")} == {
        t.name: "float16" for t in m.inputs if not t.name.endswith("_ids")}
    assert [t.dtype for t in m.outputs] == ["float16"] * 3
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(m.onnx_path)))
    float_inits = {i.data_type for i in graph.graph.initializer if i.data_type in (onnx.TensorProto.FLOAT,
                                                                                     onnx.TensorProto.FLOAT16)}
    assert float_inits == {onnx.TensorProto.FLOAT16}
    types = {v.name: v.type.tensor_type.elem_type for v in graph.graph.value_info}
    softmax_inputs = [types[n.input[0]] for n in graph.graph.node if n.op_type == "Softmax"]
    assert softmax_inputs == [onnx.TensorProto.FLOAT] * 2
    # The fp16 graph ran on CPU onnxruntime against the fp16 torch step, lowest finite mask included.
    assert m.validation and all(np.isfinite(v["max_abs_diff"]) and v["max_abs_diff"] <= v["tolerance"]
                                for v in m.validation)


def test_export_never_replaces_unrelated_files(tiny_dir, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ManifestError, match="holds no manifest.json"):
        export_onnx(ExportConfig(tiny_dir, out), log=lambda _: None)
    assert (out / "notes.txt").read_text() == "mine"


def test_export_config_refuses_bad_budgets(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="max_context >= 2 \\* max_tree"):
        ExportConfig(tiny_dir, tmp_path, max_context=64, max_tree=64)
    with pytest.raises(ValueError, match="unknown dtype"):
        ExportConfig(tiny_dir, tmp_path, dtype="int8")
    with pytest.raises(ValueError, match="needs --checkpoint"):
        export_onnx(ExportConfig(tiny_dir, tmp_path / "x", method="ppd"))


def test_method_rows_can_be_passed_in(tiny_dir, tmp_path):
    extras = MethodExtras(torch.randn(3, 64), {"num_prompt_tokens": 3, "ensemble": 1})
    m = export_onnx(ExportConfig(tiny_dir, tmp_path / "rows", method="ppd", max_context=128, max_tree=8), extras,
                    log=lambda _: None)
    assert m.method.num_extra_tokens == 3 and m.method.checkpoint is None


def test_no_validate_skips_validation_only(tiny_dir, tmp_path):
    out = tmp_path / "unvalidated"
    assert export_main(["onnx", "--model", str(tiny_dir), "--max-context", "64", "--max-tree", "8", "--no-validate",
                        "--out", str(out)]) == 0
    m = Manifest.load(out)
    assert m.validation == () and m.max_tree == 8
