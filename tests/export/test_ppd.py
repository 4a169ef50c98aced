"""export/ppd.py: prompt-token ids, the EPT tree layout, the checkpoint format; StepModel's past_mask."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from export.ppd import (PPDConfig, PromptTokenError, attach_prompt_tokens, average_ensemble_logits,
                        load_prompt_tokens, prompt_token_ids, prompt_token_metadata, save_prompt_tokens)
from export.step_model import StepModel, lowest_mask_value
from trees import buffers_from_parents

V = 100


@pytest.mark.parametrize("kwargs", [{"num_prompt_tokens": 0}, {"ensemble": 0}, {"ensemble": 17},
                                    {"num_prompt_tokens": 2.5}, {"ensemble": True}])
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError, match="PPDConfig"):
        PPDConfig(**kwargs)


def test_prompt_token_ids_layout():
    ids = prompt_token_ids(PPDConfig(num_prompt_tokens=3, ensemble=2), V)
    assert ids.shape == (3, 2)
    assert ids.tolist() == [[100, 101], [102, 103], [104, 105]]  # vocab + i*k + j
    assert prompt_token_ids(PPDConfig(3, 1), V).ravel().tolist() == [100, 101, 102]


def test_attach_builds_k_chains_with_the_ept_mask():
    # Tree: root 0 -> 1 -> 2, and 0 -> 3. Attach N=3, k=2 after node 2.
    parents, tokens = [-1, 0, 1, 0], [5, 6, 7, 8]
    config = PPDConfig(num_prompt_tokens=3, ensemble=2)
    new_parents, new_tokens = attach_prompt_tokens(parents, tokens, 2, config, V)
    assert new_parents[:4] == parents and new_tokens[:4] == tokens  # inputs are not modified in place
    assert parents == [-1, 0, 1, 0]
    assert new_tokens[4:] == [100, 101, 102, 103, 104, 105]
    buffers = buffers_from_parents(new_parents)
    node = {(i, j): 4 + i * 2 + j for i in range(3) for j in range(2)}
    for (i, j), n in node.items():
        seen = set(np.flatnonzero(buffers.ancestor_mask[n]).tolist())
        # the context path root..node 2, and virtual token j of prompt tokens 0..i only
        assert seen == {0, 1, 2} | {node[(i2, j)] for i2 in range(i + 1)}, (i, j)
        assert 3 not in seen  # a sibling branch of the attachment node stays hidden
        assert buffers.depth[n] == buffers.depth[2] + 1 + i
    # No chain sees another chain.
    assert not buffers.ancestor_mask[node[(2, 0)], node[(0, 1)]]
    assert not buffers.ancestor_mask[node[(1, 1)], node[(1, 0)]]


def test_attach_rejects_unknown_node():
    with pytest.raises(ValueError, match="not in the tree"):
        attach_prompt_tokens([-1], [1], 1, PPDConfig(), V)


def test_average_ensemble_logits():
    config = PPDConfig(num_prompt_tokens=2, ensemble=3)
    logits = torch.arange(2 * 3 * 4, dtype=torch.float32).view(6, 4)
    avg = average_ensemble_logits(logits, config)
    assert avg.shape == (2, 4)
    torch.testing.assert_close(avg[0], logits[0:3].mean(0))
    torch.testing.assert_close(avg[1], logits[3:6].mean(0))
    assert average_ensemble_logits(logits.view(1, 6, 4), config).shape == (1, 2, 4)
    with pytest.raises(ValueError, match="expected logits"):
        average_ensemble_logits(logits[:5], config)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_checkpoint_round_trip(tmp_path, dtype):
    config = PPDConfig(num_prompt_tokens=3, ensemble=2)
    emb = torch.randn(6, 16)
    path = save_prompt_tokens(tmp_path / "sub" / "ppd.safetensors", emb, config, "abc123", {"seed": 7}, dtype=dtype)
    loaded, loaded_config = load_prompt_tokens(path, "abc123", 16)
    assert loaded_config == config
    assert loaded.dtype == torch.float32
    torch.testing.assert_close(loaded, emb.to(dtype).float())
    assert prompt_token_metadata(path) == {"seed": 7}
    assert load_prompt_tokens(path, "abc123", 16, expected=config)[1] == config
    assert [p.name for p in path.parent.iterdir()] == ["ppd.safetensors"]  # no temp file left behind


@pytest.fixture
def saved(tmp_path):
    return save_prompt_tokens(tmp_path / "ppd.safetensors", torch.randn(3, 16), PPDConfig(3, 1), "abc123")


def test_missing_checkpoint_names_the_training_command(tmp_path):
    with pytest.raises(PromptTokenError, match=r"does not exist.*python -m train ppd"):
        load_prompt_tokens(tmp_path / "nope.safetensors", "abc123", 16)


def test_checkpoint_for_another_model_is_refused(saved):
    with pytest.raises(PromptTokenError, match=r"trained for model abc123.*loaded model is def456.*--model-dir"):
        load_prompt_tokens(saved, "def456", 16)


def test_checkpoint_of_another_hidden_size_is_refused(saved):
    with pytest.raises(PromptTokenError, match="hidden size 16.*hidden size is 32"):
        load_prompt_tokens(saved, "abc123", 32)


@pytest.mark.parametrize("expected", [PPDConfig(2, 1), PPDConfig(3, 3)])
def test_checkpoint_with_another_n_or_k_is_refused(saved, expected):
    with pytest.raises(PromptTokenError, match=rf"N=3 prompt tokens with k=1.*N={expected.num_prompt_tokens}, "
                                               rf"k={expected.ensemble} was requested.*--ensemble"):
        load_prompt_tokens(saved, "abc123", 16, expected=expected)


def test_foreign_safetensors_file_is_refused(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(2)}, str(path), metadata={"format": "pt"})
    with pytest.raises(PromptTokenError, match="not a PPD prompt-token checkpoint"):
        load_prompt_tokens(path, "abc123", 16)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not safetensors at all")
    with pytest.raises(PromptTokenError, match="not a readable safetensors file"):
        load_prompt_tokens(garbage, "abc123", 16)


def test_save_rejects_wrong_row_count(tmp_path):
    with pytest.raises(ValueError, match=r"expected embeddings \[6, H\]"):
        save_prompt_tokens(tmp_path / "x.safetensors", torch.zeros(5, 16), PPDConfig(3, 2), "abc123")


def test_metadata_is_json(saved):
    assert json.loads(json.dumps(prompt_token_metadata(saved))) == {}


# --- StepModel past_mask (used by training only) -------------------------------------------------

@pytest.fixture(scope="module")
def tiny_step_model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return StepModel(LlamaForCausalLM(config).eval(), extra_embeddings=torch.randn(4, 32))


def _causal(n):
    return torch.triu(torch.full((n, n), lowest_mask_value(torch.float32)), 1)


@torch.no_grad()
def test_past_mask_hides_committed_entries(tiny_step_model):
    model = tiny_step_model
    seq = torch.randint(0, V, (10,))
    empty = [torch.zeros(0, model.num_kv_heads, model.head_dim)] * model.num_layers
    _, keys, values = model(seq, torch.arange(10), _causal(10), empty, empty)
    new_ids, new_pos = torch.tensor([3, V + 1]), torch.tensor([6, 7])   # a plain token and a prompt token
    tree = _causal(2)
    # Hiding past entries 6..9 must equal not having them at all.
    mask = torch.zeros(2, 10)
    mask[:, 6:] = lowest_mask_value(torch.float32)
    masked, k1, _ = model(new_ids, new_pos, tree, list(keys), list(values), past_mask=mask)
    short, k2, _ = model(new_ids, new_pos, tree, [k[:6] for k in keys], [v[:6] for v in values])
    torch.testing.assert_close(masked, short, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k1, k2)
    # A zero past mask is the same as none, and the mask really changes the result.
    full, _, _ = model(new_ids, new_pos, tree, list(keys), list(values))
    zero, _, _ = model(new_ids, new_pos, tree, list(keys), list(values), past_mask=torch.zeros(2, 10))
    torch.testing.assert_close(full, zero)
    assert (full - masked).abs().max() > 1e-3
