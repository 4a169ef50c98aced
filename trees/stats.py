"""Acceptance statistics of PPD's prompt-token predictions: the data the tree search is fitted to.

Collected by `tools.treesearch.acceptance` (`python -m tools trees stats`) on held-out calibration prompts. After
every decode step the accepted node's m prompt tokens give [m, K] top-K predictions for the next
step; row d-1 guesses the token d places after the next root. The decode is lossless greedy, so the
tokens it goes on to produce are the truth to compare with. One record per step:

    (m, rank_1, ..., rank_j)     j <= m; rank_d in 0..K-1 = rank of the true token in row d-1,
                                 K = not in the top-K; depths whose true token lies beyond the
                                 generated text are left off (so j < m near the end)

From these, per m, depth d and rank r, the conditional acceptance

    p_m(d, r) = P(true token at depth d has rank r | true tokens at depths 1..d-1 all in the top-K)

and a candidate path (r_1..r_d) is accepted with estimated probability prod_i p_m(i, r_i) (ranks of
one depth are mutually exclusive: exactly one token is right). Prompt token i attends only to prompt
tokens 0..i (the EPT mask), so its predictions do not depend on how many prompt tokens follow it;
p_m differs between m only through which contexts lead to m. `conditional` therefore shrinks the
per-m estimate towards the estimate pooled over m (`shrinkage` pseudo-observations), which makes
sparse m usable and leaves well-observed m to their own data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trees._json import check_format, fields_of, read_json_file, write_json
from trees.devices import DEFAULT_VARIANT

STATS_FORMAT = "ppdeploy-ppd-acceptance"
DEFAULT_SHRINKAGE = 20.0


class StatsError(ValueError):
    """An acceptance-statistics file that cannot be used, with the reason and the fix."""


@dataclass(frozen=True)
class AcceptanceStats:
    num_prompt_tokens: int                 # N
    ensemble: int                          # k virtual tokens per prompt token (a node's cost is k * count)
    topk: int                              # K: ranks recorded per prediction row
    steps: tuple[tuple[int, ...], ...]     # (m, rank_1..rank_j) per decode step, see module doc
    model_fingerprint: str
    checkpoint_sha256: str                 # of the prompt-token embeddings (trees.prompt_tokens_sha256)
    calibration: str = ""                  # where the prompts came from (never an evaluation set)
    num_prompts: int = 0
    max_new_tokens: int = 0
    backend: str = ""
    device: str = ""
    variant: str = DEFAULT_VARIANT         # the engine variant decoded (export/quantize.py); its outputs,
                                           # hence the predictions' ranks, differ slightly per variant
    graph_sha256: str | None = None        # the exported graph decoded (runtime ModelInfo); None: torch, or not recorded

    def __post_init__(self) -> None:
        n, k = self.num_prompt_tokens, self.topk
        if n < 1 or self.ensemble < 1 or k < 1:
            raise StatsError(f"num_prompt_tokens, ensemble and topk must be >= 1, got {n}, {self.ensemble}, {k}")
        steps = tuple(tuple(int(x) for x in row) for row in self.steps)
        for row in steps:
            if not row or not 0 <= row[0] <= n or len(row) - 1 > row[0] or any(not 0 <= r <= k for r in row[1:]):
                raise StatsError(f"bad step record {list(row)}: expected [m, rank_1..rank_j] with m in 0..{n}, "
                                 f"j <= m, ranks in 0..{k} ({k} = not in the top-{k})")
        object.__setattr__(self, "steps", steps)

    # --- estimates -----------------------------------------------------------------------------
    def counts(self) -> tuple[np.ndarray, np.ndarray]:
        """hits [N+1, N, K]: steps with m predictions whose true token at depth d (index d-1) had
        rank r while depths 1..d-1 were all in the top-K; trials [N+1, N]: those steps counted over r
        plus the misses."""
        n, k = self.num_prompt_tokens, self.topk
        hits = np.zeros((n + 1, n, k), dtype=np.int64)
        trials = np.zeros((n + 1, n), dtype=np.int64)
        for m, *ranks in self.steps:
            for d, rank in enumerate(ranks):
                trials[m, d] += 1
                if rank == k:
                    break
                hits[m, d, rank] += 1
        return hits, trials

    def conditional(self, shrinkage: float = DEFAULT_SHRINKAGE) -> np.ndarray:
        """p [N+1, N, K]: p[m, d-1, r] = P(rank r at depth d | depths above in the top-K, m rows),
        the per-m estimate shrunk towards the pooled one; 0 where nothing was observed."""
        if shrinkage < 0:
            raise StatsError(f"shrinkage must be >= 0, got {shrinkage}")
        hits, trials = self.counts()
        pooled_hits, pooled_trials = hits.sum(0), trials.sum(0)
        pooled = np.divide(pooled_hits, pooled_trials[:, None], out=np.zeros(pooled_hits.shape),
                           where=pooled_trials[:, None] > 0)
        denominator = trials[:, :, None] + shrinkage
        numerator = hits + shrinkage * pooled[None]
        return np.divide(numerator, denominator, out=np.zeros(hits.shape), where=denominator > 0)

    def accuracy(self) -> tuple[np.ndarray, np.ndarray]:
        """Unconditional top-1 and top-K accuracy per prediction row [N] (rows of every step)."""
        n, k = self.num_prompt_tokens, self.topk
        top1, topk, seen = np.zeros(n), np.zeros(n), np.zeros(n)
        for _, *ranks in self.steps:
            for d, rank in enumerate(ranks):
                seen[d] += 1
                top1[d] += rank == 0
                topk[d] += rank < k
        safe = np.maximum(seen, 1)
        return top1 / safe, topk / safe

    # --- JSON ------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        top1, topk = self.accuracy()
        _, trials = self.counts()
        return {
            "format": STATS_FORMAT,
            "num_prompt_tokens": self.num_prompt_tokens,
            "ensemble": self.ensemble,
            "topk": self.topk,
            "model_fingerprint": self.model_fingerprint,
            "checkpoint_sha256": self.checkpoint_sha256,
            "calibration": self.calibration,
            "num_prompts": self.num_prompts,
            "max_new_tokens": self.max_new_tokens,
            "backend": self.backend,
            "device": self.device,
            "variant": self.variant,
            **({"graph_sha256": self.graph_sha256} if self.graph_sha256 else {}),
            # For people; recomputed from `steps` on load, never read back.
            "summary": {"steps": len(self.steps), "steps_per_m": np.bincount(
                            [s[0] for s in self.steps], minlength=self.num_prompt_tokens + 1).tolist(),
                        "top1_per_depth": np.round(top1, 4).tolist(),
                        f"top{self.topk}_per_depth": np.round(topk, 4).tolist(),
                        "conditional_trials_per_depth": trials.sum(0).tolist()},
            "steps": [list(s) for s in self.steps],
        }

    @classmethod
    def from_json(cls, data: dict) -> "AcceptanceStats":
        check_format(data, STATS_FORMAT, StatsError, "a PPD acceptance-statistics file",
                     "write one with `python -m tools trees stats`")
        with fields_of(StatsError, "acceptance statistics JSON is missing or has a bad field"):
            return cls(
                num_prompt_tokens=int(data["num_prompt_tokens"]), ensemble=int(data["ensemble"]),
                topk=int(data["topk"]), steps=tuple(tuple(s) for s in data["steps"]),
                model_fingerprint=str(data["model_fingerprint"]), checkpoint_sha256=str(data["checkpoint_sha256"]),
                calibration=str(data.get("calibration", "")), num_prompts=int(data.get("num_prompts", 0)),
                max_new_tokens=int(data.get("max_new_tokens", 0)), backend=str(data.get("backend", "")),
                device=str(data.get("device", "")), variant=str(data.get("variant", DEFAULT_VARIANT)),
                graph_sha256=data.get("graph_sha256"))

    def save(self, path: str | Path) -> Path:
        """Write the JSON atomically, one step record per line (diffable; a few thousand lines)."""
        return write_json(path, self.to_json())

    def check_identity(self, model_fingerprint: str, checkpoint_sha256: str) -> None:
        """Refuse statistics collected for another model or another prompt-token checkpoint."""
        if self.model_fingerprint != model_fingerprint:
            raise StatsError(f"these acceptance statistics were collected for model {self.model_fingerprint}, not "
                             f"{model_fingerprint}: run `python -m tools trees stats` for this model")
        if self.checkpoint_sha256 != checkpoint_sha256:
            raise StatsError(f"these acceptance statistics were collected with prompt tokens "
                             f"{self.checkpoint_sha256[:16]}, not the checkpoint now loaded "
                             f"({checkpoint_sha256[:16]}): the prompt tokens were retrained, rerun "
                             f"`python -m tools trees stats`")


    def check_variant(self, variant: str, path: str | Path) -> None:
        """Refuse statistics (read from `path`) decoded on another engine variant than the search is for."""
        if self.variant != variant:
            raise StatsError(f"{path} was collected on the {self.variant} engine, not {variant}: collect the {variant} "
                             f"engine's with `python -m tools trees stats --backend onnxruntime --variant {variant}` "
                             f"(--method ppd|ht), or pass --stats of that variant")


def load_stats(path: str | Path) -> AcceptanceStats:
    return AcceptanceStats.from_json(read_json_file(path, StatsError, "acceptance statistics file",
                                                    "collect them with `python -m tools trees stats`"))
