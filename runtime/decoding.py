"""How tokens are chosen: the decoding options of a generation (greedy, or exact sampling), validated
where they enter. Read by the verifiers (runtime/verify.py, runtime/sampling.py), the Generator and the
server's request schema."""

from __future__ import annotations

import dataclasses
import math
import secrets
from dataclasses import dataclass


@dataclass(frozen=True)
class DecodingOptions:
    """How tokens are chosen: greedy when temperature is 0 (the default), sampling otherwise."""

    temperature: float = 0.0   # 0 = greedy
    top_p: float = 1.0         # nucleus mass kept (1 = off)
    top_k: int = 0             # most likely tokens kept (0 = off)
    seed: int | None = None    # sampling: the key of the random stream (None = a random one per call)

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def with_seed(self) -> "DecodingOptions":
        """These options with a concrete seed: sampling without one gets a fresh random seed (report it
        to reproduce the call); greedy needs none."""
        if self.greedy or self.seed is not None:
            return self
        return dataclasses.replace(self, seed=secrets.randbits(63))
