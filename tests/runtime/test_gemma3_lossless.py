"""Lossless on the second real model, Gemma 3 270M (a base model: prompts go in as raw text): plain greedy
equals transformers' own generate, and every method (ngram, ppd and hybrid with the committed Gemma prompt
tokens and trees) emits vanilla's tokens, greedy and with a seed, on torch and onnxruntime.

Default tier: 2 prompts x 16 tokens on torch, plain greedy against transformers and hybrid (PPD's and the
n-gram source's drafts in one tree) against vanilla. Slow tier: 20 prompts (10 MT-Bench, 10 HumanEval) x 64
tokens, greedy and seeded sampling, torch and onnxruntime (the engine export, ~1 GB, takes minutes)."""

from __future__ import annotations

import pytest
import torch

from export.checkpoint import PackageSource, load_checkpoint, make_model_dir
from export.paths import ARTIFACTS_DIR, REPO_ROOT
from runtime import Generator
from tests.conftest import first_difference
from tools.bench.prompts import load_prompts

GEMMA_DIR = ARTIFACTS_DIR / "models" / "gemma3-270m"
GEMMA_CHECKPOINTS = REPO_ROOT / "checkpoints" / "gemma3-270m"
PPD_CHECKPOINT = GEMMA_CHECKPOINTS / "ppd-prompt-tokens.safetensors"
METHODS = ("ngram", "ppd", "hybrid")
SAMPLING = {"temperature": 0.8, "top_p": 0.95, "seed": 7}


@pytest.fixture(scope="module")
def gemma_dir():
    if not (GEMMA_DIR / "config.json").is_file():
        make_model_dir(PackageSource("gemma3-270m"), GEMMA_DIR)
    if not PPD_CHECKPOINT.is_file():
        pytest.fail(f"the Gemma 3 prompt tokens are missing at {PPD_CHECKPOINT}: `make train MODEL=gemma3-270m`")
    return GEMMA_DIR


def method_options(method: str, backend: str) -> dict:
    """The committed Gemma checkpoint and the tree searched for it (ppd's serves hybrid's PPD part where no
    hybrid tree was searched for this backend)."""
    if method not in ("ppd", "hybrid"):
        return {}
    trees = sorted(GEMMA_CHECKPOINTS.glob(f"{method}-tree-cpu-*.json")) or sorted(
        GEMMA_CHECKPOINTS.glob("ppd-tree-cpu-*.json"))
    if not trees:
        pytest.fail(f"no searched tree in {GEMMA_CHECKPOINTS}: `make tree MODEL=gemma3-270m`")
    return {"checkpoint": str(PPD_CHECKPOINT), "tree": str(trees[0])}


def prompts(count: int):
    return [p for pair in zip(load_prompts("mtbench", limit=count // 2), load_prompts("humaneval", limit=count // 2))
            for p in pair]


def hf_greedy(hf, ids: list[int], new_tokens: int) -> list[int]:
    x = torch.tensor([ids])
    with torch.inference_mode():
        out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens, do_sample=False)
    return out[0, len(ids):].tolist()


def against_vanilla(model_dir, backend: str, items, new_tokens: int, decoding: dict,
                    methods: tuple[str, ...] = METHODS) -> list[str]:
    vanilla = Generator.from_pretrained(model_dir, backend=backend)
    want = {item.id: vanilla.generate(item.prompt, max_new_tokens=new_tokens, **decoding).token_ids for item in items}
    bad = []
    for method in methods:
        gen = Generator.from_pretrained(model_dir, method=method, backend=backend, **method_options(method, backend))
        for item in items:
            first = first_difference(gen.generate(item.prompt, max_new_tokens=new_tokens, **decoding).token_ids,
                                     want[item.id])
            if first is not None:
                bad.append(f"{method} {item.id}: first difference at new token {first}")
    return bad


def test_gemma_greedy_equals_transformers_and_hybrid_equals_vanilla(gemma_dir):
    items = prompts(2)
    hf, _ = load_checkpoint(gemma_dir)
    vanilla = Generator.from_pretrained(gemma_dir)
    assert vanilla.tokenizer.chat_template is None   # a base model: the raw text is the prompt
    for item in items:
        ids = vanilla.encode(item.prompt)
        assert vanilla.generate(ids, max_new_tokens=16).token_ids == hf_greedy(hf, ids, 16), item.id
    bad = against_vanilla(gemma_dir, "torch", items, 16, {}, methods=("hybrid",))   # ppd's and ngram's drafts in one
    assert not bad, f"methods that differ from vanilla on Gemma 3: {bad}"


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
@pytest.mark.parametrize("decoding", [{}, SAMPLING], ids=["greedy", "sampled"])
def test_gemma_20_prompts_every_method_equals_vanilla(gemma_dir, backend, decoding):
    bad = against_vanilla(gemma_dir, backend, prompts(20), 64, decoding)
    assert not bad, f"methods that differ from vanilla on Gemma 3 ({backend}): {bad}"


@pytest.mark.slow
def test_gemma_plain_greedy_equals_transformers_on_20_prompts(gemma_dir):
    hf, _ = load_checkpoint(gemma_dir)
    vanilla = Generator.from_pretrained(gemma_dir)
    bad = [item.id for item in prompts(20) if vanilla.generate(item.prompt, max_new_tokens=64).token_ids
           != hf_greedy(hf, vanilla.encode(item.prompt), 64)]
    assert not bad, f"plain greedy differs from transformers' generate on {bad}"
