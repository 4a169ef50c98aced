import json

import numpy as np
import pytest

from trees import Tree, TreeError, buffers_from_parents, causal_buffers, load_tree


def test_hand_worked_tree_buffers():
    # root(0) -> [0](1) -> [0,0](3) -> [0,0,0](5)
    #         -> [1](2) -> [1,0](4)
    tree = Tree(paths=((1,), (0, 0), (0,), (1, 0), (0, 0, 0)), topk=2)
    b = tree.buffers
    assert tree.paths == ((0,), (1,), (0, 0), (1, 0), (0, 0, 0))
    assert b.parents.tolist() == [-1, 0, 0, 1, 2, 3]
    assert b.depth.tolist() == [0, 1, 1, 2, 2, 3]
    assert tree.node_rank.tolist() == [-1, 0, 1, 0, 0, 0]
    expected = np.array([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0],
        [1, 1, 0, 1, 0, 0],
        [1, 0, 1, 0, 1, 0],
        [1, 1, 0, 1, 0, 1],
    ], dtype=bool)
    np.testing.assert_array_equal(b.ancestor_mask, expected)
    # one row per leaf (nodes 4 and 5), root..leaf padded with -1
    assert b.retrieve.tolist() == [[0, 2, 4, -1], [0, 1, 3, 5]]
    assert tree.size == 6 and tree.depth == 3


def test_buffers_are_frozen():
    b = Tree(paths=((0,),), topk=1).buffers
    with pytest.raises(ValueError):
        b.ancestor_mask[0, 0] = False


def test_causal_buffers_is_a_chain():
    b = causal_buffers(4)
    np.testing.assert_array_equal(b.ancestor_mask, np.tril(np.ones((4, 4), dtype=bool)))
    assert b.depth.tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("paths, topk, message", [
    (((0, 0),), 2, "no parent path"),
    (((0,), (0,)), 2, "duplicate"),
    (((0,), (2,)), 2, "rank outside"),
    (((),), 2, "empty path"),
])
def test_invalid_trees_are_refused(paths, topk, message):
    with pytest.raises(TreeError, match=message):
        Tree(paths=paths, topk=topk)


def test_bad_parent_lists_are_refused():
    with pytest.raises(TreeError, match="root"):
        buffers_from_parents([0, 0])
    with pytest.raises(TreeError, match="parent listed before"):
        buffers_from_parents([-1, 2, 0])


def test_tree_json_round_trip(tmp_path):
    tree = Tree(paths=((0,), (1,), (0, 0)), topk=4)
    path = tmp_path / "tree.json"
    path.write_text(json.dumps(tree.to_json()))
    loaded = load_tree(path)
    assert loaded == tree
    np.testing.assert_array_equal(loaded.buffers.ancestor_mask, tree.buffers.ancestor_mask)


def test_load_tree_errors(tmp_path):
    with pytest.raises(TreeError, match="does not exist"):
        load_tree(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(TreeError, match="not valid JSON"):
        load_tree(bad)
    bad.write_text(json.dumps({"paths": [[0]]}))
    with pytest.raises(TreeError, match="topk"):
        load_tree(bad)
