"""A draft: the tokens of one step laid out as a tree, plus which nodes are verifiable candidates."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from trees import TreeBuffers, buffers_from_parents


@dataclass(frozen=True)
class Draft:
    """Nodes [0, num_candidates) are the root and its candidate continuations; nodes after them
    are auxiliary inputs of the method (PPD prompt tokens) that are never accepted or committed.

    tokens:  [T] int64 token ids (node 0 = root = last accepted token, not yet in the cache)
    buffers: tree buffers over all T nodes (ancestor mask, depths, parents)
    """

    tokens: np.ndarray
    buffers: TreeBuffers
    num_candidates: int
    # children[node] maps a child's token to the child's node index, over candidate nodes only.
    children: list[dict[int, int]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.tokens.shape != (self.buffers.size,):
            raise ValueError(f"draft has {self.tokens.shape} tokens for a tree of {self.buffers.size} nodes")
        children: list[dict[int, int]] = [{} for _ in range(self.num_candidates)]
        parents = self.buffers.parents
        for node in range(1, self.num_candidates):
            children[parents[node]].setdefault(int(self.tokens[node]), node)
        object.__setattr__(self, "children", children)

    @property
    def size(self) -> int:
        return self.buffers.size

    @classmethod
    def from_parents(cls, tokens: list[int] | np.ndarray, parents: list[int] | np.ndarray,
                     num_candidates: int | None = None) -> "Draft":
        tokens = np.asarray(tokens, dtype=np.int64)
        return cls(tokens, buffers_from_parents(parents), len(tokens) if num_candidates is None else num_candidates)

    @classmethod
    def chain(cls, tokens: list[int] | np.ndarray) -> "Draft":
        """Every node the child of the one before (prefill, or a root-only vanilla step)."""
        tokens = np.asarray(tokens, dtype=np.int64)
        return cls.from_parents(tokens, np.arange(-1, len(tokens) - 1))
