"""The one download of a step: what verification and the proposer need, reduced on the device.

    chosen       [C - first_verified]  the verifier's token after each verified candidate node
    predictions  [G, K]                top-K ids of each prediction row (the k auxiliary nodes of a
                                       row averaged first: PPD's ensemble prompt tokens)

Both are computed where the logits are and copied back in a single transfer, which also
synchronises the device (so a step timed up to here is timed right on CUDA).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from runtime.backends.base import StepOutput
from runtime.draft import Draft
from runtime.verify import Verifier


@dataclass(frozen=True)
class StepReadout:
    chosen: np.ndarray        # [C - first] int64
    predictions: np.ndarray   # [G, K] int64
    first: int                # node index of chosen[0]

    def chosen_after(self, node: int) -> int:
        return int(self.chosen[node - self.first])

    def predictions_of(self, draft: Draft, node: int) -> np.ndarray:
        """[m, K] the prediction rows that candidate `node` carried (m = 0 when none)."""
        start, stop = draft.layout.groups[node]
        return self.predictions[start:stop]


def read_step(output: StepOutput, draft: Draft, verifier: Verifier) -> StepReadout:
    layout = draft.layout
    first, c = layout.first_verified, layout.num_candidates
    chosen = verifier.choose(output.logits[first:c], output.positions[first:c])   # [C - first]
    parts = [chosen.to(torch.int64)]
    g, k = layout.predict_rows.shape
    top = layout.predict_topk
    if g:
        rows = output.logits.index_select(0, output.layout.predict_rows.reshape(-1))  # [G*k, V]
        rows = rows if k == 1 else rows.view(g, k, -1).mean(dim=1)
        parts.append(torch.topk(rows, top, dim=-1).indices.reshape(-1))
    host = (parts[0] if len(parts) == 1 else torch.cat(parts)).cpu().numpy()
    n = c - first
    return StepReadout(chosen=host[:n], predictions=host[n:].reshape(g, top if g else 0), first=first)


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to `threads` inside the block and restored after it (None:
    unchanged); see ModelInfo.readout_threads."""
    before = torch.get_num_threads()
    if threads is None or threads == before:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
