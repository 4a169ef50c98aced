"""The additive attention masks a step takes, built on the host (numpy or torch, nothing of the runtime).

Every mask of the step is additive: 0 where a query row may see a key, the dtype's lowest finite value
where it may not (never -inf: an fp16 row with every key hidden would turn into NaN). They are graph
inputs, built by whoever drives the step, so the graph holds no position arithmetic and a runtime can
cache what does not change.

    tree_mask          [T, T]  which tree nodes each node sees (its ancestors and itself); global layers
    past_mask          [T, S]  (training only) which committed entries each node sees; default: all of them
    sliding_tree_mask  [T, T]  the tree mask, restricted to the window        } only in graphs of families
    sliding_past_mask  [T, S]  the committed entries inside the window         } with sliding-window layers

The window rule (transformers' `sliding_window_overlay`: kv_idx > q_idx - sliding_window): on a
sliding layer, a node at absolute position p sees an entry at position q only if q > p - window,
committed entries and tree nodes alike, on top of what it sees on the global layers. Positions are
taken as arguments, not assumed to be 0..S-1: a cache may later hold entries at arbitrary positions.
While every query position p satisfies p - window < min(committed and tree positions), the sliding
masks equal the global ones (`window_hides_nothing`).
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

Array = TypeVar("Array", np.ndarray, torch.Tensor)

SLIDING_TREE_MASK = "sliding_tree_mask"
SLIDING_PAST_MASK = "sliding_past_mask"
SLIDING_MASK_INPUTS = (SLIDING_TREE_MASK, SLIDING_PAST_MASK)


def lowest_mask_value(dtype: torch.dtype | np.dtype | type) -> float:
    """Additive mask value for hidden entries: the dtype's lowest finite value, so fp16 never gives NaN."""
    if isinstance(dtype, torch.dtype):
        return torch.finfo(dtype).min
    return float(np.finfo(dtype).min)


def visible(mask: Array) -> Array:
    """Boolean visibility (True = seen) of a boolean or an additive mask (0 = seen)."""
    if mask.dtype in (torch.bool, np.bool_):
        return mask
    return mask == 0


def additive(seen: Array, dtype: torch.dtype | np.dtype | type) -> Array:
    """Boolean visibility -> additive mask in `dtype` (0 seen, lowest finite value hidden)."""
    low = lowest_mask_value(dtype)
    if isinstance(seen, torch.Tensor):
        return torch.zeros(seen.shape, dtype=dtype, device=seen.device).masked_fill_(~seen, low)
    if isinstance(dtype, torch.dtype):   # a numpy mask asked for in a torch dtype: its numpy twin
        dtype = torch.empty((), dtype=dtype).numpy().dtype
    return np.where(seen, 0.0, low).astype(dtype)


def in_window(query_positions: Array, key_positions: Array, window: int) -> Array:
    """[Q, K] True where key position > query position - window (transformers' sliding-window rule)."""
    return key_positions[None, :] > query_positions[:, None] - window


def sliding_window_masks(tree_mask: Array, positions: Array, past_positions: Array, window: int,
                         past_mask: Array | None = None, dtype: torch.dtype | np.dtype | type | None = None
                         ) -> tuple[Array, Array]:
    """The two masks of a step's sliding-window layers.

    tree_mask       [T, T]  the tree's mask on the global layers: boolean ancestor mask (True = seen) or
                            additive (0 = seen)
    positions       [T]     absolute position of each tree node (committed length + depth today)
    past_positions  [S]     absolute position of each committed cache entry (today 0..S-1)
    window          the model's sliding window (FamilyRecord.sliding_window, manifest model.sliding_window)
    past_mask       [T, S]  optional: what each node sees of the cache on the global layers (training's
                            prompt groups); default all of it
    dtype           of the result; default the dtype of an additive `tree_mask` (else float32)

    Returns (sliding_tree_mask [T, T], sliding_past_mask [T, S]), additive, as numpy arrays for numpy
    inputs and torch tensors (on tree_mask's device) for torch inputs.
    """
    if window < 1:
        raise ValueError(f"a sliding window holds at least one position, got {window}")
    t = tree_mask.shape[0]
    if tree_mask.shape != (t, t) or positions.shape != (t,) or past_positions.ndim != 1:
        raise ValueError(f"need tree_mask [T, T], positions [T], past_positions [S]; got {tuple(tree_mask.shape)}, "
                         f"{tuple(positions.shape)}, {tuple(past_positions.shape)}")
    is_torch = isinstance(tree_mask, torch.Tensor)
    if dtype is None:
        default = torch.float32 if is_torch else np.float32
        dtype = default if tree_mask.dtype in (torch.bool, np.bool_) else tree_mask.dtype
    if is_torch:
        positions, past_positions = positions.to(tree_mask.device), past_positions.to(tree_mask.device)
    tree_seen = visible(tree_mask) & in_window(positions, positions, window)                     # [T, T]
    past_seen = in_window(positions, past_positions, window)                                     # [T, S]
    if past_mask is not None:
        if tuple(past_mask.shape) != (t, past_positions.shape[0]):
            raise ValueError(f"past_mask must be [T, S] = [{t}, {past_positions.shape[0]}], "
                             f"got {tuple(past_mask.shape)}")
        past_seen = past_seen & visible(past_mask)
    return additive(tree_seen, dtype), additive(past_seen, dtype)


def window_hides_nothing(positions: Array, past_positions: Array, window: int) -> bool:
    """True when no node's window excludes any committed entry or tree node: then the sliding masks
    equal the global ones (the tree mask, and all committed entries), e.g. while the context is short."""
    keys = [int(p.min()) for p in (positions, past_positions) if p.shape[0]]
    return not keys or min(keys) > int(positions.max()) - window
