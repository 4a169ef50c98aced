"""Lossless: greedy output of every method equals transformers generate(do_sample=False) on the real model.

ppd and ht run the hand-picked trees (21 tokens, depth 3, every slot count): the trees searched for the
CPU are small on this hardware, and the lossless check should walk deep, branching trees."""

import numpy as np
import pytest

from runtime import Generator
from export.methods import METHODS
from tests.conftest import LOSSLESS_NEW_TOKENS, TRAINED_FIXTURES, first_difference



@pytest.mark.parametrize("method", ["vanilla", "ngram", "ppd", "hybrid", "ht"])
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


SAMPLED_TOKENS = 32

# (seed, temperature, top_p, top_k) per prompt: many settings across the subset.
SAMPLING_SETTINGS = [(s, t, p, k) for s, (t, p, k) in enumerate([(0.7, 0.9, 0), (0.8, 0.8, 50), (1.2, 0.9, 0),
                                                                   (1.0, 1.0, 0), (0.5, 0.95, 0)] * 2)]


@pytest.mark.parametrize("backend,methods", [("torch", ["ngram", "ppd", "hybrid", "ht"]),
                                             ("onnxruntime", ["ppd", "hybrid", "ht"])])
def test_methods_sample_exactly_what_vanilla_samples(backend, methods, real_model_dir, lossless_prompts, request):
    """Under sampling, for a given seed, every method emits the tokens plain (vanilla) sampling emits
    on the same backend: real prompts, several seeds, temperatures and top-p / top-k."""
    for method in methods:
        if method in TRAINED_FIXTURES:
            request.getfixturevalue(TRAINED_FIXTURES[method])
    vanilla = Generator.from_pretrained(real_model_dir, backend=backend)
    prompts = lossless_prompts[::2]   # MT-Bench and HumanEval both
    settings = [dict(seed=s, temperature=t, top_p=p, top_k=k) for s, t, p, k in SAMPLING_SETTINGS]
    want = [vanilla.generate(item.prompt, max_new_tokens=SAMPLED_TOKENS, **s).token_ids
            for item, s in zip(prompts, settings)]
    mismatches = []
    for method in methods:
        options = {"tree": str(METHODS[method].hand_picked_tree)} if METHODS[method].tree_set else {}
        gen = Generator.from_pretrained(real_model_dir, method=method, backend=backend, **options)
        for item, s, expected in zip(prompts, settings, want):
            first = first_difference(gen.generate(item.prompt, max_new_tokens=SAMPLED_TOKENS, **s).token_ids, expected)
            if first is not None:
                mismatches.append(f"{method} {item.id} {s}: first difference at new token {first}")
    assert not mismatches, mismatches
