"""Lossless for every supported family (tiny random models, tests/export/tiny_families.py): plain greedy
decoding on the step equals transformers' own generate, and vanilla, ngram, ppd and hybrid (random
prompt tokens, a small fixed tree) emit plain decoding's tokens on torch and onnxruntime, greedy and
with a seed. The prompts run past each sliding family's window."""

from __future__ import annotations

import json

import pytest
import torch

import export.engine
from export.checkpoint import load_checkpoint, model_fingerprint
from export.ppd import PPDConfig, save_prompt_tokens
from runtime import Generator
from tests.conftest import first_difference
from tests.export.tiny_families import FAMILY_NAMES, make_tiny_family
from tests.runtime.test_ppd import TREES

MAX_CONTEXT, NEW_TOKENS = 256, 20
PROMPTS = ["Write a poem about the sea and the sky and the sea again, please",
           "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):"]
SAMPLING = {"temperature": 0.9, "top_p": 0.95, "seed": 5}


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def family(request, tmp_path_factory, real_model_dir):
    """(name, model dir, method options of ppd and hybrid) with the engines exported into a temp dir."""
    root = tmp_path_factory.mktemp(request.param)
    model_dir = make_tiny_family(request.param, root / "model", real_model_dir)
    hidden = load_checkpoint(model_dir)[0].config.hidden_size
    torch.manual_seed(2)
    checkpoint = save_prompt_tokens(root / "ppd.safetensors", torch.randn(4, hidden) * 0.02,
                                    PPDConfig(num_prompt_tokens=2, ensemble=2), model_fingerprint(model_dir),
                                    dtype=torch.float32)
    tree = root / "tree.json"
    tree.write_text(json.dumps(TREES))
    return request.param, model_dir, {"checkpoint": str(checkpoint), "tree": str(tree)}


@pytest.fixture
def artifacts(tmp_path_factory, monkeypatch):
    monkeypatch.setattr(export.engine, "ARTIFACTS_DIR", tmp_path_factory.getbasetemp() / "family-artifacts")


def test_plain_greedy_equals_transformers_generate(family):
    name, model_dir, _ = family
    hf, _ = load_checkpoint(model_dir)
    gen = Generator.from_pretrained(model_dir, max_context=MAX_CONTEXT)
    for prompt in PROMPTS:
        ids = gen.encode(prompt)
        x = torch.tensor([ids])
        with torch.inference_mode():
            want = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS,
                               do_sample=False)[0, len(ids):].tolist()
        assert gen.generate(ids, max_new_tokens=NEW_TOKENS).token_ids == want, \
            f"{name}: plain greedy differs from transformers' generate"


@pytest.mark.parametrize("decoding", [{}, SAMPLING], ids=["greedy", "sampled"])
def test_every_method_on_both_backends_emits_plain_decodings_tokens(family, decoding, artifacts):
    name, model_dir, options = family
    plain = Generator.from_pretrained(model_dir, max_context=MAX_CONTEXT)
    want = [plain.generate(p, max_new_tokens=NEW_TOKENS, **decoding).token_ids for p in PROMPTS]
    bad = []
    for backend in ("torch", "onnxruntime"):
        for method in ("vanilla", "ngram", "ppd", "hybrid"):
            gen = Generator.from_pretrained(model_dir, method=method, backend=backend, max_context=MAX_CONTEXT,
                                            **(options if method in ("ppd", "hybrid") else {}))
            for prompt, tokens in zip(PROMPTS, want):
                first = first_difference(gen.generate(prompt, max_new_tokens=NEW_TOKENS, **decoding).token_ids, tokens)
                if first is not None:
                    bad.append(f"{method} on {backend}: first difference at new token {first}")
    assert not bad, f"{name}: {bad}"
