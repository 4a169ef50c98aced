"""Lossless: greedy output of every method equals transformers generate(do_sample=False) on the real model."""

import pytest

from runtime import Generator
from tests.conftest import LOSSLESS_NEW_TOKENS


@pytest.mark.parametrize("method", ["vanilla", "ngram"])
def test_method_matches_transformers_generate(method, real_model_dir, lossless_prompts, hf_reference):
    gen = Generator.from_pretrained(real_model_dir, method=method)
    mismatches = []
    for item in lossless_prompts:
        prompt_ids, expected = hf_reference[item.id]
        got = gen.generate(prompt_ids, max_new_tokens=LOSSLESS_NEW_TOKENS).token_ids
        if got != expected:
            first = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
            mismatches.append(f"{item.id}: first difference at new token {first}")
    assert not mismatches, f"{method} differs from transformers greedy: {mismatches}"
