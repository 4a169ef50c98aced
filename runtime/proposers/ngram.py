"""Prompt lookup as a tree: continuations of the latest n-gram's earlier occurrences, merged in a trie."""

from __future__ import annotations

import numpy as np

from export.methods import NgramOptions
from runtime.draft import Draft, Layout
from runtime.proposers.trie import CandidateTrie
from runtime.readout import StepReadout

MAX_CACHED_LAYOUTS = 256   # n-gram tree shapes repeat (chains, small fans): reuse their layouts


def find_continuations(history: np.ndarray, n: int, depth: int) -> list[np.ndarray]:
    """Continuations (up to `depth` tokens) after earlier occurrences of history's last n tokens,
    most recent occurrence first."""
    if len(history) <= n:
        return []
    windows = np.lib.stride_tricks.sliding_window_view(history[:-1], n)  # [len-n, n], excludes the suffix itself
    starts = np.flatnonzero((windows == history[-n:]).all(axis=1))[::-1]
    return [history[s + n: s + n + depth] for s in starts if s + n < len(history)]


def add_ngram_candidates(trie: CandidateTrie, history: np.ndarray, options: NgramOptions) -> None:
    """Merge the continuations of the longest matching suffix n-grams first, then shorter ones,
    until the trie's budget is spent."""
    for n in range(min(options.max_ngram, len(history) - 1), options.min_ngram - 1, -1):
        for continuation in find_continuations(history, n, options.max_depth):
            trie.add(continuation, "ngram")
            if trie.full:
                return


class NgramProposer:
    def __init__(self, options: NgramOptions = NgramOptions()) -> None:
        self.options = options
        self._layouts: dict[tuple[int, ...], Layout] = {}

    @property
    def max_draft_tokens(self) -> int:
        return self.options.max_nodes

    def prefill_draft(self, prompt_ids: list[int], batch_size: int = 1) -> Draft:
        return Draft.prefill(prompt_ids)

    def propose(self, history: list[int], batch_size: int = 1) -> Draft:
        trie = CandidateTrie(history[-1], self.options.max_nodes)
        add_ngram_candidates(trie, np.asarray(history, dtype=np.int64), self.options)
        shape = tuple(trie.parents)
        layout = self._layouts.get(shape)
        if layout is None:
            if len(self._layouts) >= MAX_CACHED_LAYOUTS:
                self._layouts.clear()
            layout = self._layouts[shape] = trie.layout()
        return trie.draft(layout)

    def new_sequence(self) -> "NgramProposer":
        return self   # stateless: it reads the history it is given

    def observe(self, draft: Draft, readout: StepReadout, path: list[int]) -> None:
        pass
