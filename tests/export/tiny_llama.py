"""A tiny random-weight Llama for ONNX export and backend tests.

Unlike conftest's `tiny_model_dir` (init std 0.02, whose greedy output repeats one token), the
weights here have std 0.3, so logits are O(1) apart and greedy text varies token to token: a
backend that is off by a little produces different tokens, not the same degenerate ones.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM


def make_tiny_llama(out: Path, tokenizer_dir: Path, seed: int = 0, tied: bool = True) -> Path:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=tied, initializer_range=0.3, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
