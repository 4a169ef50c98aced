"""Vanilla decoding on the step function: one token per step, the baseline every speedup is against."""

from __future__ import annotations

from runtime.backends.base import StepOutput
from runtime.draft import Draft


class VanillaProposer:
    @property
    def max_draft_tokens(self) -> int:
        return 1

    def prefill_draft(self, prompt_ids: list[int]) -> Draft:
        return Draft.chain(prompt_ids)

    def propose(self, history: list[int]) -> Draft:
        return Draft.chain(history[-1:])

    def observe(self, draft: Draft, output: StepOutput, last_accepted: int) -> None:
        pass
