"""The committed KV cache: preallocated cells that sequences fill only by commits of accepted tree
nodes. A backend owns one; nothing outside the backend writes it.

    keys, values   [L, capacity, Hkv, D]   cell c of layer l holds one committed token's key / value
    sequences      slot -> the cells holding its positions 0, 1, 2, ... in order

Every step binds the cells [0, used) of each layer (`past()`: contiguous views, no copy) and a past
mask says which of them each row of the step may see: its own sequence's cells and nothing else
(runtime/backends/packing.py). Commits take the lowest free cells, so one sequence alone fills
0, 1, 2, ... exactly as a plain per-sequence cache would (its past mask is all visible), and
sequences that share the cache interleave their cells. Opening, committing and closing a sequence
never moves another sequence's cells.

Per cell the absolute position of its token is kept (`positions`), for masks that depend on it
(sliding-window layers).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


class ContextOverflowError(ValueError):
    """More tokens than the cache was allocated for."""


def contiguous_runs(nodes: Sequence[int]) -> list[tuple[int, int]]:
    """[(first node, count)] of consecutive node indices, in order: a prefill or a chain is one run,
    a tree path a few. Copying runs by slice needs no index tensor on the device (no upload)."""
    runs: list[tuple[int, int]] = []
    for node in nodes:
        node = int(node)
        if runs and runs[-1][0] + runs[-1][1] == node:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((node, 1))
    return runs


class KVCache:
    """keys, values: [L, capacity, Hkv, D]. `max_context` bounds one sequence (prompt + new tokens +
    a draft); `capacity` the cells of all sequences together (default: one sequence's worth)."""

    def __init__(self, num_layers: int, max_context: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 capacity: int | None = None) -> None:
        capacity = max_context if capacity is None else capacity
        if capacity < max_context:
            raise ValueError(f"a cache of {capacity} cells cannot hold one sequence of max_context {max_context}")
        shape = (num_layers, capacity, num_kv_heads, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.max_context = max_context
        self.capacity = capacity
        self.positions = np.full(capacity, -1, dtype=np.int64)   # [capacity] position of each cell's token; -1 free
        self._cells: dict[int, list[int]] = {}                   # slot -> cells in position order
        self._next_slot = 0
        self.used = 0                                            # cells [0, used) are bound by every step

    # --- sequences ---------------------------------------------------------------------------------
    def open(self) -> int:
        """A new, empty sequence; its slot number."""
        slot = self._next_slot
        self._next_slot += 1
        self._cells[slot] = []
        return slot

    def close(self, slot: int) -> None:
        """Forget a sequence: its cells are free for others at once (no other cell moves)."""
        cells = self._cells.pop(self._check(slot))
        self.positions[cells] = -1
        taken = np.flatnonzero(self.positions[: self.used] >= 0)
        self.used = int(taken[-1]) + 1 if taken.size else 0

    def reset(self) -> None:
        """Forget every sequence."""
        self._cells.clear()
        self.positions[:] = -1
        self.used = 0

    @property
    def slots(self) -> tuple[int, ...]:
        return tuple(self._cells)

    def length(self, slot: int) -> int:
        return len(self._cells[self._check(slot)])

    def cells(self, slot: int) -> np.ndarray:
        """[length] the cells of a sequence, in position order."""
        return np.asarray(self._cells[self._check(slot)], dtype=np.int64)

    def alone(self, slot: int) -> bool:
        """True when `slot` is the only sequence with cells and they are 0..length-1: every bound cell is
        its own, so its rows see all of them (an all-visible past mask)."""
        cells = self._cells[self._check(slot)]
        return self.used == len(cells) and (not cells or cells[-1] == len(cells) - 1)

    def _check(self, slot: int) -> int:
        if slot not in self._cells:
            raise KeyError(f"sequence {slot} is not open in this cache (open: {sorted(self._cells)})")
        return slot

    # --- the step's view and the commit ----------------------------------------------------------------
    def past(self, cells: int | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-layer [cells, Hkv, D] views of the bound cells (contiguous: layer-major layout); default the
        cells in use, `capacity` for a static step."""
        s = self.used if cells is None else cells
        return [k[:s] for k in self.keys], [v[:s] for v in self.values]

    def check_room(self, slot: int, count: int) -> None:
        """Refuse `count` more tokens for `slot` beyond its max_context or beyond the free cells."""
        length = self.length(slot)
        if length + count > self.max_context:
            raise ContextOverflowError(
                f"KV cache full: {length} + {count} entries > max_context {self.max_context}; "
                "load the model with a larger max_context")
        free = self.capacity - sum(len(c) for c in self._cells.values())
        if count > free:
            raise ContextOverflowError(f"KV cache full: {count} entries asked for, {free} of {self.capacity} cells "
                                       "free for all sequences; admit fewer sequences at once or load with a "
                                       "larger max_batch")

    def commit(self, slot: int, new_keys: torch.Tensor, new_values: torch.Tensor, rows: Sequence[int]) -> None:
        """Append the step rows `rows` (in order) of a step's new_keys/new_values [L, T, Hkv, D] to
        sequence `slot`, in the lowest free cells."""
        self.check_room(slot, len(rows))
        cells = self._cells[slot]
        start = len(cells)
        targets = np.flatnonzero(self.positions < 0)[: len(rows)]
        if targets.size and targets[-1] == targets[0] + len(targets) - 1:   # one block of cells: copy by runs
            end = int(targets[0])
            for first, count in contiguous_runs(rows):
                self.keys[:, end: end + count] = new_keys[:, first: first + count]
                self.values[:, end: end + count] = new_values[:, first: first + count]
                end += count
        elif targets.size:
            index = torch.as_tensor(targets, device=self.keys.device)
            source = torch.as_tensor(np.asarray(rows, dtype=np.int64), device=new_keys.device)
            self.keys[:, index] = new_keys[:, source]
            self.values[:, index] = new_values[:, source]
        self.positions[targets] = np.arange(start, start + len(rows))
        cells.extend(int(c) for c in targets)
        if targets.size:
            self.used = max(self.used, int(targets[-1]) + 1)
