import pytest
import torch

from export.checkpoint import load_checkpoint
from export.step_model import StepModel, lowest_mask_value
from trees import Tree


def causal_mask(t: int) -> torch.Tensor:
    return torch.triu(torch.full((t, t), lowest_mask_value(torch.float32)), 1)


def empty_past(model: StepModel):
    empty = torch.zeros(0, model.num_kv_heads, model.head_dim)
    return [empty] * model.num_layers, [empty] * model.num_layers


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    hf, _ = load_checkpoint(tiny_model_dir)
    return hf, StepModel(hf)


def test_prefill_matches_transformers(tiny):
    hf, step = tiny
    ids = torch.randint(0, step.vocab_size, (12,))
    with torch.inference_mode():
        ref = hf(ids[None]).logits[0]
        logits, keys, values = step(ids, torch.arange(12), causal_mask(12), *empty_past(step))
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)
    assert keys.shape == (step.num_layers, 12, step.num_kv_heads, step.head_dim) == values.shape


def test_tree_step_equals_each_path_scored_alone(tiny):
    """Every tree node's logits equal those of its root..node path run as a plain sequence."""
    hf, step = tiny
    prefix = torch.randint(0, step.vocab_size, (7,))
    tree = Tree(paths=((0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)), topk=2)
    tokens = torch.randint(0, step.vocab_size, (tree.size,))
    b = tree.buffers
    mask = torch.zeros(tree.size, tree.size).masked_fill_(~torch.from_numpy(b.ancestor_mask.copy()),
                                                           lowest_mask_value(torch.float32))
    with torch.inference_mode():
        _, pk, pv = step(prefix, torch.arange(7), causal_mask(7), *empty_past(step))
        logits, _, _ = step(tokens, 7 + torch.from_numpy(b.depth.copy()), mask, list(pk), list(pv))
        for node in range(tree.size):
            path = torch.from_numpy(b.ancestor_mask[node].nonzero()[0])
            seq = torch.cat([prefix, tokens[path]])
            ref = hf(seq[None]).logits[0, -1]
            torch.testing.assert_close(logits[node], ref, atol=1e-4, rtol=1e-4)


def test_extra_embeddings_take_ids_after_the_vocabulary(tiny):
    hf, _ = tiny
    extra = torch.randn(3, hf.config.hidden_size)
    step = StepModel(hf, extra)
    ids = torch.tensor([5, step.vocab_size + 2, 7])
    emb = step.embed(ids)
    torch.testing.assert_close(emb[1], extra[2])
    torch.testing.assert_close(emb[0], hf.model.embed_tokens.weight[5])
    assert step.num_extra_tokens == 3


def test_real_model_prefill_matches_transformers(real_model_dir):
    hf, tokenizer = load_checkpoint(real_model_dir)
    step = StepModel(hf)
    ids = torch.tensor(tokenizer("The quick brown fox jumps over the lazy dog.").input_ids)
    with torch.inference_mode():
        ref = hf(ids[None]).logits[0]
        logits, _, _ = step(ids, torch.arange(len(ids)), causal_mask(len(ids)), *empty_past(step))
    assert (logits - ref).abs().max() < 1e-3
    assert torch.equal(logits.argmax(-1), ref.argmax(-1))


def test_mask_value_is_finite_in_fp16():
    assert torch.isfinite(torch.tensor(lowest_mask_value(torch.float16), dtype=torch.float16))


def test_a_model_of_another_family_is_refused_naming_the_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    from export.families import FamilyError

    with pytest.raises(FamilyError, match=r"'gpt2' is not a supported family.*llama \(llama\)"):
        StepModel(GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=32)))


def test_row_exact_attention_computes_the_same_step(tiny):
    """row_exact only reorders the attention's arithmetic (export/step_model.py): same logits and KV,
    with and without a committed prefix and with training's past_mask."""
    hf, step = tiny
    exact = StepModel(hf, row_exact=True)
    prefix = torch.randint(0, step.vocab_size, (9,))
    tokens = torch.randint(0, step.vocab_size, (5,))
    mask = causal_mask(5)
    past_mask = torch.zeros(5, 9)
    past_mask[2:, :3] = lowest_mask_value(torch.float32)     # rows 2.. do not see the first 3 entries
    with torch.inference_mode():
        for model in (step, exact):
            assert model.row_exact is (model is exact)
        first = [m(prefix, torch.arange(9), causal_mask(9), *empty_past(m)) for m in (step, exact)]
        for a, b in zip(*first):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        _, pk, pv = first[0]
        steps = [m(tokens, 9 + torch.arange(5), mask, list(pk), list(pv), past_mask) for m in (step, exact)]
        for a, b in zip(*steps):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
