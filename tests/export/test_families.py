"""Every supported family through the step (export/families.py, export/step_model.py): the record read from
the config, RoPE bitwise as transformers', prefill and tree steps against the family's own transformers
forward, the sliding window, refusals."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from export.attention import attention
from export.families import FULL, SLIDING, FamilyError, family_record
from export.masks import lowest_mask_value
from export.step_model import StepModel
from tests.export.tiny_families import FAMILY_NAMES, SLIDING_NAMES, WINDOW, tiny_model
from trees import Tree

LOW = lowest_mask_value(torch.float32)


def causal_mask(t: int) -> torch.Tensor:
    return torch.triu(torch.full((t, t), LOW), 1)


def empty_past(model: StepModel) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    empty = torch.zeros(0, model.num_kv_heads, model.head_dim)
    return [empty] * model.num_layers, [empty] * model.num_layers


def prefill(step: StepModel, ids: torch.Tensor, sliding: bool = True):
    """One causal step over `ids` on an empty cache; sliding=False passes the global masks to the sliding
    layers (the window switched off)."""
    n = len(ids)
    mask, positions = causal_mask(n), torch.arange(n)
    masks = step.sliding_masks(mask, positions, 0) if sliding else (mask, torch.zeros(n, 0))
    return step(ids, positions, mask, *empty_past(step), None, *masks)


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def family(request):
    hf = tiny_model(request.param)
    return request.param, hf, StepModel(hf)


def test_record_reads_each_family():
    records = {name: family_record(tiny_model(name).config) for name in FAMILY_NAMES}
    assert records["llama"].family == "llama" and not records["llama"].has_sliding_layers
    assert (records["llama-bias-llama3rope"].qkv_bias, records["llama-bias-llama3rope"].o_bias,
            records["llama-bias-llama3rope"].mlp_bias) == (True, True, True)
    assert (records["qwen2"].qkv_bias, records["qwen2"].o_bias) == (True, False)
    assert records["qwen2"].layer_types == (FULL, SLIDING, SLIDING) and records["qwen2"].sliding_window == WINDOW + 1
    assert records["qwen3"].qk_norm and records["qwen3"].head_dim == 24
    assert records["mistral"].sliding_layers == (0, 1, 2) and records["mistral"].sliding_window == WINDOW
    gemma = records["gemma3"]
    assert gemma.sandwich_norms and gemma.qk_norm and gemma.norm_scale_fp32 and gemma.norm_offset == 1.0
    assert gemma.activation == "gelu_tanh" and gemma.embed_scale == 64 ** 0.5 and gemma.tied_head
    assert gemma.attention_scale == 24 ** -0.5 and gemma.final_softcap == 15.0
    assert gemma.attn_softcap is None            # Gemma3Attention never applies attn_logit_softcapping
    assert gemma.sliding_layers == (0, 2)
    assert gemma.rope_of(SLIDING).theta == 10_000.0 and gemma.rope_of(FULL).rope_type == "linear"
    assert records["phi3"].fused_weights and records["phi3"].rope_of(SLIDING).rotary_dim == 8


def test_rope_is_transformers_own(family):
    """inv_freq and attention scaling per layer type, bitwise those of the family's rotary module."""
    _, hf, step = family
    rotary = hf.model.rotary_emb
    for kind, spec in step.family.rope:
        inv_freq = getattr(rotary, f"{kind}_inv_freq", None)
        inv_freq = rotary.inv_freq if inv_freq is None else inv_freq
        scaling = getattr(rotary, f"{kind}_attention_scaling", getattr(rotary, "attention_scaling", None))
        assert torch.equal(torch.tensor(spec.inv_freq), inv_freq.float()), kind
        assert spec.attention_scaling == scaling


def test_prefill_matches_transformers(family):
    _, hf, step = family
    ids = torch.randint(0, step.vocab_size, (12,), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = hf(ids[None]).logits[0]
        logits, keys, values = prefill(step, ids)
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)
    assert keys.shape == (step.num_layers, 12, step.num_kv_heads, step.head_dim) == values.shape


def test_tree_step_equals_each_path_scored_alone(family):
    """Every tree node's logits equal those of its root..node path run as a plain sequence, on a cache
    longer than the window (tiny windows also cut through the tree: depth 3 > window - prefix)."""
    _, hf, step = family
    g = torch.Generator().manual_seed(2)
    prefix = torch.randint(0, step.vocab_size, (7,), generator=g)
    tree = Tree(paths=((0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)), topk=2)
    tokens = torch.randint(0, step.vocab_size, (tree.size,), generator=g)
    b = tree.buffers
    mask = torch.zeros(tree.size, tree.size).masked_fill_(~torch.from_numpy(b.ancestor_mask.copy()), LOW)
    positions = 7 + torch.from_numpy(b.depth.copy())
    with torch.inference_mode():
        _, pk, pv = prefill(step, prefix)
        logits, _, _ = step(tokens, positions, mask, list(pk), list(pv), None,
                            *step.sliding_masks(mask, positions, 7))
        for node in range(tree.size):
            path = torch.from_numpy(b.ancestor_mask[node].nonzero()[0])
            ref = hf(torch.cat([prefix, tokens[path]])[None]).logits[0, -1]
            torch.testing.assert_close(logits[node], ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", SLIDING_NAMES)
def test_the_window_is_applied(name):
    """With the window off (global masks on the sliding layers) rows past the window differ from
    transformers; with it on they match. Rows within the window are the same either way."""
    hf = tiny_model(name)
    step = StepModel(hf)
    ids = torch.randint(0, step.vocab_size, (14,), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ref = hf(ids[None]).logits[0]
        on, off = prefill(step, ids)[0], prefill(step, ids, sliding=False)[0]
    window = step.family.sliding_window
    torch.testing.assert_close(on, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(off[:window], ref[:window], atol=1e-4, rtol=1e-4)
    assert (off[window:] - ref[window:]).abs().amax(-1).min() > 1e-3


def test_sliding_layers_need_their_masks():
    step = StepModel(tiny_model("mistral"))
    with pytest.raises(ValueError, match="sliding_tree_mask and sliding_past_mask"):
        step(torch.tensor([1, 2]), torch.arange(2), causal_mask(2), *empty_past(step))
    assert StepModel(tiny_model("llama")).sliding_masks(causal_mask(2), torch.arange(2), 0) == (None, None)


def test_rope_that_follows_the_sequence_length_is_refused():
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, rope_parameters=dict(rope_type="dynamic", factor=2.0,
                                                                     rope_theta=10000.0))
    with pytest.raises(FamilyError, match="'dynamic' changes its frequencies"):
        family_record(config)


def test_unknown_activation_is_refused():
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, hidden_act="relu")
    with pytest.raises(FamilyError, match="activation 'relu'"):
        family_record(config)


@pytest.mark.parametrize("shape_free", [False, True])
def test_attention_softcap_is_transformers_arithmetic(shape_free):
    """No family of today caps scores (export/families.py), but the step's path for one is transformers'
    eager attention with softcap: scores * scale, cap * tanh(. / cap), + mask, softmax."""
    from transformers.models.gemma3.modeling_gemma3 import eager_attention_forward

    g = torch.Generator().manual_seed(4)
    t, s, hq, hkv, d = 3, 4, 4, 2, 8
    q, k, v = (torch.randn(t, h, d, generator=g) * 3 for h in (hq, hkv, hkv))
    past_k, past_v = torch.randn(s, hkv, d, generator=g) * 3, torch.randn(s, hkv, d, generator=g)
    ours = attention(q, k, v, causal_mask(t), past_k, past_v, None, -1 if shape_free else t, (hq, hkv, d),
                     d ** -0.5, cap=5.0, shape_free=shape_free)
    keys, values = torch.cat([past_k, k]), torch.cat([past_v, v])
    mask = torch.cat([torch.zeros(t, s), causal_mask(t)], dim=1)
    module = torch.nn.Module()
    module.num_key_value_groups, module.training = hq // hkv, False
    ref, _ = eager_attention_forward(module, q.transpose(0, 1)[None], keys.transpose(0, 1)[None],
                                     values.transpose(0, 1)[None], mask[None, None], scaling=d ** -0.5, softcap=5.0)
    torch.testing.assert_close(ours, ref[0].reshape(t, hq * d), atol=1e-5, rtol=1e-5)
