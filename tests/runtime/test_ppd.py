"""PPD inference: dynamic sparse tree layout, lossless decoding, checkpoint/model mismatch."""

import json

import pytest
import torch

from export.checkpoint import load_checkpoint, model_fingerprint
from export.ppd import PPDConfig, PromptTokenError, save_prompt_tokens
from runtime import Generator
from runtime.proposers.ppd import step_template
from trees import PPDTreeSet

TREES = {
    "num_prompt_tokens": 2, "topk": 2,
    "trees": {
        "2": [{"path": [], "prompt_tokens": 2}, {"path": [0], "prompt_tokens": 2}, {"path": [1], "prompt_tokens": 1},
              {"path": [0, 0], "prompt_tokens": 0}],
        "1": [{"path": [], "prompt_tokens": 2}, {"path": [0], "prompt_tokens": 2}],
        "0": [{"path": [], "prompt_tokens": 2}],
    },
}


def test_layout_puts_prompt_chains_after_candidates():
    config = PPDConfig(num_prompt_tokens=2, ensemble=2)
    template = step_template(PPDTreeSet.from_json(TREES).trees[2], config, vocab_size=100, topk=2)
    layout, tokens = template.layout, template.tokens
    assert layout.num_candidates == 4                  # root, [0], [1], [0,0]
    # root carries 2 prompt tokens x 2 virtual tokens: nodes 4..7 = ids (0,0) (0,1) (1,0) (1,1)
    assert layout.groups[0] == (0, 2) and layout.predict_rows[0:2].tolist() == [[4, 5], [6, 7]]
    assert tokens[4:8].tolist() == [100, 101, 102, 103]
    assert layout.buffers.parents[4:8].tolist() == [0, 0, 4, 5]
    start, stop = layout.groups[2]                     # [1] carries 1 prompt token (2 virtual)
    assert layout.predict_rows[start:stop].tolist() == [[12, 13]]
    assert layout.groups[3] == (0, 0) and layout.predict_topk == 2
    # a candidate never sees a prompt node; prompt nodes see their own stream only
    assert not layout.buffers.ancestor_mask[:4, 4:].any()
    assert layout.buffers.ancestor_mask[6].tolist()[:8] == [True, False, False, False, True, False, True, False]
    assert template.cand_depth.tolist() == [1, 1, 2] and template.cand_rank.tolist() == [0, 1, 0]


def test_the_same_tree_shape_is_one_layout_key():
    config = PPDConfig(num_prompt_tokens=2, ensemble=2)
    trees = PPDTreeSet.from_json(TREES)
    a, b = (step_template(trees.trees[2], config, 100, 2).layout for _ in range(2))
    assert a.key == b.key and a.key != step_template(trees.trees[1], config, 100, 2).layout.key


@pytest.fixture(scope="module")
def tiny_ppd(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-ppd")
    hf, _ = load_checkpoint(tiny_model_dir)
    torch.manual_seed(1)
    config = PPDConfig(num_prompt_tokens=2, ensemble=2)
    checkpoint = save_prompt_tokens(out / "ppd.safetensors", torch.randn(4, hf.config.hidden_size) * 0.02, config,
                                    model_fingerprint(tiny_model_dir), dtype=torch.float32)
    tree = out / "tree.json"
    tree.write_text(json.dumps(TREES))
    return checkpoint, tree


def test_tiny_ppd_is_lossless_against_vanilla(tiny_model_dir, tiny_ppd):
    checkpoint, tree = tiny_ppd
    vanilla = Generator.from_pretrained(tiny_model_dir, max_context=512)
    ppd = Generator.from_pretrained(tiny_model_dir, method="ppd", max_context=512, checkpoint=str(checkpoint),
                                    tree=str(tree))
    for prompt in ["Hello", "Write a poem about the sea", "1 2 3 4 5 6"]:
        assert ppd.generate(prompt, max_new_tokens=40).token_ids == vanilla.generate(prompt, max_new_tokens=40).token_ids


def test_checkpoint_for_another_model_is_refused(real_model_dir, tiny_ppd):
    checkpoint, tree = tiny_ppd
    with pytest.raises(PromptTokenError, match="trained for model"):
        Generator.from_pretrained(real_model_dir, method="ppd", checkpoint=str(checkpoint), tree=str(tree))


def test_requested_n_other_than_checkpoint_is_refused(tiny_model_dir, tiny_ppd):
    checkpoint, tree = tiny_ppd
    with pytest.raises(PromptTokenError, match="N=3"):
        Generator.from_pretrained(tiny_model_dir, method="ppd", checkpoint=str(checkpoint), tree=str(tree),
                                  num_prompt_tokens=3)


def test_searched_tree_for_other_prompt_tokens_is_refused(tiny_model_dir, tmp_path):
    """A tree searched for one checkpoint records its hash; loading it with another one is an error."""
    from trees import TreeError

    hidden = load_checkpoint(tiny_model_dir)[0].config.hidden_size
    checkpoint = save_prompt_tokens(tmp_path / "ppd.safetensors", torch.randn(4, hidden), PPDConfig(2, 2),
                                    model_fingerprint(tiny_model_dir), dtype=torch.float32)
    tree = tmp_path / "tree.json"
    tree.write_text(json.dumps({**TREES, "model_fingerprint": model_fingerprint(tiny_model_dir),
                                "checkpoint_sha256": "0" * 64}))
    with pytest.raises(TreeError, match="retrained"):
        Generator.from_pretrained(tiny_model_dir, method="ppd", checkpoint=str(checkpoint), tree=str(tree))
