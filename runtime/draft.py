"""A draft: one step's tokens laid out as a tree. Its static part (the Layout) is shared by every
step of the same tree shape, so a backend builds the device tensors of a layout once (depths,
additive mask, prediction rows) and per step only the token ids change.

    Layout   the tree shape: parents/depths/ancestor mask over all T nodes, how many of them are
             verifiable candidates (C), and which auxiliary nodes' logits predict what for whom
             (PPD prompt tokens, HT pseudo slots): `predict_rows` [G, k] node indices whose logits are
             averaged into prediction row g, `groups[c]` = the rows (start, stop) of candidate c, in
             depth order, and `predict_topk` = ids kept per row. `first_verified`: the first
             candidate whose choice is read back (0; the last prompt node for a prefill).
    Draft    tokens [T] + a Layout + who proposed each candidate node (`sources`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from trees import TreeBuffers, buffers_from_parents

NO_GROUP = (0, 0)


@dataclass(frozen=True, eq=False)
class Layout:
    buffers: TreeBuffers
    num_candidates: int
    predict_rows: np.ndarray                  # [G, k] int64 node indices (G may be 0)
    groups: tuple[tuple[int, int], ...]       # [C] (start, stop) rows of predict_rows per candidate
    predict_topk: int = 0                     # K ids kept per prediction row (0 when G == 0)
    first_verified: int = 0
    key: tuple = field(init=False, repr=False)

    def __post_init__(self) -> None:
        t, c = self.buffers.size, self.num_candidates
        if not 1 <= c <= t:
            raise ValueError(f"a layout of {t} nodes needs 1..{t} candidate nodes, got {c}")
        if len(self.groups) != c:
            raise ValueError(f"groups has {len(self.groups)} entries for {c} candidate nodes")
        rows = np.array(self.predict_rows, dtype=np.int64)   # own, frozen copy
        object.__setattr__(self, "predict_rows", rows)
        if rows.ndim != 2 or (rows.size and not ((rows >= c) & (rows < t)).all()):
            raise ValueError("prediction rows must be [G, k] indices of auxiliary nodes (C..T-1)")
        if rows.shape[0] and self.predict_topk < 1:
            raise ValueError("a layout with prediction rows needs predict_topk >= 1")
        if not 0 <= self.first_verified < c:
            raise ValueError(f"first_verified {self.first_verified} is not a candidate node (0..{c - 1})")
        rows.setflags(write=False)
        key = (c, self.first_verified, self.predict_topk, self.buffers.parents.tobytes(), rows.shape, rows.tobytes())
        object.__setattr__(self, "key", key)

    @property
    def size(self) -> int:
        return self.buffers.size

    @classmethod
    def from_parents(cls, parents: Sequence[int] | np.ndarray, num_candidates: int | None = None,
                     first_verified: int = 0) -> "Layout":
        """A layout without prediction rows (vanilla, n-gram, prefill of methods without slots)."""
        buffers = buffers_from_parents(parents)
        c = buffers.size if num_candidates is None else num_candidates
        return cls(buffers, c, np.zeros((0, 1), dtype=np.int64), (NO_GROUP,) * c, first_verified=first_verified)

    @classmethod
    def chain(cls, length: int, first_verified: int = 0) -> "Layout":
        return cls.from_parents(np.arange(-1, length - 1), first_verified=first_verified)


@dataclass(frozen=True)
class Draft:
    """Nodes [0, C) are the root (last accepted token, not yet in the cache) and its candidate
    continuations; nodes [C, T) are auxiliary inputs of the method that are never accepted or
    committed. tokens: [T] int64."""

    tokens: np.ndarray
    layout: Layout
    sources: tuple[str, ...] | None = None    # [C] which proposer made each candidate node (None: one source)
    # children[node] maps a child's token to the child's node index, over candidate nodes only.
    children: list[dict[int, int]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.tokens.shape != (self.layout.size,):
            raise ValueError(f"draft has {self.tokens.shape} tokens for a tree of {self.layout.size} nodes")
        if self.sources is not None and len(self.sources) != self.num_candidates:
            raise ValueError(f"sources names {len(self.sources)} nodes for {self.num_candidates} candidates")
        children: list[dict[int, int]] = [{} for _ in range(self.num_candidates)]
        parents = self.layout.buffers.parents
        for node in range(1, self.num_candidates):
            children[parents[node]].setdefault(int(self.tokens[node]), node)
        object.__setattr__(self, "children", children)

    @property
    def size(self) -> int:
        return self.layout.size

    @property
    def num_candidates(self) -> int:
        return self.layout.num_candidates

    @property
    def buffers(self) -> TreeBuffers:
        return self.layout.buffers

    @classmethod
    def from_parents(cls, tokens: Sequence[int] | np.ndarray, parents: Sequence[int] | np.ndarray,
                     num_candidates: int | None = None) -> "Draft":
        tokens = np.asarray(tokens, dtype=np.int64)
        return cls(tokens, Layout.from_parents(parents, num_candidates))

    @classmethod
    def chain(cls, tokens: Sequence[int] | np.ndarray) -> "Draft":
        """Every node the child of the one before (a root-only vanilla step, or a chain)."""
        tokens = np.asarray(tokens, dtype=np.int64)
        return cls(tokens, Layout.chain(len(tokens)))

    @classmethod
    def prefill(cls, prompt_ids: Sequence[int]) -> "Draft":
        """The prompt as a chain; only the last node's choice (the first new token) is read back."""
        tokens = np.asarray(prompt_ids, dtype=np.int64)
        return cls(tokens, Layout.chain(len(tokens), first_verified=len(tokens) - 1))
