"""Shared fixtures: the real SmolLM2 checkpoint (for lossless tests) and a tiny random Llama (for speed)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from export.paths import DEFAULT_MODEL_DIR
from tools.bench.prompts import load_prompts

LOSSLESS_NEW_TOKENS = 48
LOSSLESS_PER_SET = 3   # prompts of each set in the default lossless tests (the default tier's time budget)
# The session fixture that provides each trained method's committed checkpoint (skips when absent).
TRAINED_FIXTURES = {"ppd": "trained_ppd_checkpoint", "hybrid": "trained_ppd_checkpoint", "ht": "trained_ht_checkpoint"}


@pytest.fixture(autouse=True)
def generated_trees_dir(tmp_path_factory, monkeypatch) -> Path:
    """Where `trees build` writes and the runtime looks first (export/tree_store.py), in the test
    test's own temp dir: tests never read or write this machine's artifacts/trees/, nor each other's."""
    root = tmp_path_factory.mktemp("generated-trees")
    monkeypatch.setattr("export.tree_store.GENERATED_ROOT", root)
    return root


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        pytest.fail(f"real model missing at {DEFAULT_MODEL_DIR}: run `make model` (tests never skip lossless checks)")
    return DEFAULT_MODEL_DIR


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, real_model_dir) -> Path:
    """A 2-layer random-weight Llama with the real tokenizer: the whole flow in milliseconds."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(real_model_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, real_model_dir) -> Path:
    """A 2-layer random Llama with the real tokenizer as a checkpoint dir (tests/export/tiny_llama.py), one per
    test module: the exporter, quantizer and backends build their engine dirs from it."""
    from tests.export.tiny_llama import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny"), real_model_dir, seed=4)


@pytest.fixture(scope="session")
def lossless_prompts():
    """Real prompts for the default lossless tests: the first LOSSLESS_PER_SET MT-Bench first turns, then
    as many HumanEval prompts (the slow tier sweeps all 120)."""
    return load_prompts("mtbench", limit=LOSSLESS_PER_SET) + load_prompts("humaneval", limit=LOSSLESS_PER_SET)


@pytest.fixture(scope="session")
def hf_reference(real_model_dir, lossless_prompts):
    """transformers generate(do_sample=False) on the real model: {prompt id: (prompt ids, new token ids)}."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(real_model_dir)
    model = LlamaForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32).eval()
    reference = {}
    with torch.inference_mode():
        for item in lossless_prompts:
            text = tokenizer.apply_chat_template([{"role": "user", "content": item.prompt}], tokenize=False,
                                                 add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False).input_ids
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=LOSSLESS_NEW_TOKENS, do_sample=False,
                                 pad_token_id=tokenizer.eos_token_id)
            reference[item.id] = (ids, out[0, len(ids):].tolist())
    return reference


def first_difference(got: list[int], want: list[int]) -> int | None:
    """Index of the first new token where two outputs differ (the shorter length when one is a prefix of
    the other); None when they are identical."""
    if got == want:
        return None
    return next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))


def copy_tokenizer(src: Path, dst: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (src / name).exists():
            shutil.copy(src / name, dst / name)


@pytest.fixture(scope="session")
def trained_ppd_checkpoint() -> Path:
    """The committed SmolLM2 PPD prompt tokens; tests of the trained method skip until they exist."""
    from export.ppd import DEFAULT_PPD_CHECKPOINT

    if not DEFAULT_PPD_CHECKPOINT.is_file():
        pytest.skip(f"trained PPD prompt tokens not committed yet at {DEFAULT_PPD_CHECKPOINT} (`make train`)")
    return DEFAULT_PPD_CHECKPOINT


@pytest.fixture(scope="session")
def trained_ht_checkpoint() -> Path:
    """The committed SmolLM2 HT transfer maps; tests of the trained method skip until they exist."""
    from export.ht import DEFAULT_HT_CHECKPOINT

    if not DEFAULT_HT_CHECKPOINT.is_file():
        pytest.skip(f"trained HT transfer maps not committed yet at {DEFAULT_HT_CHECKPOINT} (`python -m train ht`)")
    return DEFAULT_HT_CHECKPOINT
