"""Tiny random-weight models of every supported family, built from each family's transformers config class
(fixed seed, no hub), as tests/export/tiny_llama.py does for Llama.

Each config turns on what its family's record reads: biases, q/k norms, Gemma's four norms and
soft-capping, a RoPE scaling type, partial rotary, and a sliding window of 5-6 positions, small enough
to bite in a 12-token prompt. Weights have std 0.3 (logits O(1) apart), and every 1-D parameter (norm
weights, biases: zeros or ones at init) gets noise, so a norm offset or a bias the step dropped shows.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, Gemma3TextConfig, LlamaConfig, MistralConfig,
                          Phi3Config, PreTrainedModel, Qwen2Config, Qwen3Config)

SIZES = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=4096, initializer_range=0.3)
WINDOW = 5

# name -> (config class, options beyond SIZES); names are families, or family-variant.
TINY_CONFIGS = {
    "llama": (LlamaConfig, dict(tie_word_embeddings=True)),
    "llama-bias-llama3rope": (LlamaConfig, dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=False,
                                                rope_parameters=dict(rope_type="llama3", rope_theta=10000.0,
                                                                     factor=8.0, low_freq_factor=1.0,
                                                                     high_freq_factor=4.0,
                                                                     original_max_position_embeddings=64))),
    # layers >= max_window_layers slide: layer 0 global, 1 and 2 sliding
    "qwen2": (Qwen2Config, dict(use_sliding_window=True, sliding_window=WINDOW + 1, max_window_layers=1,
                                tie_word_embeddings=True)),
    "qwen3": (Qwen3Config, dict(head_dim=24, attention_bias=True, tie_word_embeddings=False)),
    "mistral": (MistralConfig, dict(sliding_window=WINDOW, head_dim=16)),
    "gemma3": (Gemma3TextConfig, dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW,
                                      layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                      rope_parameters={"full_attention": dict(rope_type="linear", factor=8.0,
                                                                              rope_theta=1_000_000.0),
                                                       "sliding_attention": dict(rope_type="default",
                                                                                 rope_theta=10_000.0)},
                                      attn_logit_softcapping=20.0, final_logit_softcapping=15.0,
                                      pad_token_id=0, bos_token_id=None, eos_token_id=None)),
    "phi3": (Phi3Config, dict(sliding_window=WINDOW + 1, partial_rotary_factor=0.5, pad_token_id=0,
                              bos_token_id=None, eos_token_id=None)),
}
FAMILY_NAMES = tuple(TINY_CONFIGS)
SLIDING_NAMES = ("qwen2", "mistral", "gemma3", "phi3")


def tiny_config(name: str, vocab_size: int):
    cls, options = TINY_CONFIGS[name]
    config = cls(vocab_size=vocab_size, **{**SIZES, **options})
    config._attn_implementation = "eager"   # the reference arithmetic: explicit masks, softcapping supported
    return config


def tiny_model(name: str, vocab_size: int = 256, seed: int = 0) -> PreTrainedModel:
    """A random model of family variant `name` (in memory, eval mode)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(name, vocab_size))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(0.2 * torch.randn(param.shape, generator=generator))
    return model.eval().requires_grad_(False)


def make_tiny_family(name: str, out: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A checkpoint dir of a tiny `name` model with the real tokenizer (for export and validation)."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tiny_model(name, len(tokenizer), seed).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
