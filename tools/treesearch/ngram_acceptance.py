"""N-gram statistics on calibration prompts: the backend-running half of `python -m tools trees
ngram-stats` (trees/ngram_stats.py holds the data type, trees/hybrid_search.py consumes it).

Greedy vanilla decodes of held-out prompts, replayed as a decode with the n-gram source would step
through them: at a step's root the source is asked for its proposal from the text so far, its
leading tokens are compared with the tokens that actually follow, and the next step starts after
the matched tokens and the bonus. (Counting every position instead would weigh each long repeated
run once per token and overstate deep matches several-fold.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from export.checkpoint import model_fingerprint
from tools.treesearch.acceptance import CalibrationRun, calibration_prompt_ids
from runtime.generator import Generator
from runtime.prompting import Prompt
from runtime.proposers.hybrid import NgramSource, ngram_path
from trees.ngram_stats import NgramStats


# The shortest suffix n-gram lengths the statistics are collected for (the hybrid search picks one).
MIN_NGRAMS = (1, 2, 3)


@dataclass(frozen=True)
class NgramStatsConfig(CalibrationRun):
    max_depth: int = 8                     # proposal tokens compared per position

    def __post_init__(self) -> None:
        self.check_counts("max_depth")


def matched_depth(proposal: Sequence[int], future: Sequence[int]) -> int:
    """How many leading tokens of `proposal` equal `future`'s."""
    depth = 0
    for guess, truth in zip(proposal, future):
        if guess != truth:
            break
        depth += 1
    return depth


def count_matches(sequence: list[int], first: int, source: NgramSource) -> tuple[int, list[int]]:
    """(steps, proposals by matched depth) of an n-gram decode replayed over `sequence`: roots
    sequence[t] from t = first while max_depth future tokens are known, each step moving past its
    matched tokens and the bonus token."""
    max_depth = source.depth
    counts = [0] * (max_depth + 1)
    tokens = np.asarray(sequence, dtype=np.int64)
    steps, t = 0, first
    while t < len(sequence) - max_depth:
        steps += 1
        proposal = ngram_path(tokens[: t + 1], source)
        matched = matched_depth(proposal.tolist(), sequence[t + 1: t + 1 + max_depth]) if len(proposal) else 0
        if len(proposal):
            counts[matched] += 1
        t += matched + 1
    return steps, counts


def collect_ngram_stats(config: NgramStatsConfig, prompts: Sequence[Prompt], calibration: str,
                        max_ngram: int = NgramSource.max_ngram, min_ngrams: Sequence[int] = MIN_NGRAMS,
                        show_progress: bool = True) -> tuple[NgramStats, ...]:
    """Greedy-decode the first `config.num_prompts` prompts that fit and count the n-gram source's hits,
    for each shortest n-gram length in `min_ngrams` (one decode, replayed once per source)."""
    sources = [NgramSource(config.max_depth, 0, max_ngram, n) for n in min_ngrams]
    gen = Generator.from_pretrained(config.model_dir, backend=config.backend, device=config.device,
                                    variant=config.variant)
    positions = [0] * len(sources)
    counts = [[0] * (config.max_depth + 1) for _ in sources]
    for ids in calibration_prompt_ids(gen, prompts, config.num_prompts, config.max_prompt_tokens,
                                      config.max_new_tokens, "ngram stats", show_progress):
        generated = gen.generate(ids, max_new_tokens=config.max_new_tokens).token_ids
        for i, source in enumerate(sources):
            n, found = count_matches(ids + generated, len(ids), source)
            positions[i], counts[i] = positions[i] + n, [a + b for a, b in zip(counts[i], found)]
    fingerprint = model_fingerprint(config.model_dir)
    return tuple(NgramStats(config.max_depth, positions[i], tuple(counts[i]), fingerprint, calibration,
                            config.num_prompts, source.min_ngram, config.variant, gen.backend.info.graph_sha256)
                 for i, source in enumerate(sources))
