"""Slow tier: the full lossless sweep, every parallel method against vanilla greedy on the same backend.

All 80 MT-Bench first turns and the first 40 HumanEval prompts, 128 new tokens (`make test-slow`).
Each backend's vanilla output is the reference for that backend (lossless is a same-backend property;
the fast tier checks torch against transformers and onnxruntime against torch)."""

import pytest

from runtime import Generator
from export.methods import METHODS
from tools.bench.prompts import load_prompts
from tests.conftest import TRAINED_FIXTURES

pytestmark = pytest.mark.slow
NEW_TOKENS = 128


@pytest.fixture(scope="module")
def sweep_prompts():
    return load_prompts("mtbench") + load_prompts("humaneval", limit=40)


@pytest.fixture(scope="module")
def vanilla_outputs(real_model_dir, sweep_prompts):
    """{backend: {prompt id: token ids}}, filled on first use per backend."""
    cache: dict[str, dict[str, list[int]]] = {}

    def outputs(backend: str) -> dict[str, list[int]]:
        if backend not in cache:
            gen = Generator.from_pretrained(real_model_dir, backend=backend)
            cache[backend] = {item.id: gen.generate(item.prompt, max_new_tokens=NEW_TOKENS).token_ids
                              for item in sweep_prompts}
        return cache[backend]
    return outputs


@pytest.mark.parametrize("backend,method", [("torch", "ngram"), ("torch", "ppd"), ("torch", "ht"),
                                            ("onnxruntime", "ppd"), ("onnxruntime", "ht"),
                                            ("onnxruntime", "hybrid")])
def test_full_sweep_matches_vanilla(backend, method, real_model_dir, sweep_prompts, vanilla_outputs, request):
    if method in TRAINED_FIXTURES:
        request.getfixturevalue(TRAINED_FIXTURES[method])
    # the hand-picked trees: deep and branching, the hardest to keep lossless (searched CPU trees are small)
    options = {"tree": str(METHODS[method].hand_picked_tree)} if METHODS[method].tree_set else {}
    gen = Generator.from_pretrained(real_model_dir, method=method, backend=backend, **options)
    reference = vanilla_outputs(backend)
    bad = [item.id for item in sweep_prompts
           if gen.generate(item.prompt, max_new_tokens=NEW_TOKENS).token_ids != reference[item.id]]
    assert not bad, f"{method} on {backend} differs from vanilla greedy on {len(bad)} prompts: {bad}"
