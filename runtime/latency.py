"""Step latency against tree size on the device actually present: the input of hardware-aware trees."""

from __future__ import annotations

import statistics
import time

import numpy as np
from tqdm import tqdm

from runtime.backends.base import Backend
from runtime.draft import Draft, Layout
from runtime.readout import read_step
from runtime.verify import GreedyVerifier
from trees import Tree

DEFAULT_TREE_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)
DEFAULT_CONTEXT = 300
DEFAULT_REPEATS = 10


def profile_step_latency(backend: Backend, sizes: tuple[int, ...] = DEFAULT_TREE_SIZES,
                         context: int = DEFAULT_CONTEXT, repeats: int = DEFAULT_REPEATS, warmup: int = 3,
                         seed: int = 0, show_progress: bool = True) -> dict[int, float]:
    """Median seconds of one step with T tree tokens over `context` committed entries, per T: the
    step and its readout (what the decode loop waits for; the readout synchronises the device).

    Trees are wide top-k fans (root + T-1 children of ranks 0..T-2, then deeper levels) so the mask
    is a real tree mask; the cache holds a prefill of random tokens, committed through the backend."""
    rng = np.random.default_rng(seed)
    if context + max(sizes) > backend.info.max_context:
        raise ValueError(f"context {context} + tree {max(sizes)} exceeds the backend's max_context "
                         f"{backend.info.max_context}")
    vocab = backend.info.vocab_size
    verifier = GreedyVerifier()
    backend.reset()
    if context:
        prefill = Draft.prefill(rng.integers(0, vocab, size=context))
        read_step(backend.step(prefill), prefill, verifier)
        backend.commit(range(context))
    medians: dict[int, float] = {}
    for size in tqdm(sizes, desc="latency", disable=not show_progress):
        draft = Draft(rng.integers(0, vocab, size=size), Layout.from_parents(fan_tree(size).buffers.parents))
        times = []
        for i in range(warmup + repeats):
            start = time.perf_counter()
            read_step(backend.step(draft), draft, verifier)
            elapsed = time.perf_counter() - start
            if i >= warmup:
                times.append(elapsed)
        medians[size] = statistics.median(times)
    backend.reset()
    return medians


def fan_tree(size: int) -> Tree:
    """A tree of `size` nodes: up to 8 children of the root, then deeper along rank 0."""
    width = max(1, min(size - 1, 8))
    paths = [(r,) for r in range(width)]
    while len(paths) < size - 1:  # grow deeper along rank 0 once the first level is full
        paths.append(paths[-1 if len(paths) >= width else 0] + (0,))
    return Tree(paths=tuple(paths[: size - 1]), topk=max(width, 1))
