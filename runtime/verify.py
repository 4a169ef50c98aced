"""Greedy verification: accept the longest path of candidates that the model itself would emit."""

from __future__ import annotations

import torch

from runtime.draft import Draft


def verify_greedy(draft: Draft, logits: torch.Tensor) -> tuple[list[int], int]:
    """Walk the candidate tree from the root, following the child whose token equals the model's
    argmax at the current node.

    logits: [T, V] for all draft nodes. Returns (accepted node indices root..last, bonus token):
    the bonus token is the model's argmax after the last accepted node, so every step yields
    len(path) new tokens (len(path) - 1 candidates + the bonus).
    """
    predictions = logits[: draft.num_candidates].argmax(dim=-1).tolist()
    node, path = 0, [0]
    while (child := draft.children[node].get(predictions[node])) is not None:
        path.append(child)
        node = child
    return path, predictions[node]
