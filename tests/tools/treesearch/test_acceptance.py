"""Acceptance statistics collection: ranks against the decode's own tokens, end to end on a backend."""

import json

import numpy as np
import pytest
import torch

from export.checkpoint import load_checkpoint, model_fingerprint
from export.ppd import PPDConfig, save_prompt_tokens
from runtime import Generator
from tools.treesearch.acceptance import StatsConfig, collect_acceptance, collection_trees, decode_records, step_ranks
from runtime.generator import GenerationStats
from trees import prompt_tokens_sha256


def test_step_ranks():
    predictions = np.array([[5, 6, 7], [8, 9, 10], [11, 12, 13]])
    assert step_ranks(predictions, [6, 99, 11]) == (3, 1, 3, 0)   # 99 not in the top-3: rank K = 3
    assert step_ranks(predictions, [5]) == (3, 0)                   # text ended after one token
    assert step_ranks(predictions[:0], [5, 6]) == (0,)


def test_collection_trees_carry_all_prompt_tokens_everywhere():
    trees = collection_trees(3, topk=10)
    assert trees.topk == 10
    for m, step in enumerate(trees.trees):
        assert step.tree.paths == tuple((0,) * d for d in range(1, m + 1))
        assert set(step.prompt_counts) == {3}


def leading_hits(record):
    ranks = record[1:]
    return next((i for i, r in enumerate(ranks) if r != 0), len(ranks))


def test_records_agree_with_what_the_decode_accepts(real_model_dir, tmp_path):
    """With the collection tree (rank-0 chain), the next step accepts exactly as many tokens as the
    record's leading rank-0 hits: the ranks are compared with the right positions."""
    hf, tokenizer = load_checkpoint(real_model_dir)
    # Prompt tokens copied from ' the', ',' and ' and': crude, but right often enough on a list.
    ids = [tokenizer.encode(w)[0] for w in (" the", ",", " and")]
    rows = hf.get_input_embeddings().weight[ids].detach().clone()
    del hf
    checkpoint = save_prompt_tokens(tmp_path / "ppd.safetensors", rows, PPDConfig(3, 1),
                                    model_fingerprint(real_model_dir), dtype=torch.float32)
    tree = tmp_path / "tree.json"
    tree.write_text(json.dumps(collection_trees(3, topk=10).to_json()))
    gen = Generator.from_pretrained(real_model_dir, method="ppd", max_context=512, checkpoint=str(checkpoint),
                                    tree=str(tree))
    prompt = gen.encode("Count from 1 to 20, separated by commas.")
    records = decode_records(gen, prompt, max_new_tokens=24)
    lengths = []
    for step in gen.decode_steps(prompt, GenerationStats()):
        lengths.append(len(step.tokens))
        if len(lengths) == len(records):
            break
    assert any(n > 1 for n in lengths), "no candidate was ever accepted: the test would prove nothing"
    checked = 0
    for record, next_length in zip(records, lengths[1:]):
        if len(record) == 4:  # all three depths known
            assert next_length - 1 == leading_hits(record)
            checked += 1
    assert checked >= 5


def test_collect_acceptance_end_to_end(tiny_model_dir, tmp_path):
    rows = torch.randn(2, 64) * 0.02
    checkpoint = save_prompt_tokens(tmp_path / "ppd.safetensors", rows, PPDConfig(2, 1),
                                    model_fingerprint(tiny_model_dir), dtype=torch.float32)
    config = StatsConfig(model_dir=str(tiny_model_dir), checkpoint=str(checkpoint), num_prompts=2, max_new_tokens=12,
                         topk=5, max_prompt_tokens=40)
    prompts = ["Hello there", "word " * 100, [{"role": "user", "content": "Write a haiku"}], "never reached"]
    stats = collect_acceptance(config, prompts, calibration="test prompts", show_progress=False)
    assert stats.num_prompts == 2 and stats.topk == 5 and stats.num_prompt_tokens == 2
    assert stats.model_fingerprint == model_fingerprint(tiny_model_dir)
    assert stats.checkpoint_sha256 == prompt_tokens_sha256(rows)
    assert all(step[0] == 2 for step in stats.steps)   # the collection tree always yields N rows
    assert len(stats.steps) >= 2 * 12 / 3               # at most 3 tokens per step
    with pytest.raises(ValueError, match="only 1 of the 3"):
        collect_acceptance(StatsConfig(**{**config.__dict__, "num_prompts": 3}), prompts[:2], "test prompts",
                           show_progress=False)


def test_default_tree_is_the_one_searched_for_this_device(tmp_path):
    """(export.devices, the lookup runtime/methods.py uses for the default ppd and ht trees.)"""
    from export.devices import default_tree

    checkpoint = tmp_path / "ppd-prompt-tokens.safetensors"
    fallback = tmp_path / "hand-picked.json"
    assert default_tree("ppd", "cpu", "onnxruntime", checkpoint, fallback) == fallback
    (tmp_path / "ppd-tree-cpu-torch.json").write_text("{}")
    assert default_tree("ppd", "cpu", "onnxruntime", checkpoint, fallback).name == "ppd-tree-cpu-torch.json"
    (tmp_path / "ppd-tree-cpu-onnxruntime.json").write_text("{}")
    assert default_tree("ppd", "cpu", "onnxruntime", checkpoint, fallback).name == "ppd-tree-cpu-onnxruntime.json"
    assert default_tree("ht", "cpu", "onnxruntime", checkpoint, fallback) == fallback  # ppd's trees are not ht's


def test_collect_acceptance_for_ht(tiny_model_dir, tmp_path):
    """HT statistics use the same collection trees with N = k pseudo slots, keyed by the maps' hash."""
    from export.ht import TransferMaps, save_transfer_maps

    g = torch.Generator().manual_seed(0)
    maps = TransferMaps(torch.eye(64) + 0.1 * torch.randn(2, 64, 64, generator=g), torch.zeros(2, 64), layer=0)
    checkpoint = save_transfer_maps(tmp_path / "ht.safetensors", maps, model_fingerprint(tiny_model_dir),
                                    dtype=torch.float32)
    config = StatsConfig(model_dir=str(tiny_model_dir), method="ht", checkpoint=str(checkpoint), num_prompts=1,
                         max_new_tokens=12, topk=5, max_prompt_tokens=40)
    stats = collect_acceptance(config, ["Hello there"], calibration="test prompts", show_progress=False)
    assert stats.num_prompt_tokens == 2 and stats.ensemble == 1 and stats.checkpoint_sha256 == maps.sha256
    assert all(step[0] == 2 for step in stats.steps) and len(stats.steps) >= 12 / 3
    with pytest.raises(ValueError, match="ppd or ht, not 'ngram'"):
        StatsConfig(method="ngram")


def test_decode_records_need_prediction_rows(tiny_model_dir):
    gen = Generator.from_pretrained(tiny_model_dir, method="ngram", max_context=256)
    with pytest.raises(ValueError, match="carry no prediction rows"):
        decode_records(gen, gen.encode("Hello there"), max_new_tokens=6)
