"""Fixtures and helpers shared by the training tests (PPD and HT)."""

import json

import numpy as np
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


def write_sharegpt(path, count=300):
    """A small ShareGPT-style file, truncated mid-record like the packaged one."""
    rng = np.random.default_rng(0)
    words = "the a cat dog runs jumps over under blue red quick slow code python list sort".split()
    items = []
    for i in range(count):
        turns = []
        for _ in range(2):
            turns.append({"from": "human", "value": " ".join(rng.choice(words, 8)) + "?"})
            turns.append({"from": "gpt", "value": " ".join(rng.choice(words, 30)) + "."})
        items.append({"id": f"c{i}_0", "conversations": turns})
    text = json.dumps(items)
    path.write_text(text[: len(text) - 40])
    return path


def interrupt_and_resume(module, train, config, crash_at_call: int, monkeypatch):
    """Run `train(config)` with `module.sample_forward` raising KeyboardInterrupt on its crash_at_call-th
    call (pick one after a checkpoint was saved), check the resume file is there, train again and return
    the resumed run's result."""
    real_forward, calls = module.sample_forward, []

    def crashing_forward(*args, **kwargs):
        calls.append(1)
        if len(calls) == crash_at_call:
            raise KeyboardInterrupt
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(module, "sample_forward", crashing_forward)
    with pytest.raises(KeyboardInterrupt):
        train(config)
    assert config.resume_path.is_file(), "the interrupted run left no resume file"
    monkeypatch.setattr(module, "sample_forward", real_forward)
    return train(config)
