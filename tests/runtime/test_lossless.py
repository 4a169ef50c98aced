"""Lossless: greedy output of every method equals transformers generate(do_sample=False) on the real model.

ppd and ht run the hand-picked trees (21 tokens, depth 3, every slot count): the trees searched for the
CPU are small on this hardware, and the lossless check should walk deep, branching trees."""

import numpy as np
import pytest

from runtime import Generator
from export.methods import METHODS
from tests.conftest import LOSSLESS_NEW_TOKENS, TRAINED_FIXTURES, first_difference



@pytest.mark.parametrize("method", ["vanilla", "ngram", "ppd", "ht"])
def test_method_matches_transformers_generate(method, real_model_dir, lossless_prompts, hf_reference, request):
    if method in TRAINED_FIXTURES:
        request.getfixturevalue(TRAINED_FIXTURES[method])
    options = {"tree": str(METHODS[method].hand_picked_tree)} if METHODS[method].tree_set else {}
    gen = Generator.from_pretrained(real_model_dir, method=method, **options)
    mismatches, accepted = [], []
    for item in lossless_prompts:
        prompt_ids, expected = hf_reference[item.id]
        result = gen.generate(prompt_ids, max_new_tokens=LOSSLESS_NEW_TOKENS)
        accepted.append(result.stats.mean_accepted)
        first = first_difference(result.token_ids, expected)
        if first is not None:
            mismatches.append(f"{item.id}: first difference at new token {first}")
    assert not mismatches, f"{method} differs from transformers greedy: {mismatches}"
    if method in TRAINED_FIXTURES:  # the trained tokens / maps must actually be guessing: well above vanilla's 1.0
        assert np.mean(accepted) > 1.3, np.mean(accepted)
