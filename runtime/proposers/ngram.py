"""Prompt lookup as a tree: continuations of the latest n-gram's earlier occurrences, merged in a trie."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.backends.base import StepOutput
from runtime.draft import Draft


@dataclass(frozen=True)
class NgramConfig:
    max_ngram: int = 3      # longest suffix n-gram to look up; shorter ones fill the rest of the budget
    min_ngram: int = 1
    max_depth: int = 7      # tokens per continuation
    max_nodes: int = 10     # tree budget, root included (T of the step)

    def __post_init__(self) -> None:
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"ngram sizes need 1 <= min_ngram <= max_ngram, got {self.min_ngram}, {self.max_ngram}")
        if self.max_depth < 1 or self.max_nodes < 2:
            raise ValueError("ngram needs max_depth >= 1 and max_nodes >= 2")


def find_continuations(history: np.ndarray, n: int, depth: int) -> list[np.ndarray]:
    """Continuations (up to `depth` tokens) after earlier occurrences of history's last n tokens,
    most recent occurrence first."""
    if len(history) <= n:
        return []
    windows = np.lib.stride_tricks.sliding_window_view(history[:-1], n)  # [len-n, n], excludes the suffix itself
    starts = np.flatnonzero((windows == history[-n:]).all(axis=1))[::-1]
    return [history[s + n: s + n + depth] for s in starts if s + n < len(history)]


class NgramProposer:
    def __init__(self, config: NgramConfig = NgramConfig()) -> None:
        self.config = config

    @property
    def max_draft_tokens(self) -> int:
        return self.config.max_nodes

    def prefill_draft(self, prompt_ids: list[int]) -> Draft:
        return Draft.chain(prompt_ids)

    def propose(self, history: list[int]) -> Draft:
        cfg = self.config
        hist = np.asarray(history, dtype=np.int64)
        tokens, parents = [int(hist[-1])], [-1]
        trie: dict[tuple[int, int], int] = {}  # (parent node, token) -> node
        for n in range(min(cfg.max_ngram, len(hist) - 1), cfg.min_ngram - 1, -1):
            for continuation in find_continuations(hist, n, cfg.max_depth):
                node = 0
                for token in continuation.tolist():
                    child = trie.get((node, token))
                    if child is None:
                        if len(tokens) == cfg.max_nodes:
                            break
                        child = len(tokens)
                        trie[(node, token)] = child
                        tokens.append(token)
                        parents.append(node)
                    node = child
                if len(tokens) == cfg.max_nodes:
                    return Draft.from_parents(tokens, parents)
        return Draft.from_parents(tokens, parents)

    def observe(self, draft: Draft, output: StepOutput, last_accepted: int) -> None:
        pass
