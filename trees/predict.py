"""A searched tree's expected accepted tokens per step on other statistics than it was searched on:
the search's own model (trees/search.py, trees/hybrid_search.py) evaluated, nothing searched.

A tree's `expected_mean_accepted` holds for text like its calibration's. Statistics collected on a
workload's own prompts (`python -m tools trees stats --prompts FILE`, `ngram-stats --prompts FILE`)
say what the same tree accepts there, before a benchmark does.
"""

from __future__ import annotations

from collections.abc import Sequence

from trees.hybrid_search import evaluate_hybrid
from trees.ngram_stats import NgramStats, NgramStatsError
from trees.ppd_tree import PPDTreeSet
from trees.search import AcceptanceModel, evaluate
from trees.stats import DEFAULT_SHRINKAGE, AcceptanceStats, StatsError


def flat_latency(tree_size: int) -> float:
    """Every step one second: accepted tokens per step do not depend on the latency."""
    return 1.0


def predicted_mean_accepted(trees: PPDTreeSet, stats: AcceptanceStats, ngram: Sequence[NgramStats] = ()) -> float:
    """Expected tokens per step (bonus included) of `trees` on `stats` (and, for a hybrid tree, the
    n-gram statistics of the source it chose), with the tree file's search settings."""
    meta = trees.metadata
    if meta.get("model_fingerprint") not in (None, stats.model_fingerprint):
        raise StatsError(f"the statistics are of model {stats.model_fingerprint}, the tree of "
                         f"{meta['model_fingerprint']}: collect them with that model")
    if stats.num_prompt_tokens != trees.num_prompt_tokens:
        raise StatsError(f"the statistics record N={stats.num_prompt_tokens} prompt tokens, the tree uses "
                         f"N={trees.num_prompt_tokens}: collect them with the tree's checkpoint")
    search = meta.get("search", {})
    model = AcceptanceModel.from_stats(stats, min(int(search.get("topk", stats.topk)), stats.topk),
                                       float(search.get("shrinkage", DEFAULT_SHRINKAGE)))
    hybrid = meta.get("hybrid")
    if hybrid is None:
        return evaluate(trees, model, flat_latency).mean_accepted
    source = next((s for s in ngram if s.min_ngram == hybrid["min_ngram"]), None)
    if source is None:
        raise NgramStatsError(f"a hybrid tree with n-grams down to {hybrid['min_ngram']} needs n-gram statistics "
                              f"of that source (`python -m tools trees ngram-stats`); got "
                              f"{sorted(s.min_ngram for s in ngram) or 'none'}")
    return evaluate_hybrid(trees, model, source, flat_latency, int(hybrid["ngram_depth"]),
                           int(hybrid["ngram_prompt_tokens"])).mean_accepted
