"""Step latency against tree size on the device actually present: the input of hardware-aware trees."""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch
from tqdm import tqdm

from runtime.backends.base import Backend
from trees import Tree

DEFAULT_TREE_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)
DEFAULT_CONTEXT = 300
DEFAULT_REPEATS = 10


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_step_latency(backend: Backend, sizes: tuple[int, ...] = DEFAULT_TREE_SIZES,
                         context: int = DEFAULT_CONTEXT, repeats: int = DEFAULT_REPEATS, warmup: int = 3,
                         seed: int = 0, show_progress: bool = True) -> dict[int, float]:
    """Median seconds of one step with T tree tokens over `context` committed entries, per T.

    Trees are wide top-k fans (root + T-1 children of ranks 0..T-2, then deeper levels) so the mask
    is a real tree mask; the cache holds random entries (latency does not depend on their values)."""
    rng = np.random.default_rng(seed)
    cache = backend.cache
    if context + max(sizes) > cache.max_context:
        raise ValueError(f"context {context} + tree {max(sizes)} exceeds the backend's max_context {cache.max_context}")
    cache.reset()
    cache.keys.normal_()
    cache.values.normal_()
    cache.length = context
    vocab = backend.info.vocab_size
    medians: dict[int, float] = {}
    for size in tqdm(sizes, desc="latency", disable=not show_progress):
        width = max(1, min(size - 1, 8))
        paths = [(r,) for r in range(width)]
        while len(paths) < size - 1:  # grow deeper along rank 0 once the first level is full
            paths.append(paths[-1 if len(paths) >= width else 0] + (0,))
        buffers = Tree(paths=tuple(paths[: size - 1]), topk=max(width, 1)).buffers
        tokens = rng.integers(0, vocab, size=size)
        positions = context + buffers.depth
        times = []
        for i in range(warmup + repeats):
            _synchronize(backend.device)
            start = time.perf_counter()
            out = backend.step(tokens, positions, buffers.ancestor_mask)
            out.logits.argmax(-1).cpu()  # what the decode loop waits for
            elapsed = time.perf_counter() - start
            if i >= warmup:
                times.append(elapsed)
        medians[size] = statistics.median(times)
    cache.reset()
    return medians
