"""The proposer interface: how a method lays out each step's tree and learns from its output."""

from __future__ import annotations

from typing import Protocol

from runtime.backends.base import StepOutput
from runtime.draft import Draft


class Proposer(Protocol):
    """A decoding method. The loop calls, in order:

    prefill_draft(prompt) -> step -> observe(...) -> then per step: propose(history) -> step ->
    verify -> commit -> observe(...). `history` is prompt + generated tokens, ending with the root.
    """

    @property
    def max_draft_tokens(self) -> int:
        """Largest T of any decode-step draft (the cache must hold this many entries beyond the text)."""
        ...

    def prefill_draft(self, prompt_ids: list[int]) -> Draft:
        """The prefill step's draft: the prompt as a chain (candidates), plus any auxiliary nodes."""
        ...

    def propose(self, history: list[int]) -> Draft:
        ...

    def observe(self, draft: Draft, output: StepOutput, last_accepted: int) -> None:
        """Called after each step with the node the accepted path ended at (for self-drafting methods)."""
        ...
