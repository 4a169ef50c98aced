"""export/masks.py: the sliding-window masks a runtime builds on the host."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from export.masks import additive, lowest_mask_value, sliding_window_masks, visible, window_hides_nothing


def chain_tree() -> np.ndarray:
    # nodes 0 <- 1 <- 2 and 0 <- 3: ancestor mask (True = seen)
    return np.array([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 1]], dtype=bool)


def test_window_hides_older_committed_and_tree_entries():
    """Node at position p sees q > p - window: committed entries and tree ancestors alike."""
    tree, positions = chain_tree(), np.array([6, 7, 8, 7])
    sliding_tree, sliding_past = sliding_window_masks(tree, positions, np.arange(6), window=3)
    seen_past = sliding_past == 0
    assert seen_past.tolist() == [[False] * 4 + [True] * 2,          # p=6 sees 4, 5
                                  [False] * 5 + [True],              # p=7 sees 5
                                  [False] * 6,                       # p=8 sees none of the cache
                                  [False] * 5 + [True]]
    assert (sliding_tree == 0).tolist() == [[True, False, False, False], [True, True, False, False],
                                            [True, True, True, False],      # p=8 still sees 6 (> 5)
                                            [True, False, False, True]]
    assert sliding_past.dtype == np.float32 and sliding_past.min() == lowest_mask_value(np.float32)
    # window 2: node at p=8 loses its root at 6
    assert not (sliding_window_masks(tree, positions, np.arange(6), window=2)[0] == 0)[2, 0]


def test_arbitrary_committed_positions_and_past_mask():
    """The cache may hold entries at any positions; training's past_mask narrows what a row sees."""
    past_positions = np.array([0, 3, 9, 10])
    past_mask = additive(np.array([[True, True, True, False]]), np.float32)
    _, sliding_past = sliding_window_masks(np.zeros((1, 1), np.float32), np.array([12]), past_positions, 4,
                                           past_mask=past_mask)
    assert (sliding_past == 0).tolist() == [[False, False, True, False]]   # 9 inside the window, 10 masked


def test_numpy_and_torch_agree_in_any_dtype():
    tree, positions = chain_tree(), np.array([6, 7, 8, 7])
    for dtype, torch_dtype in ((np.float32, torch.float32), (np.float16, torch.float16)):
        additive_tree = additive(tree, dtype)
        ours = sliding_window_masks(additive_tree, positions, np.arange(6), 3)
        theirs = sliding_window_masks(torch.from_numpy(additive_tree), torch.from_numpy(positions), torch.arange(6), 3)
        for a, b in zip(ours, theirs):
            assert a.dtype == dtype and b.dtype == torch_dtype
            np.testing.assert_array_equal(a, b.numpy())
            assert np.isfinite(a).all()
    assert visible(torch.tensor([[0.0, -1.0]])).tolist() == [[True, False]]


def test_window_hides_nothing_while_the_context_is_short():
    assert window_hides_nothing(np.array([5, 6]), np.arange(5), window=8)
    assert not window_hides_nothing(np.array([5, 9]), np.arange(5), window=8)
    assert window_hides_nothing(np.array([0]), np.arange(0), window=1)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match=r"need tree_mask \[T, T\]"):
        sliding_window_masks(np.zeros((2, 2)), np.arange(3), np.arange(4), 3)
    with pytest.raises(ValueError, match=r"past_mask must be \[T, S\]"):
        sliding_window_masks(np.zeros((2, 2)), np.arange(2), np.arange(4), 3, past_mask=np.zeros((2, 3)))
    with pytest.raises(ValueError, match="at least one position"):
        sliding_window_masks(np.zeros((2, 2)), np.arange(2), np.arange(4), 0)
