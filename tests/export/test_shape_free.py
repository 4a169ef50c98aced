"""Shape-free GPU exports (ExportConfig.shape_free, export/attention.py): the graph reads no tensor's shape,
so every node can run on a GPU execution provider (onnxruntime's CUDA graphs need that); it is validated
against the torch step like any export, gives what the ordinary graph gives, and is its own engine
(staleness, GPU targets set it)."""

from __future__ import annotations

from collections import Counter

import onnx
import pytest
import torch

from export.__main__ import EngineCommand
from export.engine import stale_reason
from export.ht import TransferMaps
from export.manifest import Manifest
from export.methods import MethodExtras
from export.onnx_export import ExportConfig, export_onnx
from runtime.loading import engine_graph, open_backend
from tests.export.tiny_families import make_tiny_family
from tests.runtime.test_static_steps import run_script

MAX_CONTEXT, MAX_TREE = 256, 16
# Nodes a CUDA graph cannot hold: shape reads (their outputs live on the host) and control flow.
HOST_OPS = {"Shape", "Size", "NonZero", "If", "Loop", "Scan"}


def method_extras(method: str, hidden: int) -> MethodExtras:
    g = torch.Generator().manual_seed(5)
    if method == "ppd":
        return MethodExtras(torch.randn(3, hidden, generator=g), {"num_prompt_tokens": 3, "ensemble": 1})
    if method == "ht":
        maps = TransferMaps(torch.eye(hidden) + 0.1 * torch.randn(2, hidden, hidden, generator=g),
                            0.1 * torch.randn(2, hidden, generator=g), layer=0)
        return MethodExtras(options={"num_maps": 2, "layer": 0}, transfer_maps=maps)
    return MethodExtras()


def export(model_dir, out, method: str, shape_free: bool) -> Manifest:
    from transformers import AutoConfig

    extras = method_extras(method, AutoConfig.from_pretrained(model_dir).hidden_size)
    config = ExportConfig(model_dir, out, method=method, max_context=MAX_CONTEXT, max_tree=MAX_TREE,
                          shape_free=shape_free)
    return export_onnx(config, extras, log=lambda _: None)


@pytest.mark.parametrize("method", ["vanilla", "ppd", "ht"])
def test_a_shape_free_graph_reads_no_shape_and_is_validated(method, tiny_dir, tmp_path):
    manifest = export(tiny_dir, tmp_path / method, method, shape_free=True)
    ops = Counter(node.op_type for node in onnx.load(str(manifest.onnx_path), load_external_data=False).graph.node)
    assert not HOST_OPS & set(ops), f"host-side nodes left in the {method} graph: {HOST_OPS & set(ops)}"
    assert manifest.shape_free and manifest.validation   # checked against the torch step at untraced shapes
    ordinary = export(tiny_dir, tmp_path / f"{method}-ordinary", method, shape_free=False)
    assert ops["Shape"] == 0 < Counter(n.op_type for n in onnx.load(
        str(ordinary.onnx_path), load_external_data=False).graph.node)["Shape"]   # the CPU graph keeps its nodes


def test_a_shape_free_sliding_window_family_graph(real_model_dir, tmp_path):
    model = make_tiny_family("gemma3", tmp_path / "gemma3", real_model_dir)
    manifest = export(model, tmp_path / "engine", "vanilla", shape_free=True)
    graph = onnx.load(str(manifest.onnx_path), load_external_data=False).graph
    assert not HOST_OPS & {node.op_type for node in graph.node} and manifest.validation
    assert manifest.model.sliding_mask_inputs


def test_shape_free_static_steps_give_the_ordinary_dynamic_rows(tiny_dir, tmp_path):
    """What the CUDA provider would run (the shape-free graph at static steps) against the CPU's graph at
    dynamic steps, on onnxruntime's CPU provider: every real row to rounding, the same argmax."""
    backends = [open_backend(engine_graph(export(tiny_dir, tmp_path / name, "vanilla", shape_free), "cpu",
                                          MAX_CONTEXT), "cpu", max_batch=3, step_sizes=sizes)
                for name, shape_free, sizes in (("ordinary", False, None), ("free", True, (5, 16, 64)))]
    dynamic, static = (run_script(b, b.info.vocab_size) for b in backends)
    for want, got in zip(dynamic, static):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
        assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_shape_free_is_part_of_the_engine(tiny_dir, tmp_path):
    manifest = export(tiny_dir, tmp_path / "free", "vanilla", shape_free=True)
    cpu = ExportConfig(tiny_dir, manifest.dir, max_context=MAX_CONTEXT, max_tree=MAX_TREE)
    assert stale_reason(manifest.dir, cpu, MethodExtras()) == "shape-free attention is True, wanted False"
    gpu = EngineCommand(model=str(tiny_dir), target="h100").target_config(tmp_path / "x")
    assert gpu.shape_free and gpu.dtype == "fp16"
    assert not EngineCommand(model=str(tiny_dir)).target_config(tmp_path / "y").shape_free
    with pytest.raises(ValueError, match="exclude each other"):
        ExportConfig(tiny_dir, tmp_path / "z", shape_free=True, row_exact=True)
