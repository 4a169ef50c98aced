"""The bandwidth floor of the CPU engine variants (tools/latency/floor.py)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import export.engine
from tools.commands import main
from tools.latency.floor import FloorRow, floor_rows, format_floor, measure_read_bandwidth, step_weight_bytes


def write_graph(path) -> None:
    """An embedding table only gathered from (not read in full by a step), a weight only multiplied by,
    and a tied table both gathered from and multiplied by (read in full)."""
    embedding = numpy_helper.from_array(np.zeros((100, 4), np.float32), "embedding")   # 1,600 bytes, gathered only
    weight = numpy_helper.from_array(np.zeros((4, 3), np.float32), "weight")            # 48 bytes
    tied = numpy_helper.from_array(np.zeros((4, 5), np.float16), "tied")                 # 40 bytes
    nodes = [helper.make_node("Gather", ["embedding", "ids"], ["x"]),
             helper.make_node("MatMul", ["x", "weight"], ["y"]),
             helper.make_node("Gather", ["tied", "rows"], ["z"]),
             helper.make_node("MatMul", ["x", "tied"], ["w"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["T"]),
                                           helper.make_tensor_value_info("rows", TensorProto.INT64, ["R"])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "z", "w")],
                              [embedding, weight, tied])
    onnx.save(helper.make_model(graph), str(path))


def test_weights_read_per_step_leave_out_gathered_tables(tmp_path):
    write_graph(tmp_path / "g.onnx")
    assert step_weight_bytes(tmp_path / "g.onnx") == 48 + 40


def test_rows_and_table(tmp_path):
    write_graph(tmp_path / "g.onnx")
    rows = floor_rows([("int4", tmp_path / "g.onnx", 0.002, "latency.json")], bandwidth=88e3)
    assert rows == [FloorRow("int4", 88, 0.001, 0.002, "latency.json")]
    assert rows[0].share == pytest.approx(0.5) and rows[0].to_json()["share_of_floor"] == 0.5
    table = format_floor(rows, 88e3)
    assert "| int4 | 0 MB | 1.00 ms | 2.00 ms | 50% |" in table
    with pytest.raises(ValueError, match="positive"):
        floor_rows([], bandwidth=0)


def test_read_bandwidth_is_measured_and_threads_restored():
    before = torch.get_num_threads()
    assert measure_read_bandwidth(threads=1, mib=8, passes=3) > 1e8      # any machine reads > 100 MB/s
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="passes"):
        measure_read_bandwidth(mib=8, passes=0)


def test_cli_names_every_missing_engine_with_its_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(export.engine, "ARTIFACTS_DIR", tmp_path / "artifacts")
    assert main(["floor", "--variants", "int8,int4"]) == 2
    err = capsys.readouterr().err
    assert "`make engine GPU=cpu QUANT=int8`" in err and "`make engine GPU=cpu QUANT=int4`" in err
    assert main(["floor", "--variants", "int3"]) == 2
    assert "unknown engine variant 'int3'" in capsys.readouterr().err
