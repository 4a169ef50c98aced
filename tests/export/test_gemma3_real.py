"""The real Gemma 3 270M through the step, fp32, against transformers' own Gemma3ForCausalLM: a second real
family (sliding window of 512 on 5 of 6 layers with their own RoPE base, q/k norms, four norms per layer,
tanh GeGLU, embeddings x sqrt(640), 4 query heads on 1 kv head of 256, vocab 262,144).

The checkpoint dir is artifacts/models/gemma3-270m, made once from the packaged GGUF when missing (as
`python -m export model --package gemma3-270m` does, ~2 min)."""

from __future__ import annotations

import pytest
import torch

from export.checkpoint import PackageSource, load_checkpoint, make_model_dir
from export.paths import ARTIFACTS_DIR
from export.step_model import StepModel, lowest_mask_value
from tools.bench.prompts import load_prompts

GEMMA_DIR = ARTIFACTS_DIR / "models" / "gemma3-270m"


@pytest.fixture(scope="module")
def gemma():
    if not (GEMMA_DIR / "config.json").is_file():
        make_model_dir(PackageSource("gemma3-270m"), GEMMA_DIR)
    hf, tokenizer = load_checkpoint(GEMMA_DIR)
    return hf, tokenizer, StepModel(hf)


def prefill(step: StepModel, ids: torch.Tensor, sliding: bool = True):
    n = len(ids)
    mask, positions = torch.full((n, n), lowest_mask_value(torch.float32)).triu(1), torch.arange(n)
    empty = [torch.zeros(0, step.num_kv_heads, step.head_dim)] * step.num_layers
    masks = step.sliding_masks(mask, positions, 0) if sliding else (mask, torch.zeros(n, 0))
    return step(ids, positions, mask, empty, list(empty), None, *masks)


def greedy(step: StepModel, ids: torch.Tensor, new_tokens: int) -> list[int]:
    """Plain greedy decoding with the step: the prompt in one step, then one token per step on the growing
    cache, the sliding masks built for each step's positions."""
    logits, keys, values = prefill(step, ids)
    keys, values, out = list(keys), list(values), [int(logits[-1].argmax())]
    while len(out) < new_tokens:
        s = keys[0].shape[0]
        token, position, mask = torch.tensor([out[-1]]), torch.tensor([s]), torch.zeros(1, 1)
        logits, k, v = step(token, position, mask, keys, values, None, *step.sliding_masks(mask, position, s))
        keys = [torch.cat([a, b]) for a, b in zip(keys, k)]
        values = [torch.cat([a, b]) for a, b in zip(values, v)]
        out.append(int(logits[-1].argmax()))
    return out


def generate(hf, ids: torch.Tensor, new_tokens: int) -> list[int]:
    out = hf.generate(ids[None], attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                      max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return out[0, len(ids):].tolist()


def test_short_prompt_logits_and_greedy_match_transformers(gemma):
    """Default tier (~10 s): a short prompt's logits, and 4 greedy tokens equal to generate()."""
    hf, tokenizer, step = gemma
    ids = torch.tensor(tokenizer("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n").input_ids)
    with torch.inference_mode():
        ref = hf(ids[None]).logits[0]
        logits = prefill(step, ids)[0]
        assert (logits - ref).abs().max() < 1e-3 and torch.equal(logits.argmax(-1), ref.argmax(-1))
        assert greedy(step, ids, 4) == generate(hf, ids, 4)


@pytest.mark.slow
def test_long_prompt_past_the_window_matches_transformers(gemma):
    """~75 s: a 720-token prompt (window 512): logits within 1e-3 (measured 8.4e-5 on logits up to 43), the
    window changes rows past it by tens of logits, and 32 greedy tokens equal generate()."""
    hf, tokenizer, step = gemma
    ids = torch.tensor(tokenizer("\n\n".join(p.prompt for p in load_prompts("humaneval", limit=6))).input_ids)
    window = step.family.sliding_window
    assert len(ids) > window + 100
    with torch.inference_mode():
        ref = hf(ids[None]).logits[0]
        logits = prefill(step, ids)[0]
        assert (logits - ref).abs().max() < 1e-3 and torch.equal(logits.argmax(-1), ref.argmax(-1))
        off = prefill(step, ids, sliding=False)[0]
        assert (off[window:] - ref[window:]).abs().max() > 1.0
        assert greedy(step, ids, 32) == generate(hf, ids, 32)


@pytest.mark.slow
def test_onnx_export_validates_across_the_window(gemma, tmp_path):
    """The real Gemma's graph: the sliding mask inputs, validated at untraced shapes including a tree on
    515 cached entries (the window boundary inside the cache)."""
    from export.onnx_export import ExportConfig, export_onnx

    m = export_onnx(ExportConfig(GEMMA_DIR, tmp_path / "engine", max_context=1024, max_tree=16), log=lambda _: None)
    assert m.model.family == "gemma3" and m.model.sliding_window == 512
    assert m.model.sliding_layers == tuple(i for i in range(18) if i % 6 != 5)
    assert "sliding_past_mask" in m.input_names
    assert (16, 515) in {(v["tree_size"], v["cache_length"]) for v in m.validation}
    assert all(v["max_abs_diff"] <= v["tolerance"] for v in m.validation)
