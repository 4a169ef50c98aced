"""The step sizes of static steps (GPU engines and the torch backend on CUDA): every step is padded to
one of a few T over every cell of the cache (runtime/backends/packing.py), so each size's kernels are
chosen once and its step can be captured as a CUDA graph.

The sizes are the tree's T for 1, 2, 4, ... up to max_batch sequences, and a prefill chunk; prompts
longer than the largest are prefilled in chunks of it.
"""

from __future__ import annotations

PREFILL_STEP = 64      # nodes of the largest static step: prompts are prefilled in chunks of it


def step_sizes(tree: int, max_batch: int = 1, prefill: int = PREFILL_STEP) -> tuple[int, ...]:
    """The static step sizes for trees of `tree` nodes: tree x B for B = 1, 2, 4, ... up to max_batch,
    and the prefill chunk (at least as large as the largest of them)."""
    if tree < 1 or max_batch < 1 or prefill < 1:
        raise ValueError(f"static steps need tree, max_batch and prefill >= 1, got {tree}, {max_batch}, {prefill}")
    batches = [b for b in (1, 2, 4, 8, 16, 32, 64) if b < max_batch] + [max_batch]
    sizes = {tree * b for b in batches}
    return tuple(sorted(sizes | {max(prefill, max(sizes))}))
