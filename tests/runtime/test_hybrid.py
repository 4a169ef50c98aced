"""Hybrid: PPD candidates and the n-gram continuation merged into one step tree, lossless on both backends."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from export.checkpoint import load_checkpoint, model_fingerprint
from export.methods import DEFAULT_HYBRID_NGRAM, HybridOptions
from export.ppd import PPDConfig, save_prompt_tokens
from runtime import Generator
from runtime.backends.base import DeviceLayout, StepOutput
from runtime.proposers.hybrid import HybridProposer, NgramSource
from runtime.readout import read_step
from runtime.verify import GreedyVerifier
from tests.runtime.test_ppd import TREES
from trees import PPDTreeSet

VOCAB = 100


def proposer_with_guesses(source: NgramSource) -> HybridProposer:
    """A hybrid proposer (N = 2, k = 1) whose last step predicted guesses [[7, 8], [9, 10]] (m = 2)."""
    proposer = HybridProposer(PPDConfig(2, 1), PPDTreeSet.from_json(TREES), VOCAB, source)
    proposer.ppd.guesses = np.array([[7, 8], [9, 10]])
    return proposer


def test_ppd_and_ngram_candidates_share_one_tree():
    proposer = proposer_with_guesses(NgramSource(depth=3, prompt_tokens=1))
    # history ends in 5; an earlier 5 was followed by 7, 11, 12: the n-gram path shares its first node
    # with PPD's rank-0 guess 7, then adds 11 and 12 below it.
    draft = proposer.propose([5, 7, 11, 12, 3, 5])
    c = draft.num_candidates
    assert draft.tokens[:c].tolist() == [5, 7, 8, 9, 11, 12]     # PPD: root, [0]=7, [1]=8, [0,0]=9; n-gram: 11, 12
    assert draft.layout.buffers.parents[:c].tolist() == [-1, 0, 0, 1, 1, 4]
    assert draft.sources == ("root", "ppd", "ppd", "ppd", "ngram", "ngram")
    counts = [stop - start for start, stop in draft.layout.groups]
    assert counts == [2, 2, 1, 0, 1, 1]                          # the tree file's counts; 1 per n-gram-only node
    assert draft.tokens[c:].tolist() == [100, 101, 100, 101, 100, 100, 100]   # prompt ids: row r -> vocab + r
    assert draft.size <= proposer.max_draft_tokens


def test_a_repeated_shape_reuses_its_layout_and_no_match_is_the_ppd_tree():
    proposer = proposer_with_guesses(NgramSource(depth=3, prompt_tokens=1))
    history = [5, 7, 11, 12, 3, 5]
    assert proposer.propose(history).layout is proposer.propose(history).layout
    plain = proposer.propose([1, 2, 3, 4])                     # nothing repeats: PPD's tree alone
    assert plain.num_candidates == 4 and set(plain.sources) == {"root", "ppd"}
    off = proposer_with_guesses(NgramSource(depth=0, prompt_tokens=0))   # depth 0: plain PPD
    assert off.propose(history).num_candidates == 4


def test_the_accepted_node_hands_its_predictions_to_the_next_step():
    proposer = proposer_with_guesses(NgramSource(depth=3, prompt_tokens=1))
    draft = proposer.propose([5, 7, 11, 12, 3, 5])
    logits = torch.zeros(draft.size, VOCAB)
    logits[0, 7] = logits[1, 11] = logits[4, 12] = logits[5, 42] = 1.0     # accept 7, 11, 12; bonus 42
    (row,) = draft.layout.predict_rows[slice(*draft.layout.groups[5])]
    logits[row[0], 33] = 1.0                                                # node 5's prompt token predicts 33
    rows = torch.from_numpy(draft.layout.predict_rows.copy())
    output = StepOutput(logits, torch.arange(draft.size), DeviceLayout(torch.zeros(1), torch.zeros(1), rows))
    readout = read_step(output, draft, GreedyVerifier())
    from runtime.verify import walk

    path, bonus = walk(draft, readout.chosen)
    assert path == [0, 1, 4, 5] and bonus == 42
    proposer.observe(draft, readout, path)
    assert proposer.ppd.guesses.shape == (1, 2) and proposer.ppd.guesses[0, 0] == 33


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="ngram_depth"):
        HybridOptions(ngram_depth=-1)
    with pytest.raises(ValueError, match="exceeds the checkpoint"):
        HybridProposer(PPDConfig(2, 1), PPDTreeSet.from_json(TREES), VOCAB, NgramSource(3, prompt_tokens=3))


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("hybrid")
    hidden = load_checkpoint(tiny_model_dir)[0].config.hidden_size
    torch.manual_seed(1)
    checkpoint = save_prompt_tokens(out / "ppd.safetensors", torch.randn(4, hidden) * 0.02, PPDConfig(2, 2),
                                    model_fingerprint(tiny_model_dir), dtype=torch.float32)
    tree = out / "tree.json"
    tree.write_text(json.dumps(TREES))
    return {"checkpoint": str(checkpoint), "tree": str(tree)}


def test_tiny_hybrid_is_lossless_on_torch_and_from_a_ppd_engine(tiny_model_dir, tiny_checkpoint, tmp_path,
                                                                  monkeypatch):
    import export.engine

    monkeypatch.setattr(export.engine, "ARTIFACTS_DIR", tmp_path / "artifacts")
    vanilla = Generator.from_pretrained(tiny_model_dir, max_context=512)
    hybrid = Generator.from_pretrained(tiny_model_dir, method="hybrid", max_context=512, **tiny_checkpoint)
    ppd_ort = Generator.from_pretrained(tiny_model_dir, method="ppd", backend="onnxruntime", max_context=512,
                                        **tiny_checkpoint)
    from_engine = Generator.from_engine(ppd_ort.backend.manifest.dir, method="hybrid", **tiny_checkpoint)
    accepted = []
    for prompt in ["Hello", "1 2 3 4 1 2 3 4 1 2 3 4", "Write a poem about the sea"]:
        want = vanilla.generate(prompt, max_new_tokens=40).token_ids
        for gen in (hybrid, from_engine):
            result = gen.generate(prompt, max_new_tokens=40)
            assert result.token_ids == want
            accepted.append(result.stats.mean_accepted)
    assert max(accepted) > 1.0
    # `make engine` installs hybrid's own tree beside ppd's; from_engine(method="hybrid") prefers it.
    from export.engine import install_tree

    tree = tmp_path / "hybrid-tree.json"
    tree.write_text(json.dumps({**TREES, "hybrid": {"ngram_depth": 2, "ngram_prompt_tokens": 0}}))
    installed = install_tree(ppd_ort.backend.manifest, tree, "hybrid")
    assert installed.name == "hybrid-tree.json"
    engine_hybrid = Generator.from_engine(ppd_ort.backend.manifest.dir, method="hybrid",
                                          checkpoint=tiny_checkpoint["checkpoint"])
    assert engine_hybrid.proposer.source.depth == 2
    with pytest.raises(ValueError, match="takes the trees of"):
        install_tree(ppd_ort.backend.manifest, tree, "ht")


def test_the_searched_ngram_budget_comes_with_the_tree(tiny_model_dir, tiny_checkpoint, tmp_path):
    tree = tmp_path / "hybrid-tree.json"
    tree.write_text(json.dumps({**TREES, "hybrid": {"ngram_depth": 2, "ngram_prompt_tokens": 0}}))
    options = {**tiny_checkpoint, "tree": str(tree)}
    searched = Generator.from_pretrained(tiny_model_dir, method="hybrid", max_context=512, **options)
    assert searched.proposer.source.depth == 2 and searched.proposer.source.prompt_tokens == 0
    told = Generator.from_pretrained(tiny_model_dir, method="hybrid", max_context=512, ngram_depth=5, **options)
    assert told.proposer.source.depth == 5 and told.proposer.source.prompt_tokens == 0
    plain = Generator.from_pretrained(tiny_model_dir, method="hybrid", max_context=512, **tiny_checkpoint)
    assert (plain.proposer.source.depth, plain.proposer.source.prompt_tokens) == DEFAULT_HYBRID_NGRAM
