"""The proposer interface: how a method lays out each step's tree and learns from its output.

The loop calls prefill_draft(prompt) -> step -> observe, then per step propose(history) -> step ->
verify -> commit -> observe. What a proposer learns arrives explicitly: the draft it made (its
layout says which prediction rows each candidate carried, its `sources` who made each node), the
step's readout (the verifier's choices and the prediction rows' top-K ids) and the accepted path.
"""

from __future__ import annotations

from typing import Protocol

from runtime.draft import Draft
from runtime.readout import StepReadout


class Proposer(Protocol):
    @property
    def max_draft_tokens(self) -> int:
        """Largest T of any decode-step draft (the cache must hold this many entries beyond the text)."""
        ...

    def prefill_draft(self, prompt_ids: list[int]) -> Draft:
        """The prefill step's draft: the prompt as a chain (candidates), plus any auxiliary nodes."""
        ...

    def propose(self, history: list[int]) -> Draft:
        """This step's draft; `history` is prompt + generated tokens, ending with the root."""
        ...

    def new_sequence(self) -> "Proposer":
        """A proposer for another sequence decoded at the same time (runtime.BatchGenerator): the static
        parts (trees, layouts) shared, the per-sequence state its own. A stateless proposer returns itself."""
        ...

    def observe(self, draft: Draft, readout: StepReadout, path: list[int]) -> None:
        """After each step: `path` = the accepted candidate nodes, root first (for a prefill, the
        whole prompt)."""
        ...
