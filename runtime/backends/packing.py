"""One step's inputs from the drafts of the sequences it serves: B trees packed into one token dimension.

    rows       the drafts' nodes one after another: sequence b's T_b nodes at rows [start_b, start_b + T_b)
    positions  [T] each node's depth + its sequence's committed length
    tree_mask  [T, T] additive: block diagonal, each draft's own ancestor mask; a node never sees
               another sequence's nodes
    past_mask  [T, S] additive over the cache's bound cells [0, S): a row sees exactly its own
               sequence's committed cells (runtime/kv_cache.py)

so each node sees its own sequence's committed entries and its own tree ancestors, nothing else: the
same inputs, row for row, as the sequence's step alone (the graph's rows are computed independently
of each other: export/row_independence.py checks it for the graphs that claim it bitwise).

Why packed and not a batch dimension with padding: a step of mixed methods (a vanilla sequence's 1
node next to a hybrid's 12) costs the sum of the drafts' nodes, not B times the largest; the graph keeps
its one signature (a lone sequence is the B = 1 case, its past mask all visible); and the weight
products, which are most of a small model's step on a CPU, run once over all rows. What it costs: every
row's attention reads all S bound cells (B sequences' worth) and the mask hides the others' (measured
in the README, "Many requests at once").

`min_rows` pads a step (engines whose one-row kernel differs: export/quantize.py min_step_rows) and
`static` pads every step to one (T, S) shape (GPU engines: CUDA graphs and TensorRT see one shape), the
extra cells hidden. Padding rows continue the last draft as a chain (each the child of the row before,
its token repeated one position further: the rule of the build's row check, export/row_independence.py
pad_rows); no real row sees them, and they are never committed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from runtime.draft import Draft
from runtime.kv_cache import KVCache


@dataclass(frozen=True)
class StepPlan:
    """The packed inputs of one step, on the host. `spans[i]` = (slot, first row, rows) of draft i."""

    tokens: np.ndarray           # [T] int64
    positions: np.ndarray        # [T] int64
    tree_mask: np.ndarray | None   # [T, T] additive, float32; None: the single draft's own (cached)
    past_mask: np.ndarray | None   # [T, S] additive; None: every bound cell visible to every row
    past_length: int             # S: the cells bound
    spans: tuple[tuple[int, int, int], ...]

    @property
    def size(self) -> int:
        return len(self.tokens)

    def rows(self, index: int) -> slice:
        _, first, count = self.spans[index]
        return slice(first, first + count)


def plan_step(drafts: Sequence[tuple[int, Draft]], cache: KVCache, lowest: float, min_rows: int = 1,
              static: tuple[int, int] | None = None) -> StepPlan:
    """The packed step of `drafts` [(slot, draft)] over `cache`; masks in float32 with `lowest` for hidden
    entries (the graph dtype's lowest finite value, exact in float32). A lone draft whose sequence is
    alone in the cache keeps its own cached tree mask and an all-visible past (tree_mask, past_mask
    None) unless padding or a static shape asks for the full masks."""
    spans, first = [], 0
    for slot, draft in drafts:
        spans.append((slot, first, draft.size))
        first += draft.size
    real = first
    t = max(real, min_rows) if static is None else static[0]
    s = cache.used if static is None else static[1]
    if real > t or cache.used > s:
        raise ValueError(f"a step of {real} nodes over {cache.used} cells does not fit the static shape {static}")
    tokens = np.zeros(t, dtype=np.int64)
    positions = np.zeros(t, dtype=np.int64)
    for (slot, row, count), (_, draft) in zip(spans, drafts):
        tokens[row: row + count] = draft.tokens
        positions[row: row + count] = draft.layout.buffers.depth + cache.length(slot)
    if real < t:   # the chain of padding rows after the last real one
        tokens[real:] = tokens[real - 1]
        positions[real:] = positions[real - 1] + np.arange(1, t - real + 1)
    lone = len(drafts) == 1 and t == real and static is None and cache.alone(drafts[0][0])
    if lone:
        return StepPlan(tokens, positions, None, None, s, tuple(spans))
    tree_mask = np.full((t, t), lowest, dtype=np.float32)
    past_mask = np.full((t, s), lowest, dtype=np.float32)
    for (slot, row, count), (_, draft) in zip(spans, drafts):
        block = tree_mask[row: row + count, row: row + count]
        block[draft.layout.buffers.ancestor_mask] = 0
        past_mask[row: row + count, cache.cells(slot)] = 0
    for row in range(real, t):   # a padding row sees what the row before sees, and itself
        tree_mask[row, :row] = tree_mask[row - 1, :row]
        tree_mask[row, row] = 0
        past_mask[row] = past_mask[row - 1]
    return StepPlan(tokens, positions, tree_mask, past_mask, s, tuple(spans))
