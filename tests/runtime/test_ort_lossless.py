"""Lossless on the real model: greedy on the onnxruntime backend is token-identical to the torch backend.

The first run exports the engines into artifacts/engines/<model>/cpu/{vanilla,ppd,ht}/ (about 40 s each
on the 2-core CPU); later runs reuse them.
"""

from __future__ import annotations

import pytest

from runtime import Generator
from tests.conftest import LOSSLESS_NEW_TOKENS as NEW_TOKENS
from tests.conftest import TRAINED_FIXTURES, first_difference


@pytest.mark.parametrize("method", ["vanilla", "ppd", "hybrid", "ht"])
def test_real_model_greedy_on_onnxruntime_matches_torch(method, real_model_dir, lossless_prompts, request):
    """The default lossless subset (tests/conftest.py: 3 MT-Bench + 3 HumanEval prompts, 48 new tokens); torch's
    output of every method is itself checked against transformers' greedy (tests/runtime/test_*.py)."""
    if method in TRAINED_FIXTURES:
        request.getfixturevalue(TRAINED_FIXTURES[method])
    prompts = lossless_prompts
    torch_gen = Generator.from_pretrained(real_model_dir, method=method)
    ort_gen = Generator.from_pretrained(real_model_dir, method=method, backend="onnxruntime")
    bad = []
    for item in prompts:
        want = torch_gen.generate(item.prompt, max_new_tokens=NEW_TOKENS).token_ids
        got = ort_gen.generate(item.prompt, max_new_tokens=NEW_TOKENS).token_ids
        first = first_difference(got, want)
        if first is not None:
            bad.append(f"{item.id}: first difference at new token {first}")
    assert not bad, f"{method} on onnxruntime differs from torch: {bad}"
