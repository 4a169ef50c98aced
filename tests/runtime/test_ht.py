"""HT inference: PPD's dynamic sparse tree with pseudo slots, lossless decoding, refusals."""

import json

import pytest
import torch

from export.checkpoint import load_checkpoint, model_fingerprint
from export.ht import TransferMapError, TransferMaps, save_transfer_maps
from runtime import Generator
from runtime.methods import METHODS, build_method

# N = k = 2 pseudo slots; every tree shape PPD allows (per-node slot counts, per-m trees).
TREES = {
    "num_prompt_tokens": 2, "topk": 3,
    "trees": {
        "2": [{"path": [], "prompt_tokens": 2}, {"path": [0], "prompt_tokens": 2}, {"path": [1], "prompt_tokens": 1},
              {"path": [2], "prompt_tokens": 0}, {"path": [0, 0], "prompt_tokens": 2},
              {"path": [1, 0], "prompt_tokens": 0}],
        "1": [{"path": [], "prompt_tokens": 2}, {"path": [0], "prompt_tokens": 2}, {"path": [1], "prompt_tokens": 2}],
        "0": [{"path": [], "prompt_tokens": 2}],
    },
}


@pytest.fixture(scope="module")
def tiny_ht(tiny_model_dir, tmp_path_factory):
    """Random (not identity) maps at layer 0 of the 2-layer tiny model, and a tree file."""
    out = tmp_path_factory.mktemp("tiny-ht")
    hidden = load_checkpoint(tiny_model_dir)[0].config.hidden_size
    g = torch.Generator().manual_seed(3)
    maps = TransferMaps(torch.eye(hidden) + 0.5 * torch.randn(2, hidden, hidden, generator=g) / hidden ** 0.5,
                        0.1 * torch.randn(2, hidden, generator=g), layer=0)
    checkpoint = save_transfer_maps(out / "ht.safetensors", maps, model_fingerprint(tiny_model_dir),
                                    dtype=torch.float32)
    tree = out / "tree.json"
    tree.write_text(json.dumps(TREES))
    return checkpoint, tree


def test_ht_is_a_registered_method():
    assert "ht" in METHODS


def test_tiny_ht_is_lossless_against_vanilla(tiny_model_dir, tiny_ht):
    checkpoint, tree = tiny_ht
    vanilla = Generator.from_pretrained(tiny_model_dir, max_context=512)
    ht = Generator.from_pretrained(tiny_model_dir, method="ht", max_context=512, checkpoint=str(checkpoint),
                                   tree=str(tree))
    assert ht.backend.info.num_extra_tokens == 2
    for prompt in ["Hello", "Write a poem about the sea", "1 2 3 4 5 6"]:
        assert ht.generate(prompt, max_new_tokens=40).token_ids == vanilla.generate(prompt, max_new_tokens=40).token_ids


def test_mismatched_checkpoint_is_refused(real_model_dir, tiny_model_dir, tiny_ht):
    checkpoint, tree = tiny_ht
    with pytest.raises(TransferMapError, match="trained for model"):
        Generator.from_pretrained(real_model_dir, method="ht", checkpoint=str(checkpoint), tree=str(tree))
    with pytest.raises(TransferMapError, match="k=2 maps at layer 0"):
        Generator.from_pretrained(tiny_model_dir, method="ht", checkpoint=str(checkpoint), tree=str(tree), num_maps=3)
    with pytest.raises(ValueError, match="unknown option"):
        build_method("ht", tiny_model_dir, 10, 64, checkpoint=str(checkpoint), tree=str(tree), ensemble=2)


def test_tiny_ht_on_onnxruntime_is_lossless(tiny_model_dir, tiny_ht, tmp_path, monkeypatch):
    """from_pretrained exports an `ht` engine (maps baked in); it and from_engine decode like vanilla;
    the engine carries its tree; other maps, or ppd on an ht engine, are refused."""
    import export.engine
    from export.engine import engine_tree_path, install_tree

    monkeypatch.setattr(export.engine, "ARTIFACTS_DIR", tmp_path / "artifacts")
    checkpoint, tree = tiny_ht
    vanilla = Generator.from_pretrained(tiny_model_dir, max_context=512)
    ht = Generator.from_pretrained(tiny_model_dir, method="ht", backend="onnxruntime", max_context=512,
                                   checkpoint=str(checkpoint), tree=str(tree))
    manifest = ht.backend.manifest
    assert manifest.dir == tmp_path / "artifacts" / "engines" / tiny_model_dir.name / "cpu" / "ht"
    assert manifest.method.options == {"num_maps": 2, "layer": 0} and ht.backend.info.num_extra_tokens == 2
    assert install_tree(manifest, tree) == engine_tree_path(manifest) == manifest.dir / "ht-tree.json"
    from_dir = Generator.from_engine(manifest.dir)  # checkpoint from the manifest, tree installed in the dir
    assert from_dir.proposer.trees == ht.proposer.trees
    for prompt in ["Hello", "Write a poem about the sea", "1 2 3 4 5 6"]:
        want = vanilla.generate(prompt, max_new_tokens=40).token_ids
        assert ht.generate(prompt, max_new_tokens=40).token_ids == want
        assert from_dir.generate(prompt, max_new_tokens=40).token_ids == want
    hidden = manifest.model.hidden_size
    other = save_transfer_maps(tmp_path / "other.safetensors", TransferMaps.identity(2, hidden, 0),
                               model_fingerprint(tiny_model_dir), dtype=torch.float32)
    with pytest.raises(ValueError, match="not the ones exported"):
        Generator.from_engine(manifest.dir, checkpoint=str(other))
    with pytest.raises(ValueError, match="an 'ht' engine"):
        Generator.from_engine(manifest.dir, method="ppd")
    assert Generator.from_engine(manifest.dir, method="ngram").generate("Hello", max_new_tokens=8).token_ids == \
        vanilla.generate("Hello", max_new_tokens=8).token_ids
