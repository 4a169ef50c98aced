"""What one run of one prompt gives the bench, whoever ran it (our generators, or a peer in its own
process: tools/peers/process.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class PromptRun:
    token_ids: list[int]
    steps: int | None                  # forward passes, prefill included; None where the peer hides them
    seconds: float
    accepted_tokens: int | None = None  # tokens the steps produced, before truncation (our generators only)
    first_token_seconds: float | None = None  # until the first new token (the prefill); None where a peer hides it


Runner = Callable[[list[int]], PromptRun]


class PeerFailed(RuntimeError):
    """A peer whose process died (a crash in its native code): its runs end, the bench goes on."""
