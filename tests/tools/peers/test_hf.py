"""The transformers peers on the tiny random Llama: greedy `generate` is what our vanilla emits; the
compiled peer (static cache, torch.compile) emits the same tokens; a bad mode is refused."""

from __future__ import annotations

import pytest

from runtime import Generator
from tools.peers.hf import bench_runner


def test_hf_generate_emits_vanillas_tokens(tiny_model_dir):
    gen = Generator.from_pretrained(tiny_model_dir)
    ids = gen.encode("Write a poem about the sea")
    run = bench_runner(str(tiny_model_dir), "cpu", 12, min(gen.eos_token_ids))
    assert run(ids).token_ids == gen.generate(ids, max_new_tokens=12).token_ids


def test_an_unknown_mode_is_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="choose one of generate, prompt-lookup, compiled"):
        bench_runner(str(tiny_model_dir), "cpu", 4, 0, mode="fast")


@pytest.mark.slow
def test_the_compiled_peer_emits_plain_generates_tokens(tiny_model_dir):
    """Compiles the tiny model with inductor on the CPU (a minute or two)."""
    gen = Generator.from_pretrained(tiny_model_dir)
    plain = bench_runner(str(tiny_model_dir), "cpu", 12, min(gen.eos_token_ids))
    compiled = bench_runner(str(tiny_model_dir), "cpu", 12, min(gen.eos_token_ids), mode="compiled")
    for prompt in ("Write a poem about the sea", "def add(a, b):"):
        ids = gen.encode(prompt)
        assert compiled(ids).token_ids == plain(ids).token_ids
