"""Hybrid trees: how much of the hardware-aware budget goes to the n-gram source, and the PPD trees
for the rest.

A hybrid step holds the PPD tree G_m and the n-gram proposal: up to D tokens, each node only the
n-gram made carrying c prompt tokens, i.e. at most D (1 + k c) more tokens than G_m. Its accepted
depth is the longer of the two sources' accepted paths (they share a trie), so with a = PPD's and
b = the n-gram's probability of reaching depth d (b_d = match rate x P(first d right | a proposal),
from trees/ngram_stats.py), and treating the two as independent,

    tokens per step in state m = R_m + sum_{d <= D} b_d (1 - a_m(d))

A step pays for the n-gram tokens only when the source proposes something (at its match rate r):

    seconds per step with PPD tree T = r L(T + D (1 + k c)) + (1 - r) L(T)

so a source that proposes less often but is right more often (a longer shortest suffix n-gram) can
win although it reaches fewer tokens. For each (D, c) and each n-gram source (by min_ngram) the PPD
trees are searched (trees/search.py) on that blended latency within the budget left, and the choice
with the most expected tokens per second wins; D = 0 is plain PPD. The model charges the full D
tokens whenever there is a proposal, even when the path shares nodes with PPD's or is shorter
(conservative), lets the next state depend on PPD's tree only, and assumes independence (optimistic
where both sources are right on the same easy tokens); the measured sweep (`python -m tools trees
sweep --method hybrid`) is the check.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from trees.ngram_stats import NgramStats
from trees.ppd_tree import PPDTreeSet
from trees.search import AcceptanceModel, Evaluation, LatencyFn, SearchConfig, evaluate, search
from trees.tree import TreeError

DEFAULT_NGRAM_PROMPT_TOKENS = (0, 1)


@dataclass(frozen=True)
class HybridChoice:
    trees: PPDTreeSet            # the PPD part
    ngram_depth: int             # D
    ngram_prompt_tokens: int     # c
    min_ngram: int               # the n-gram source's shortest suffix n-gram
    ppd: Evaluation              # the PPD part alone, on the shifted latency
    mean_accepted: float         # expected tokens per step, bonus included
    tokens_per_second: float
    speedup: float               # over vanilla: one token per L(1)

    def to_json(self) -> dict:
        return {"ngram_depth": self.ngram_depth, "ngram_prompt_tokens": self.ngram_prompt_tokens,
                "min_ngram": self.min_ngram,
                "expected_mean_accepted": round(self.mean_accepted, 4), "expected_speedup": round(self.speedup, 4),
                "ppd_part_mean_accepted": round(self.ppd.mean_accepted, 4)}


def depth_reach(trees: PPDTreeSet, model: AcceptanceModel, m: int, max_depth: int) -> np.ndarray:
    """[max_depth + 1] a_m(d): probability that PPD's tree in state m accepts at least d candidates."""
    reach = np.zeros(max_depth + 1)
    reach[0] = 1.0
    for path in trees.trees[m].tree.paths:
        if len(path) <= max_depth:
            reach[len(path)] += model.path_probability(m, path)
    return reach


def step_latency(latency: LatencyFn, ngram: NgramStats, extra: int) -> LatencyFn:
    """Seconds of a step with a PPD tree of t tokens: `extra` n-gram tokens more when the source proposes."""
    rate = ngram.match_rate if extra else 0.0
    return lambda t: rate * latency(t + extra) + (1.0 - rate) * latency(t)


def evaluate_hybrid(trees: PPDTreeSet, model: AcceptanceModel, ngram: NgramStats, latency: LatencyFn,
                    depth: int, prompt_tokens: int) -> HybridChoice:
    """Expected behaviour of PPD trees + a D-token n-gram proposal on `latency` (unshifted)."""
    ppd = evaluate(trees, model, step_latency(latency, ngram, depth * (1 + model.ensemble * prompt_tokens)))
    reach = [ngram.match_rate * ngram.at_least(d) for d in range(depth + 1)]
    gains = [sum(reach[d] * (1 - a[d]) for d in range(1, depth + 1))
             for a in (depth_reach(trees, model, m, depth) for m in range(len(trees.trees)))]
    occupancy = np.asarray(ppd.occupancy)
    mean_accepted = float(occupancy @ (np.asarray(ppd.tokens_per_step) + gains))
    tokens_per_second = mean_accepted / float(occupancy @ np.asarray(ppd.seconds_per_step))
    return HybridChoice(trees, depth, prompt_tokens, ngram.min_ngram, ppd, mean_accepted, tokens_per_second,
                        tokens_per_second * latency(1))


def search_hybrid(model: AcceptanceModel, ngram: Sequence[NgramStats], latency: LatencyFn, budget: int,
                  config: SearchConfig = SearchConfig(), depths: Sequence[int] | None = None,
                  prompt_tokens: tuple[int, ...] = DEFAULT_NGRAM_PROMPT_TOKENS) -> HybridChoice:
    """The n-gram source (one of `ngram`, by min_ngram), (D, c) and PPD trees with the most expected
    tokens per second within `budget` tokens; D from `depths`, by default every depth the statistics
    measured (0 .. their max_depth)."""
    if depths is None:
        depths = range(max(source.max_depth for source in ngram) + 1)
    best: HybridChoice | None = None
    for depth in depths:
        for count in (prompt_tokens if depth else (0,)):
            if count > model.num_prompt_tokens:
                continue
            extra = depth * (1 + model.ensemble * count)
            if budget - extra < 1 + model.ensemble:
                continue
            for source in ngram:
                if depth > source.max_depth:
                    continue
                trees, _ = search(model, step_latency(latency, source, extra), budget - extra, config)
                choice = evaluate_hybrid(trees, model, source, latency, depth, count)
                if best is None or choice.tokens_per_second > best.tokens_per_second * (1 + 1e-9):
                    best = choice
    if best is None:
        raise TreeError(f"no hybrid tree fits a budget of {budget} tokens")
    return best
