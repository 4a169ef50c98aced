"""Lossless on the real model: greedy on the onnxruntime backend is token-identical to the torch backend.

The first run exports the engines into artifacts/engines/<model>/cpu/{vanilla,ppd}/ (about 40 s each on
the 2-core CPU); later runs reuse them.
"""

from __future__ import annotations

import pytest

from runtime import Generator
from runtime.prompts import load_prompts

NEW_TOKENS = 32


@pytest.mark.parametrize("method", ["vanilla", "ppd"])
def test_real_model_greedy_on_onnxruntime_matches_torch(method, real_model_dir):
    """4 MT-Bench + 4 HumanEval prompts, 32 new tokens each."""
    prompts = load_prompts("mtbench", limit=4) + load_prompts("humaneval", limit=4)
    torch_gen = Generator.from_pretrained(real_model_dir, method=method)
    ort_gen = Generator.from_pretrained(real_model_dir, method=method, backend="onnxruntime")
    bad = []
    for item in prompts:
        want = torch_gen.generate(item.prompt, max_new_tokens=NEW_TOKENS).token_ids
        got = ort_gen.generate(item.prompt, max_new_tokens=NEW_TOKENS).token_ids
        if got != want:
            first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            bad.append(f"{item.id}: first difference at new token {first}")
    assert not bad, f"{method} on onnxruntime differs from torch: {bad}"
