"""Fixtures shared by the training tests (PPD and HT)."""

import pytest
import torch


@pytest.fixture(scope="module")
def sharp_tiny_model_dir(real_model_dir, tmp_path_factory):
    """A 2-layer, hidden-32 random Llama with the real tokenizer, initialised wide (std 0.2) so its
    next-token distributions are peaked enough for a few training steps to show (the std-0.02 tiny
    model of conftest is nearly uniform: its KL starts at ~0.03 and is noise)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama-32")
    tokenizer = AutoTokenizer.from_pretrained(real_model_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         initializer_range=0.2, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
