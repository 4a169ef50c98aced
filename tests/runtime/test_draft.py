"""Draft layouts (runtime/draft.py): padding a small draft up to an engine's minimum step size."""

from __future__ import annotations

import numpy as np

from runtime.draft import Draft, Layout


def test_padding_appends_a_chain_the_real_nodes_cannot_see():
    draft = Draft.chain([7])
    layout = draft.layout.padded(3)
    assert layout.size == 3 and layout.num_candidates == 1 and layout.first_verified == 0
    assert layout.buffers.parents.tolist() == [-1, 0, 1] and layout.buffers.depth.tolist() == [0, 1, 2]
    visible = layout.buffers.ancestor_mask
    assert visible[0].tolist() == [True, False, False]                  # the root sees only itself
    assert visible[2].tolist() == [True, True, True]
    padded = draft.padded(layout)
    assert padded.tokens.tolist() == [7, 7, 7] and padded.num_candidates == 1


def test_padding_keeps_prediction_rows_and_large_layouts():
    layout = Layout(Layout.from_parents([-1, 0]).buffers, 1, np.array([[1]]), ((0, 1),), predict_topk=4)
    padded = layout.padded(3)
    assert padded.predict_rows.tolist() == [[1]] and padded.groups == ((0, 1),) and padded.predict_topk == 4
    assert padded.buffers.parents.tolist() == [-1, 0, 1]
    assert layout.padded(2) is layout and layout.padded(1) is layout
    draft = Draft(np.array([3, 9]), layout)
    assert draft.padded(layout) is draft
