"""Trees per batch size: the search again for steps of B sequences (runtime.BatchGenerator), written into
the tree file's "batch" record (trees/ppd_tree.py batch_tree_sets).

A step of B sequences each with a tree of t tokens costs what the profile measured for B (its batched
steps, `trees profile --batch-sizes`), else what the one-sequence curve says of B t tokens (the profile is
a curve in total tokens per step); its speedup is over vanilla at the same B, one token per sequence per
L_B(1). As B grows the trees shrink, and where the best tree is not predicted at least
`SearchConfig.min_batch_speedup` times vanilla the record holds null: at that B the method takes
vanilla steps (the search must never make batching slower).

Why a margin: the prediction prices the step alone, for B sequences all in the same state and with the
calibration prompts' acceptance. Left out are the host's work per sequence (proposal, verification,
commit: B times one sequence's), steps that mix prefills with trees, and prompts that accept less than the
calibration set. Measured 2026-12-06 (onnxruntime fp32, SmolLM2, MT-Bench, the 2-core AVX-512 EPYC) the
hybrid predictions were 9-30 % above the measured speedups: B = 1 1.49x predicted / 1.36x measured, B = 2
1.37x / 1.05x, B = 4 1.08x / 0.95x. With the margin B = 4 decodes without a tree, B = 2 keeps its tree.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from trees import TreeError
from trees.latency import LatencyProfile
from trees.search import AcceptanceModel, SearchConfig, search

BATCH_SIZES = (2, 4, 8, 16)


def batch_latency(profile: LatencyProfile, batch: int) -> tuple[Callable[[int], float], int, str]:
    """(tokens per sequence -> seconds of a step of `batch` sequences, the largest tokens it covers, the
    source: "measured" or "total tokens")."""
    if batch in profile.batch_sizes:
        measured = dict(profile.batch)[batch]
        return profile.batch_latency(batch), len(measured), "measured"
    return (lambda t: profile.latency(batch * t)), profile.max_tokens // batch, "total tokens"


def search_batches(model: AcceptanceModel, profile: LatencyProfile, config: SearchConfig,
                   hybrid_search: Callable[[Callable[[int], float], int], object] | None = None,
                   sizes: Sequence[int] = BATCH_SIZES) -> dict[str, dict]:
    """{str(B): {"trees": tree set JSON or None, "budget", "expected_speedup", "expected_mean_accepted",
    "latency", ["hybrid": its n-gram half]}} for each B the profile covers (B tokens at least).
    `hybrid_search(latency, budget)`: the hybrid search (trees/hybrid_search.py) for methods with an
    n-gram half; None: plain PPD / HT trees."""
    record = {}
    for batch in sizes:
        latency, reach, source = batch_latency(profile, batch)
        if reach < 1:
            continue   # the profile holds no step of B sequences
        budgets = [b for b in config.budgets if b <= reach] or [reach]
        try:
            if hybrid_search is None:
                trees, chosen = search(model, latency, budgets[-1], config)
                extra = {}
            else:
                choice = hybrid_search(latency, budgets[-1])
                trees, chosen = choice.trees, choice
                extra = {"hybrid": choice.to_json()}
        except TreeError:   # no tree fits the steps measured at this B: vanilla
            trees, chosen, extra = None, None, {}
        faster = chosen is not None and chosen.speedup >= config.min_batch_speedup
        record[str(batch)] = {
            "trees": trees.to_json() if faster else None,
            "budget": max(step.tokens_with_ensemble(model.ensemble) for step in trees.trees) if faster else 1,
            "expected_speedup": round(chosen.speedup, 4) if faster else 1.0,
            "expected_mean_accepted": round(chosen.mean_accepted, 4) if faster else 1.0,
            "best_tree_speedup": None if chosen is None else round(chosen.speedup, 4),
            "latency": source, **(extra if faster else {})}
    return record


def format_batches(record: dict[str, dict]) -> str:
    return "; ".join(f"B={b}: " + (f"{e['budget']} tokens, {e['expected_speedup']:.2f}x" if e["trees"] else
                                   f"vanilla (best tree {e['best_tree_speedup'] or 0:.2f}x predicted)")
                     for b, e in record.items())
