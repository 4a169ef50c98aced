import json

import pytest

from trees import PPDTreeSet, TreeError, load_ppd_trees

SMALL = {
    "num_prompt_tokens": 2, "topk": 2,
    "trees": {
        "2": [{"path": [], "prompt_tokens": 2}, {"path": [0], "prompt_tokens": 2}, {"path": [0, 0], "prompt_tokens": 1},
              {"path": [1], "prompt_tokens": 0}],
        "1": [{"path": [], "prompt_tokens": 2}, {"path": [0], "prompt_tokens": 1}],
        "0": [{"path": [], "prompt_tokens": 2}],
    },
}


def test_round_trip_and_sizes(tmp_path):
    trees = PPDTreeSet.from_json(SMALL)
    assert trees.trees[2].tree.paths == ((0,), (1,), (0, 0))
    assert trees.trees[2].prompt_counts == (2, 2, 0, 1)       # Tree node order: root, [0], [1], [0,0]
    assert trees.trees[2].num_tokens == 4 + 5
    assert trees.max_tokens(ensemble=2) == 4 + 10
    path = tmp_path / "t.json"
    path.write_text(json.dumps(trees.to_json()))
    assert load_ppd_trees(path) == trees


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["trees"].pop("1"), "trees"),
    (lambda d: d["trees"]["1"].append({"path": [0, 0], "prompt_tokens": 0}), "depth 2 > 1"),
    (lambda d: d["trees"]["0"][0].update(prompt_tokens=3), "0..2"),
    (lambda d: d["trees"]["0"][0].update(prompt_tokens=0), "never restarts"),
    (lambda d: d["trees"]["2"].pop(0), "no root"),
])
def test_invalid_tree_sets_are_refused(mutate, message):
    data = json.loads(json.dumps(SMALL))
    mutate(data)
    with pytest.raises(TreeError, match=message):
        PPDTreeSet.from_json(data)


def test_committed_cpu_tree_is_valid():
    from export.methods import METHODS

    trees = load_ppd_trees(METHODS["ppd"].hand_picked_tree)
    assert trees.num_prompt_tokens == 3
