"""ONNX export + validation of every supported family (tiny random models, tests/export/tiny_families.py): the
graph contract (sliding-window mask inputs exactly for families with sliding layers), the manifest's model
record, validation at untraced shapes including a cache longer than the window, and the masks a runtime
builds with export/masks.py driving the onnxruntime graph to transformers' own logits."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export.families import FAMILIES
from export.manifest import Manifest
from export.masks import SLIDING_MASK_INPUTS, additive, lowest_mask_value, sliding_window_masks
from export.onnx_export import ExportConfig, export_onnx
from tests.export.tiny_families import FAMILY_NAMES, SLIDING_NAMES, WINDOW, make_tiny_family

MAX_CONTEXT, MAX_TREE = 128, 16


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def exported(request, tmp_path_factory, real_model_dir) -> tuple[str, Manifest]:
    root = tmp_path_factory.mktemp(request.param)
    model_dir = make_tiny_family(request.param, root / "model", real_model_dir)
    config = ExportConfig(model_dir, root / "engine", max_context=MAX_CONTEXT, max_tree=MAX_TREE)
    return request.param, export_onnx(config, log=lambda _: None)


def test_graph_contract_and_manifest(exported):
    name, m = exported
    sliding = name in SLIDING_NAMES
    assert m.input_names[:4] == ["input_ids", "position_ids", "tree_mask", "past_mask"]
    assert m.input_names[4:6] == (list(SLIDING_MASK_INPUTS) if sliding else ["past_key.0", "past_key.1"])
    assert m.model.sliding_mask_inputs == (SLIDING_MASK_INPUTS if sliding else ())
    assert m.model.family == name.split("-")[0] and m.model.family in FAMILIES
    if sliding:
        assert m.model.sliding_window in (WINDOW, WINDOW + 1) and m.model.sliding_layers
        assert m.dynamic_axes()["sliding_past_mask"] == {0: "T", 1: "S"}
        cells = m.max_batch * MAX_CONTEXT - MAX_TREE   # every sequence's cells of a packed step
        assert m.profile_shapes("decode")["sliding_past_mask"][2] == [m.max_batch * MAX_TREE, cells]
    else:
        assert m.model.sliding_window is None and m.model.sliding_layers == ()
    assert Manifest.load(m.dir).model == m.model     # the record survives the JSON round trip


def test_validated_at_untraced_shapes_across_the_window(exported):
    name, m = exported
    shapes = {(v["tree_size"], v["cache_length"]) for v in m.validation}
    assert {(1, 0), (5, 7), (16, 50), (24, 0)} <= shapes and (3, 5) not in shapes
    if name in SLIDING_NAMES:
        assert (16, m.model.sliding_window + 3) in shapes   # committed entries fall out of the window
    assert all(v["max_abs_diff"] <= v["tolerance"] for v in m.validation)


@pytest.mark.parametrize("name", ["gemma3", "mistral"])
def test_runtime_built_masks_reproduce_transformers(name, tmp_path, real_model_dir):
    """What a runtime will do: prefill a prompt longer than the window, then one tree step whose nodes'
    windows cut the cache at different entries, every mask from export/masks.py in numpy; each node's
    logits equal transformers' on the node's path scored alone."""
    from transformers import AutoModelForCausalLM

    model_dir = make_tiny_family(name, tmp_path / "model", real_model_dir, seed=1)
    m = export_onnx(ExportConfig(model_dir, tmp_path / "engine", max_context=64, max_tree=8, validate=False),
                    log=lambda _: None)
    session = ort.InferenceSession(str(m.onnx_path), providers=["CPUExecutionProvider"])
    hf = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    rng = np.random.default_rng(0)
    n, window, low = 9, m.model.sliding_window, lowest_mask_value(np.float32)
    prompt = rng.integers(0, m.model.vocab_size, n)
    empty = {f"past_{kv}.{i}": np.zeros((0, m.model.num_kv_heads, m.model.head_dim), np.float32)
             for kv in ("key", "value") for i in range(m.model.num_layers)}

    def run(ids, positions, ancestors, past_positions, past):
        tree = additive(ancestors, np.float32)
        sliding_tree, sliding_past = sliding_window_masks(tree, positions, past_positions, window)
        feed = {"input_ids": ids, "position_ids": positions, "tree_mask": tree,
                "past_mask": np.zeros((len(ids), len(past_positions)), np.float32),   # one sequence: all its own
                "sliding_tree_mask": sliding_tree, "sliding_past_mask": sliding_past, **past}
        return dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))

    out = run(prompt, np.arange(n), np.tril(np.ones((n, n), bool)), np.arange(0), empty)
    past = {f"past_{kv}.{i}": out[f"new_{kv}s"][i] for kv in ("key", "value") for i in range(m.model.num_layers)}
    parents = [-1, 0, 0, 1, 3]                                    # depths 0, 1, 1, 2, 3
    ancestors, depth = np.eye(5, dtype=bool), np.zeros(5, np.int64)
    for i, p in enumerate(parents[1:], 1):
        ancestors[i] |= ancestors[p]
        depth[i] = depth[p] + 1
    tokens = rng.integers(0, m.model.vocab_size, 5)
    logits = run(tokens, n + depth, ancestors, np.arange(n), past)["logits"]
    assert low < 0 and n + depth.max() - window >= 1                # the window cuts the cache here
    with torch.inference_mode():
        for node in range(5):
            seq = np.concatenate([prompt, tokens[ancestors[node]]])
            ref = hf(torch.from_numpy(seq)[None]).logits[0, -1].numpy()
            np.testing.assert_allclose(logits[node], ref, atol=1e-4, rtol=1e-4)
