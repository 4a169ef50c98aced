"""Where a CPU engine's step goes (tools/latency/breakdown.py): the weight-products graph and the
interleaved step / products timing on a tiny int4 engine. Timings are only checked for shape and sign:
speed is the benchmark's business."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import export.engine
from export.engine import prepare_engine
from export.methods import MethodExtras
from tools.commands import main
from tools.latency.breakdown import BreakdownRow, format_breakdown, measure_breakdown, weight_products_graph

MAX_CONTEXT, MAX_TREE = 256, 16


def write_graph(path, rng) -> dict[str, np.ndarray]:
    """x [T, 4] -> MatMul by a constant [4, 3] -> Relu -> Gemm by a constant stored [5, 3] (transB);
    an activation-by-activation MatMul (attention-like) and a Gather are not weight products."""
    weights = {"w": rng.standard_normal((4, 3)).astype(np.float32), "g": rng.standard_normal((5, 3)).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "g"], ["y"], transB=1),
             helper.make_node("MatMul", ["r", "rt"], ["scores"]),
             helper.make_node("Gather", ["w", "ids"], ["picked"])]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", 4]),
         helper.make_tensor_value_info("rt", TensorProto.FLOAT, [3, "T"]),
         helper.make_tensor_value_info("ids", TensorProto.INT64, ["I"])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "scores", "picked")],
        [numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return weights


def test_products_graph_keeps_only_products_by_constant_weights(tmp_path):
    rng = np.random.default_rng(0)
    weights = write_graph(tmp_path / "g.onnx", rng)
    model, inputs = weight_products_graph(tmp_path / "g.onnx")
    assert [n.op_type for n in model.graph.node] == ["MatMul", "Gemm"]
    assert inputs == {"rows_4": 4, "rows_3": 3}                       # K of each: Gemm's weight is [N, K]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {"rows_4": rng.standard_normal((2, 4)).astype(np.float32), "rows_3": rng.standard_normal((2, 3)).astype(np.float32)}
    h, y = session.run(None, feed)
    np.testing.assert_allclose(h, feed["rows_4"] @ weights["w"], rtol=1e-6)
    np.testing.assert_allclose(y, feed["rows_3"] @ weights["g"].T, rtol=1e-6)


def test_a_graph_without_weight_products_is_refused(tmp_path):
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    onnx.save(helper.make_model(graph), str(tmp_path / "g.onnx"))
    with pytest.raises(ValueError, match="no products by a constant weight"):
        weight_products_graph(tmp_path / "g.onnx")


@pytest.fixture
def int4_engine(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(export.engine, "ARTIFACTS_DIR", tmp_path / "artifacts")
    return prepare_engine(tiny_dir, "vanilla", MethodExtras(), max_context=MAX_CONTEXT, max_tree=MAX_TREE,
                          variant="int4")


def test_breakdown_of_a_quantized_engine(int4_engine):
    from runtime.loading import open_engine

    model, _ = weight_products_graph(open_engine(int4_engine.dir).graph_path)
    ops = collections.Counter(n.op_type for n in model.graph.node)
    assert ops == {"MatMulNBits": int4_engine.quantization["quantized_matmuls"]}   # every one, nothing else

    rows = measure_breakdown(int4_engine.dir, "int4", nodes=[1, 3], caches=[0, 20], repeats=3)
    assert [(r.cache, r.nodes, r.rows) for r in rows] == [(0, 1, 2), (0, 3, 3), (20, 1, 2), (20, 3, 3)]  # int4 pads T=1
    assert all(r.step_s > 0 and r.products_s > 0 for r in rows)
    assert rows[0].to_json()["rest_ms"] == pytest.approx(1e3 * (rows[0].step_s - rows[0].products_s), abs=2e-3)
    with pytest.raises(ValueError, match="do not fit the engine"):
        measure_breakdown(int4_engine.dir, "int4", nodes=[1], caches=[MAX_CONTEXT], repeats=1)
    with pytest.raises(ValueError, match="repeats >= 1"):
        measure_breakdown(int4_engine.dir, "int4", nodes=[1], caches=[0], repeats=0)


def test_table():
    table = format_breakdown([BreakdownRow("int4", 1, 2, 200, 0.012, 0.009), BreakdownRow("fp32", 8, 8, 50, 0.03, 0.024)])
    assert "| int4 | 1 (2) | 200 | 12.00 ms | 9.00 ms | 3.00 ms | 75% |" in table
    assert "| fp32 | 8 | 50 | 30.00 ms | 24.00 ms | 6.00 ms | 80% |" in table


def test_cli_names_missing_engines_and_bad_lists(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(export.engine, "ARTIFACTS_DIR", tmp_path / "artifacts")
    assert main(["breakdown", "--variants", "int8,int4"]) == 2
    err = capsys.readouterr().err
    assert "`make engine GPU=cpu QUANT=int8`" in err and "`make engine GPU=cpu QUANT=int4`" in err
    assert main(["breakdown", "--nodes", "1,x"]) == 2
    assert "--nodes takes a comma list of integers, got '1,x'" in capsys.readouterr().err
