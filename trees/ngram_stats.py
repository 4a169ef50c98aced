"""How often the n-gram continuation of the context is right: the data hybrid trees are searched on.

At every step of greedy decodes of held-out prompts (replayed as an n-gram decode steps through
them), the n-gram source (the continuation after the most recent earlier occurrence of the longest
matching suffix n-gram, n from 3 down to `min_ngram`) is compared with the tokens that actually
follow. One file holds the statistics of every `min_ngram` collected (a shorter match proposes more
often and is right less often; the hybrid search picks the best):

    positions         steps looked at
    match_rate        share of steps where the source proposes anything
    depth_counts[d]   steps (with a proposal) whose first d tokens, and not d + 1, were right
    at_least(d)       P(first d tokens right | a proposal) = sum of depth_counts[d:] / proposals
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from trees._json import check_format, fields_of, read_json_file, write_json
from trees.devices import DEFAULT_VARIANT

NGRAM_STATS_FORMAT = "ppdeploy-ngram-acceptance"
FIX = "collect them with `python -m tools trees ngram-stats`"


class NgramStatsError(ValueError):
    """An n-gram statistics file that cannot be used, with the fix."""


@dataclass(frozen=True)
class NgramStats:
    max_depth: int                  # tokens compared per proposal
    positions: int                  # positions looked at (each with max_depth known future tokens)
    depth_counts: tuple[int, ...]   # [max_depth + 1] proposals by matched depth 0..max_depth
    model_fingerprint: str
    calibration: str = ""
    num_prompts: int = 0
    min_ngram: int = 1              # shortest suffix n-gram the source looks up
    variant: str = DEFAULT_VARIANT  # the engine variant whose greedy decodes were replayed
    graph_sha256: str | None = None  # the exported graph decoded (runtime ModelInfo); None: torch, or not recorded

    def __post_init__(self) -> None:
        if len(self.depth_counts) != self.max_depth + 1 or min(self.depth_counts, default=0) < 0:
            raise NgramStatsError(f"depth_counts needs {self.max_depth + 1} non-negative counts, got {self.depth_counts}")
        if sum(self.depth_counts) > self.positions:
            raise NgramStatsError("more proposals than positions")

    @property
    def proposals(self) -> int:
        return sum(self.depth_counts)

    @property
    def match_rate(self) -> float:
        return self.proposals / self.positions if self.positions else 0.0

    def at_least(self, depth: int) -> float:
        """P(the first `depth` proposed tokens are all right | something was proposed)."""
        if not self.proposals or depth > self.max_depth:
            return 0.0
        return sum(self.depth_counts[depth:]) / self.proposals

    def to_json(self) -> dict:
        return {"format": NGRAM_STATS_FORMAT, "max_depth": self.max_depth, "positions": self.positions,
                "match_rate": round(self.match_rate, 4), "depth_counts": list(self.depth_counts),
                "at_least": [round(self.at_least(d), 4) for d in range(1, self.max_depth + 1)],
                "model_fingerprint": self.model_fingerprint, "calibration": self.calibration,
                "num_prompts": self.num_prompts, "min_ngram": self.min_ngram, "variant": self.variant,
                **({"graph_sha256": self.graph_sha256} if self.graph_sha256 else {})}

    @classmethod
    def from_json(cls, data: dict) -> "NgramStats":
        check_format(data, NGRAM_STATS_FORMAT, NgramStatsError, "an n-gram statistics file", FIX)
        with fields_of(NgramStatsError, "n-gram statistics JSON is missing or has a bad field"):
            return cls(int(data["max_depth"]), int(data["positions"]), tuple(int(c) for c in data["depth_counts"]),
                       str(data["model_fingerprint"]), str(data.get("calibration", "")),
                       int(data.get("num_prompts", 0)), int(data.get("min_ngram", 1)),
                       str(data.get("variant", DEFAULT_VARIANT)), data.get("graph_sha256"))


def save_ngram_stats(path: str | Path, stats: Sequence[NgramStats]) -> Path:
    """One file for the statistics of several min_ngram: {"format", "sources": [one per min_ngram]}."""
    if not stats or len({s.min_ngram for s in stats}) != len(stats):
        raise NgramStatsError("save n-gram statistics of one or more distinct min_ngram values")
    return write_json(path, {"format": NGRAM_STATS_FORMAT, "sources": [s.to_json() for s in stats]})


def load_ngram_stats(path: str | Path) -> tuple[NgramStats, ...]:
    """The statistics per min_ngram in the file (a file of one source, min_ngram 1, reads as one)."""
    data = read_json_file(path, NgramStatsError, "n-gram statistics file", FIX)
    check_format(data, NGRAM_STATS_FORMAT, NgramStatsError, "an n-gram statistics file", FIX)
    sources = data.get("sources", [data])
    if not isinstance(sources, list) or not sources:
        raise NgramStatsError(f"{path} lists no n-gram sources; {FIX}")
    return tuple(NgramStats.from_json(source) for source in sources)
