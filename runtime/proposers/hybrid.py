"""Hybrid: PPD's dynamic sparse tree and the n-gram continuation of the context in one step.

The two sources are strong on different text (PPD on chat, n-gram lookup on code and quoted
context), so each step's tree holds both, merged by the candidate trie (a token path both propose
is one node):

    1. the PPD tree for m (the number of guesses the last accepted node produced), its candidate
       tokens read from those guesses, every node with the prompt tokens the tree file gives it;
    2. the continuation after the most recent earlier occurrence of the longest matching suffix
       n-gram, up to `ngram_depth` tokens; each node only the n-gram made carries
       `ngram_prompt_tokens` prompt tokens, so that if the path ends there the next step still has
       guesses (a node both made keeps the larger count).

The layout varies with the n-gram path, so it is built per distinct (shape, prompt counts) and
cached; the backend caches its device tensors by the same key. Verification and the next step's
guesses work exactly as for PPD (the readout's prediction rows of the accepted node).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import numpy as np

from dataclasses import dataclass

from export.ppd import PPDConfig
from runtime.draft import Draft, Layout
from runtime.proposers.ngram import find_continuations
from runtime.proposers.ppd import PPDProposer, attach_layout
from runtime.proposers.trie import CandidateTrie
from runtime.readout import StepReadout
from trees import PPDTreeSet, for_batch

MAX_CACHED_LAYOUTS = 512


@dataclass(frozen=True)
class NgramSource:
    """The n-gram half of a hybrid step (resolved from HybridOptions and the tree file)."""

    depth: int             # proposal tokens per step (0: plain PPD)
    prompt_tokens: int     # prompt tokens on each node only the n-gram made
    max_ngram: int = 3
    min_ngram: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"the n-gram source needs 1 <= min_ngram <= max_ngram, got {self.min_ngram}, "
                             f"{self.max_ngram}: pass max_ngram >= {self.min_ngram} or a smaller min_ngram")


def ngram_path(history: np.ndarray, source: NgramSource) -> np.ndarray:
    """The continuation after the most recent earlier occurrence of the longest matching suffix n-gram."""
    if source.depth == 0:
        return history[:0]
    for n in range(min(source.max_ngram, len(history) - 1), source.min_ngram - 1, -1):
        continuations = find_continuations(history, n, source.depth)
        if continuations:
            return continuations[0]
    return history[:0]


class HybridProposer:
    def __init__(self, config: PPDConfig, trees: PPDTreeSet, vocab_size: int, source: NgramSource,
                 batch_sources: Mapping[int, NgramSource] | None = None) -> None:
        """`source`: the n-gram half for one sequence; `batch_sources`: {B: the n-gram half searched for
        steps of B sequences} (the tree file's batch record), each used from its B on."""
        self.sources = {1: source, **dict(batch_sources or {})}
        for s in self.sources.values():
            if s.prompt_tokens > config.num_prompt_tokens:
                raise ValueError(f"ngram_prompt_tokens ({s.prompt_tokens}) exceeds the checkpoint's "
                                 f"N={config.num_prompt_tokens} prompt tokens")
        self.ppd = PPDProposer(config, trees, vocab_size)
        self.source = source
        self._layouts: dict[tuple, tuple[Layout, np.ndarray]] = {}

    @property
    def max_draft_tokens(self) -> int:
        ensemble = self.ppd.config.ensemble
        return max(max((t.layout.size for t in templates or ()), default=1)
                   + for_batch(self.sources, b).depth * (1 + for_batch(self.sources, b).prompt_tokens * ensemble)
                   for b, templates in self.ppd.batch_templates.items())

    def prefill_draft(self, prompt_ids: list[int], batch_size: int = 1) -> Draft:
        return self.ppd.prefill_draft(prompt_ids, batch_size)

    def propose(self, history: list[int], batch_size: int = 1) -> Draft:
        templates = for_batch(self.ppd.batch_templates, batch_size)
        if templates is None:   # no tree at this batch size (runtime/proposers/ppd.py)
            return self.ppd.propose(history, batch_size)
        source = for_batch(self.sources, batch_size)
        template = templates[len(self.ppd.guesses)]
        c = template.layout.num_candidates
        tokens = template.tokens[:c].copy()
        tokens[0] = history[-1]
        tokens[1:] = self.ppd.guesses[template.cand_depth - 1, template.cand_rank]
        counts = [len(range(*template.layout.groups[i])) for i in range(c)]
        trie = CandidateTrie(tokens[0], max_nodes=c + source.depth)
        parents = template.layout.buffers.parents
        trie_node = [0]
        for node in range(1, c):   # topological order: a parent is in the trie before its children
            trie_node.append(trie.add([tokens[node]], "ppd", below=trie_node[parents[node]])[0])
        node_counts = [0] * len(trie)
        for node in range(c):
            node_counts[trie_node[node]] = counts[node]
        for node in trie.add(ngram_path(np.asarray(history, dtype=np.int64), source), "ngram"):
            if node >= len(node_counts):
                node_counts.append(source.prompt_tokens)
        return Draft(*self._layout(trie, node_counts), sources=tuple(trie.sources))

    def _layout(self, trie: CandidateTrie, counts: list[int]) -> tuple[np.ndarray, Layout]:
        """(tokens [T]: the trie's candidates, then the prompt-token ids; the layout), cached by shape
        and prompt counts."""
        key = (tuple(trie.parents), tuple(counts))
        cached = self._layouts.get(key)
        if cached is None:
            if len(self._layouts) >= MAX_CACHED_LAYOUTS:
                self._layouts.clear()
            ppd = self.ppd
            cached = self._layouts[key] = attach_layout(list(trie.parents), [0] * len(trie), counts, len(trie),
                                                        ppd.config, ppd.vocab_size, ppd.topk)
        layout, template = cached
        tokens = template.copy()
        tokens[: len(trie)] = trie.tokens
        return tokens, layout

    def new_sequence(self) -> "HybridProposer":
        fresh = copy.copy(self)   # the layout cache shared; PPD's guesses its own
        fresh.ppd = self.ppd.new_sequence()
        return fresh

    def observe(self, draft: Draft, readout: StepReadout, path: list[int]) -> None:
        self.ppd.observe(draft, readout, path)
