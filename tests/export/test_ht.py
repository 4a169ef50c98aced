"""export/ht.py and HT in the step model: map shapes, source selection, branch isolation, checkpoint file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from export.checkpoint import load_checkpoint, model_fingerprint
from export.ht import (TransferMapError, TransferMaps, layout_config, load_transfer_maps, save_transfer_maps,
                       transfer_map_metadata)
from export.ppd import attach_prompt_tokens
from export.step_model import HiddenTransfer, StepModel, lowest_mask_value
from trees import buffers_from_parents

VOCAB = 100


def random_maps(k: int, hidden: int, layer: int, seed: int = 0, scale: float = 0.3) -> TransferMaps:
    g = torch.Generator().manual_seed(seed)
    weight = torch.eye(hidden) + scale * torch.randn(k, hidden, hidden, generator=g) / hidden ** 0.5
    return TransferMaps(weight, 0.1 * torch.randn(k, hidden, generator=g), layer)


def additive(visible: np.ndarray) -> torch.Tensor:
    return torch.where(torch.from_numpy(visible.copy()), 0.0, lowest_mask_value(torch.float32))


def test_map_shapes_and_validation():
    maps = TransferMaps.identity(3, 8, layer=2)
    assert maps.weight.shape == (3, 8, 8) and maps.bias.shape == (3, 8)
    assert maps.num_maps == 3 and maps.hidden_size == 8 and maps.layout.num_prompt_tokens == 3
    assert maps.layout.ensemble == 1
    out = HiddenTransfer(random_maps(3, 8, 2), VOCAB).transfer(torch.randn(5, 8))
    assert out.shape == (5, 3, 8)                                   # [G, k, H]
    with pytest.raises(ValueError, match=r"\[k, H, H\]"):
        TransferMaps(torch.zeros(3, 8, 4), torch.zeros(3, 8), 0)
    with pytest.raises(ValueError, match="bias"):
        TransferMaps(torch.zeros(3, 8, 8), torch.zeros(2, 8), 0)
    with pytest.raises(ValueError, match="layer"):
        TransferMaps(torch.zeros(3, 8, 8), torch.zeros(3, 8), -1)


def tree_with_pseudo_chains(k: int):
    """Root 0, candidates 1 (child of 0), 2 (child of 0), 3 (child of 1); pseudo chains after 3 and 2."""
    parents, tokens = [-1, 0, 0, 1], [5, 6, 7, 8]
    config = layout_config(k)
    parents, tokens = attach_prompt_tokens(parents, tokens, 3, config, VOCAB)
    parents, tokens = attach_prompt_tokens(parents, tokens, 2, config, VOCAB)
    return parents, tokens


def test_pseudo_row_takes_its_source_nodes_state():
    k, hidden = 2, 8
    parents, tokens = tree_with_pseudo_chains(k)
    buffers = buffers_from_parents(parents)
    ids = torch.tensor(tokens)
    positions = torch.tensor(buffers.depth) + 10
    transfer = HiddenTransfer(random_maps(k, hidden, 0), VOCAB)
    assert transfer.source_rows(ids, positions, additive(buffers.ancestor_mask)).tolist() == [0, 1, 2, 3, 3, 3, 2, 2]
    h = torch.randn(len(tokens), hidden)
    out = transfer(h, ids, positions, additive(buffers.ancestor_mask))
    torch.testing.assert_close(out[:4], h[:4])                      # real rows untouched
    for row, (src, j) in {4: (3, 0), 5: (3, 1), 6: (2, 0), 7: (2, 1)}.items():
        torch.testing.assert_close(out[row], h[src] @ transfer.weight[j] + transfer.bias[j])


@pytest.fixture(scope="module")
def tiny_hf(tiny_model_dir):
    return load_checkpoint(tiny_model_dir)[0]


def test_step_model_pseudo_rows_see_only_their_own_branch(tiny_hf):
    """Changing the tokens of another branch changes no pseudo row; changing the source node does."""
    k = 2
    hidden = tiny_hf.config.hidden_size
    model = StepModel(tiny_hf, transfer_maps=random_maps(k, hidden, layer=0))
    parents, tokens = tree_with_pseudo_chains(k)
    buffers = buffers_from_parents(parents)
    mask, positions = additive(buffers.ancestor_mask), torch.tensor(buffers.depth) + 3
    past = [torch.randn(3, model.num_kv_heads, model.head_dim) for _ in range(model.num_layers)]

    def logits(toks):
        return model(torch.tensor(toks), positions, mask, past, past)[0]

    base = logits(tokens)
    other_branch = list(tokens)
    other_branch[2] = 99                                             # node 2: not an ancestor of rows 4, 5
    changed = logits(other_branch)
    torch.testing.assert_close(changed[[0, 1, 3, 4, 5]], base[[0, 1, 3, 4, 5]])
    assert not torch.allclose(changed[6], base[6])                  # its own pseudo chain does change
    source = list(tokens)
    source[3] = 99
    assert not torch.allclose(logits(source)[4], base[4])


def test_step_model_pseudo_row_equals_upper_layers_on_the_transferred_state(tiny_hf):
    """The pseudo row's logits equal: layer-l state of the source -> map -> layers l+1.. at q+1."""
    k, layer = 1, 0
    model = StepModel(tiny_hf, transfer_maps=random_maps(k, tiny_hf.config.hidden_size, layer))
    parents, tokens = attach_prompt_tokens([-1, 0, 1], [3, 4, 5], 2, layout_config(k), model.vocab_size)
    buffers = buffers_from_parents(parents)
    mask, positions = additive(buffers.ancestor_mask), torch.tensor(buffers.depth)
    empty = [torch.zeros(0, model.num_kv_heads, model.head_dim)] * model.num_layers
    with torch.no_grad():
        got = model(torch.tensor(tokens), positions, mask, empty, empty)[0]
        # reference: the real chain alone, then the pseudo state by hand on top of its upper-layer KV
        h = model.embed(torch.tensor(tokens[:3]))
        inputs = model.step_inputs(positions[:3], h.dtype, mask[:3, :3], empty[0])
        h_l, keys, values = model.run_layers(h, inputs, empty, empty, 0, layer + 1)
        _, up_k, up_v = model.run_layers(h_l, inputs, empty, empty, layer + 1, model.num_layers)
        keys, values = keys + up_k, values + up_v
        pseudo = model.transfer.transfer(h_l[2:3]).reshape(1, -1)
        inputs = model.step_inputs(positions[3:], h.dtype, torch.zeros(1, 1), keys[0])
        out, _, _ = model.run_layers(pseudo, inputs, keys, values, layer + 1, model.num_layers)
        want = model.logits(model.final_hidden(out))
    torch.testing.assert_close(got[:3], model(torch.tensor(tokens[:3]), positions[:3], mask[:3, :3], empty, empty)[0])
    torch.testing.assert_close(got[3:], want, rtol=1e-5, atol=1e-5)


def test_ppd_rows_and_ht_maps_are_exclusive(tiny_hf):
    hidden = tiny_hf.config.hidden_size
    with pytest.raises(ValueError, match="not both"):
        StepModel(tiny_hf, torch.zeros(2, hidden), TransferMaps.identity(2, hidden, 0))
    with pytest.raises(ValueError, match="layers 0..1"):
        StepModel(tiny_hf, transfer_maps=TransferMaps.identity(2, hidden, 2))
    with pytest.raises(ValueError, match="hidden size"):
        StepModel(tiny_hf, transfer_maps=TransferMaps.identity(2, hidden + 1, 0))


def test_checkpoint_roundtrip_and_refusals(tiny_model_dir, real_model_dir, tmp_path, tiny_hf):
    hidden = tiny_hf.config.hidden_size
    fp = model_fingerprint(tiny_model_dir)
    maps = random_maps(3, hidden, layer=1)
    path = save_transfer_maps(tmp_path / "ht.safetensors", maps, fp, {"seed": 7})
    loaded = load_transfer_maps(path, fp, hidden)
    assert loaded.layer == 1 and loaded.num_maps == 3 and loaded.weight.dtype == torch.float32
    torch.testing.assert_close(loaded.weight, maps.weight, atol=2e-3, rtol=1e-3)  # saved as fp16
    assert transfer_map_metadata(path) == {"seed": 7}
    assert load_transfer_maps(path, fp, hidden, num_maps=3, layer=1).num_maps == 3
    with pytest.raises(TransferMapError, match="trained for model.*--model-dir"):
        load_transfer_maps(path, model_fingerprint(real_model_dir), hidden)
    with pytest.raises(TransferMapError, match="hidden size"):
        load_transfer_maps(path, fp, hidden * 2)
    with pytest.raises(TransferMapError, match="k=3 maps at layer 1.*--num-maps 2"):
        load_transfer_maps(path, fp, hidden, num_maps=2)
    with pytest.raises(TransferMapError, match="--layer 0"):
        load_transfer_maps(path, fp, hidden, layer=0)
    with pytest.raises(TransferMapError, match="does not exist.*python -m train ht"):
        load_transfer_maps(tmp_path / "missing.safetensors", fp, hidden)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(TransferMapError, match="not a readable"):
        load_transfer_maps(tmp_path / "junk.safetensors", fp, hidden)


def test_step_with_maps_traces_to_onnx(tiny_hf, tmp_path):
    """No data-dependent Python control flow: torch.onnx.export (dynamo=False) traces the HT step and
    onnxruntime reproduces it at a tree shape other than the traced one."""
    ort = pytest.importorskip("onnxruntime")
    k = 2
    model = StepModel(tiny_hf, transfer_maps=random_maps(k, tiny_hf.config.hidden_size, layer=0)).eval()
    n_layers = model.num_layers

    class Flat(torch.nn.Module):
        def __init__(self, step):
            super().__init__()
            self.step = step

        def forward(self, ids, pos, mask, *past):
            return self.step(ids, pos, mask, list(past[:n_layers]), list(past[n_layers:]))

    def inputs(parents, tokens, s):
        buffers = buffers_from_parents(parents)
        past = [torch.randn(s, model.num_kv_heads, model.head_dim) for _ in range(2 * n_layers)]
        return (torch.tensor(tokens), torch.tensor(buffers.depth) + s, additive(buffers.ancestor_mask), *past)

    parents, tokens = attach_prompt_tokens([-1, 0], [3, 4], 1, layout_config(k), model.vocab_size)
    names = ["input_ids", "position_ids", "tree_mask"] + [f"past_{i}" for i in range(2 * n_layers)]
    axes = {"input_ids": {0: "T"}, "position_ids": {0: "T"}, "tree_mask": {0: "T", 1: "T"},
            **{f"past_{i}": {0: "S"} for i in range(2 * n_layers)}}
    path = tmp_path / "ht.onnx"
    torch.onnx.export(Flat(model), inputs(parents, tokens, 4), str(path), input_names=names,
                      output_names=["logits", "new_keys", "new_values"], dynamic_axes=axes, dynamo=False,
                      opset_version=17)
    parents, tokens = tree_with_pseudo_chains(k)
    tokens = [t if t < VOCAB else t - VOCAB + model.vocab_size for t in tokens]
    args = inputs(parents, tokens, 6)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {n: a.numpy() for n, a in zip(names, args)})[0]
    with torch.no_grad():
        want = Flat(model)(*args)[0]
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4)
