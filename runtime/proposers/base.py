"""The proposer interface: how a method lays out each step's tree and learns from its output.

The loop calls prefill_draft(prompt) -> step -> observe, then per step propose(history) -> step ->
verify -> commit -> observe. What a proposer learns arrives explicitly: the draft it made (its
layout says which prediction rows each candidate carried, its `sources` who made each node), the
step's readout (the verifier's choices and the prediction rows' top-K ids) and the accepted path.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from runtime.draft import Draft
from runtime.readout import StepReadout


class Proposer(Protocol):
    @property
    def max_draft_tokens(self) -> int:
        """Largest T of any decode-step draft (the cache must hold this many entries beyond the text)."""
        ...

    def prefill_draft(self, prompt_ids: list[int], batch_size: int = 1) -> Draft:
        """The prefill step's draft: the prompt as a chain (candidates), plus any auxiliary nodes;
        `batch_size`: the sequences this step decodes (a tree method attaches nothing where it takes no
        tree for that many, as propose does)."""
        ...

    def propose(self, history: list[int], batch_size: int = 1) -> Draft:
        """This step's draft; `history` is prompt + generated tokens, ending with the root; `batch_size`:
        the sequences this step decodes (runtime.BatchGenerator), by which a tree method whose tree file
        was searched for batches picks its trees (runtime/proposers/ppd.py)."""
        ...

    def new_sequence(self) -> "Proposer":
        """A proposer for another sequence decoded at the same time (runtime.BatchGenerator): the static
        parts (trees, layouts) shared, the per-sequence state its own. A stateless proposer returns itself."""
        ...

    def observe(self, draft: Draft, readout: StepReadout, path: list[int]) -> None:
        """After each step: `path` = the accepted candidate nodes, root first (for a prefill, the
        whole prompt)."""
        ...


def prefill_drafts(prompt_ids: list[int], proposer: Proposer, limit: int | None = None) -> Iterator[tuple[Draft, bool]]:
    """The prefill of `prompt_ids` as drafts of at most `limit` nodes each (None: one draft): chains of
    its first tokens, whose entries are all committed (only their last node's choice is read, and not
    used), then the proposer's
    prefill draft of the rest (the last, True), which reads the first new token and whatever the method
    attaches to the prompt's last node (PPD's prompt tokens)."""
    if limit is None:
        yield proposer.prefill_draft(prompt_ids), True
        return
    attached = proposer.prefill_draft(prompt_ids[-1:]).size - 1      # nodes the method adds after the last
    tail = limit - attached
    if tail < 1:
        raise ValueError(f"steps of at most {limit} nodes cannot hold a prefill's last token and the {attached} "
                         "nodes this method attaches to it: use an engine with larger steps")
    start = max(0, len(prompt_ids) - tail)
    for first in range(0, start, limit):
        yield Draft.prefill(prompt_ids[first: min(first + limit, start)]), False
    yield proposer.prefill_draft(prompt_ids[start:]), True
