"""A toy backend with a tiny vocabulary and exactly known next-token distributions, for statistical
tests of the sampler through the real decode loop (runtime.Generator.decode_steps).

The "model": logits of the token after a node depend only on (node's position, node's token), read
from a fixed random table, so the exact distribution of any token sequence is a product of rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from runtime.backends.base import DeviceLayout, ModelInfo, StepOutput
from runtime.draft import Draft, Layout

VOCAB = 5
MAX_CONTEXT = 64


class ToyBackend:
    def __init__(self, seed: int = 0, sharpness: float = 1.5) -> None:
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(MAX_CONTEXT, VOCAB, VOCAB, generator=g, dtype=torch.float64) * sharpness
        self.info = ModelInfo(VOCAB, 0, MAX_CONTEXT, torch.device("cpu"), torch.float64)
        self.length = 0
        self._last: Draft | None = None

    def logits_after(self, position: int, token: int) -> torch.Tensor:
        """[V] logits of the token at position + 1, after `token` at `position`."""
        return self.table[position, token]

    def reset(self) -> None:
        self.length, self._last = 0, None

    def step(self, draft: Draft) -> StepOutput:
        positions = torch.from_numpy(self.length + draft.layout.buffers.depth)
        logits = self.table[positions, torch.from_numpy(draft.tokens)]            # [T, V]
        self._last = draft
        layout = DeviceLayout(positions - self.length, torch.zeros(draft.size, draft.size),
                              torch.from_numpy(draft.layout.predict_rows.copy()))
        return StepOutput(logits, positions, layout)

    def commit(self, nodes: Sequence[int]) -> None:
        self.length += len(nodes)


class FanProposer:
    """Every token as a child of the root, and a chain of two more under child 0: steps accept 1-3
    candidates, so the walk, the bonus and multi-token steps are all exercised."""

    def __init__(self) -> None:
        parents = [-1] + [0] * VOCAB + [1, VOCAB + 1]
        self.layout = Layout.from_parents(parents)

    @property
    def max_draft_tokens(self) -> int:
        return self.layout.size

    def prefill_draft(self, prompt_ids: list[int], batch_size: int = 1) -> Draft:
        return Draft.prefill(prompt_ids)

    def propose(self, history: list[int]) -> Draft:
        tokens = [history[-1], *range(VOCAB), 1, 2]
        return Draft(np.asarray(tokens, dtype=np.int64), self.layout)

    def observe(self, draft, readout, path) -> None:
        pass
