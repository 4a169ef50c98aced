"""Vanilla decoding on the step function: one token per step, the baseline every speedup is against."""

from __future__ import annotations

import numpy as np

from runtime.draft import Draft, Layout
from runtime.readout import StepReadout

ROOT_ONLY = Layout.chain(1)


class VanillaProposer:
    @property
    def max_draft_tokens(self) -> int:
        return 1

    def prefill_draft(self, prompt_ids: list[int], batch_size: int = 1) -> Draft:
        return Draft.prefill(prompt_ids)

    def propose(self, history: list[int], batch_size: int = 1) -> Draft:
        return Draft(np.array(history[-1:], dtype=np.int64), ROOT_ONLY)

    def new_sequence(self) -> "VanillaProposer":
        return self   # stateless

    def observe(self, draft: Draft, readout: StepReadout, path: list[int]) -> None:
        pass
