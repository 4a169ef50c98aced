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


def profile_static_steps(device: str, sizes: tuple[int, ...], context: int = DEFAULT_CONTEXT) -> tuple[int, ...] | None:
    """The static step sizes of a backend that times `sizes` (runtime.loading.StaticSteps): on CUDA each
    timed T is a static step of its own (its own CUDA graph) and the prefill of `context` one more, so a
    tree of T nodes is timed at exactly what it will cost; None (dynamic steps) on the CPU."""
    return tuple(sorted(set(sizes) | {context})) if device.startswith("cuda") else None


def profile_step_latency(backend: Backend, sizes: tuple[int, ...] = DEFAULT_TREE_SIZES,
                         context: int = DEFAULT_CONTEXT, repeats: int = DEFAULT_REPEATS, warmup: int = 3,
                         seed: int = 0, show_progress: bool = True) -> dict[int, float]:
    """Median seconds of one step with T tree tokens over `context` committed entries, per T: the
    step and its readout (what the decode loop waits for; the readout synchronises the device).

    Trees are wide top-k fans (root + T-1 children of ranks 0..T-2, then deeper levels) so the mask
    is a real tree mask; the cache holds a prefill of random tokens, committed through the backend."""
    samples = step_latency_samples(backend, sizes, context, repeats, warmup, seed, show_progress)
    return {size: statistics.median(times) for size, times in samples.items()}


def latency_rounds(backend: Backend, sizes: tuple[int, ...], context: int = DEFAULT_CONTEXT,
                   repeats: int = DEFAULT_REPEATS, rounds: int = 5,
                   show_progress: bool = True) -> tuple[dict[int, float], dict[int, list[float]]]:
    """`rounds` sweeps over all sizes, `repeats` timed steps per size in all, so a load change on a
    shared machine hits every size alike: per size the median over rounds of each round's median, and
    every timed step's seconds (for the spread of the repeats, trees/quiet.py)."""
    if rounds < 1 or repeats < 1:
        raise ValueError("repeats and rounds must be >= 1")
    per_round = -(-repeats // rounds)
    runs = [step_latency_samples(backend, sizes, context, per_round, warmup=3 if r == 0 else 1,
                                 show_progress=show_progress and r == 0) for r in range(rounds)]
    medians = {s: statistics.median(statistics.median(run[s]) for run in runs) for s in sizes}
    return medians, {s: [t for run in runs for t in run[s]] for s in sizes}


def step_latency_samples(backend: Backend, sizes: tuple[int, ...] = DEFAULT_TREE_SIZES,
                         context: int = DEFAULT_CONTEXT, repeats: int = DEFAULT_REPEATS, warmup: int = 3,
                         seed: int = 0, show_progress: bool = True) -> dict[int, list[float]]:
    """Seconds of each of `repeats` timed steps per T (after `warmup` untimed ones), as
    profile_step_latency measures them."""
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
    samples: dict[int, list[float]] = {}
    for size in tqdm(sizes, desc="latency", disable=not show_progress):
        draft = Draft(rng.integers(0, vocab, size=size), Layout.from_parents(fan_tree(size).buffers.parents))
        times = []
        for i in range(warmup + repeats):
            start = time.perf_counter()
            read_step(backend.step(draft), draft, verifier)
            elapsed = time.perf_counter() - start
            if i >= warmup:
                times.append(elapsed)
        samples[size] = times
    backend.reset()
    return samples


def fan_tree(size: int) -> Tree:
    """A tree of `size` nodes: up to 8 children of the root, then deeper along rank 0."""
    width = max(1, min(size - 1, 8))
    paths = [(r,) for r in range(width)]
    while len(paths) < size - 1:  # grow deeper along rank 0 once the first level is full
        paths.append(paths[-1 if len(paths) >= width else 0] + (0,))
    return Tree(paths=tuple(paths[: size - 1]), topk=max(width, 1))


def batch_latency_samples(backend, batch: int, sizes: tuple[int, ...], context: int = DEFAULT_CONTEXT,
                          repeats: int = DEFAULT_REPEATS, warmup: int = 2, seed: int = 0) -> dict[int, list[float]]:
    """Seconds of each of `repeats` timed steps of `batch` sequences together (one packed step,
    runtime/backends/packing.py), each over `context` committed entries of its own and each with a fan
    tree of T tokens, per T of `sizes`: the step and every sequence's readout, as the BatchGenerator
    waits for them. `backend` must hold `batch` sequences (a BatchBackend of max_batch >= batch)."""
    if batch > backend.info.max_batch:
        raise ValueError(f"B={batch} sequences do not fit a backend of max_batch {backend.info.max_batch}")
    rng = np.random.default_rng(seed)
    vocab = backend.info.vocab_size
    verifier = GreedyVerifier()
    backend.reset()
    slots = [backend.open_sequence() for _ in range(batch)]
    for slot in slots:   # one prefill each (a long prompt is not what is timed)
        prefill = Draft.prefill(rng.integers(0, vocab, size=max(context, 1)))
        (output,) = backend.step_batch([(slot, prefill)])
        read_step(output, prefill, verifier)
        backend.commit_batch([(slot, range(prefill.size))])
    samples: dict[int, list[float]] = {}
    for size in sizes:
        drafts = [(slot, Draft(rng.integers(0, vocab, size=size), Layout.from_parents(fan_tree(size).buffers.parents)))
                  for slot in slots]
        times = []
        for i in range(warmup + repeats):
            start = time.perf_counter()
            for output, (_, draft) in zip(backend.step_batch(drafts), drafts):
                read_step(output, draft, verifier)
            elapsed = time.perf_counter() - start
            if i >= warmup:
                times.append(elapsed)
        samples[size] = times
    for slot in slots:
        backend.close_sequence(slot)
    backend.reset()
    return samples
