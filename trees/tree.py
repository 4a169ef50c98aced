"""Token trees: the shape of one verification step.

A tree has a root (node 0: the last accepted token, whose KV is not cached yet) and candidate
nodes below it. Node i may only attend to its ancestors and itself; its position is the committed
length plus its depth. Everything here is plain data: numpy arrays built once, never mutated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trees._json import fields_of, read_json_file


class TreeError(ValueError):
    """A tree file or path list that does not describe a valid tree."""


@dataclass(frozen=True)
class TreeBuffers:
    """Buffers derived from a parent list. T = number of nodes, node 0 is the root.

    ancestor_mask: [T, T] bool, True where row node may attend to column node (ancestors + self).
    depth:         [T] int64, 0 for the root.
    parents:       [T] int64, -1 for the root; parents[i] < i (nodes are topologically ordered).
    retrieve:      [P, D+1] int64, one row per leaf: node indices root..leaf, padded with -1.
    """

    ancestor_mask: np.ndarray
    depth: np.ndarray
    parents: np.ndarray
    retrieve: np.ndarray

    @property
    def size(self) -> int:
        return int(self.parents.shape[0])


def readonly(array: np.ndarray) -> np.ndarray:
    """`array`, made read-only in place: tree buffers are built once and never written."""
    array.setflags(write=False)
    return array


def buffers_from_parents(parents: list[int] | np.ndarray) -> TreeBuffers:
    """Build the tree buffers from a topologically ordered parent list (parents[0] == -1)."""
    parents = np.asarray(parents, dtype=np.int64)
    n = parents.shape[0]
    if n == 0 or parents[0] != -1:
        raise TreeError("a tree needs a root: parents[0] must be -1")
    if n > 1 and not np.all((parents[1:] >= 0) & (parents[1:] < np.arange(1, n))):
        raise TreeError("every non-root node needs a parent listed before it (0 <= parents[i] < i)")
    mask = np.zeros((n, n), dtype=bool)
    depth = np.zeros(n, dtype=np.int64)
    mask[0, 0] = True
    for i in range(1, n):
        p = parents[i]
        mask[i] = mask[p]
        mask[i, i] = True
        depth[i] = depth[p] + 1
    is_leaf = np.ones(n, dtype=bool)
    is_leaf[parents[1:]] = False
    leaves = np.flatnonzero(is_leaf)
    retrieve = np.full((len(leaves), int(depth.max()) + 1), -1, dtype=np.int64)
    for row, leaf in enumerate(leaves):
        path = np.flatnonzero(mask[leaf])  # ancestors are in topological order = root..leaf
        retrieve[row, : len(path)] = path
    return TreeBuffers(ancestor_mask=readonly(mask), depth=readonly(depth), parents=readonly(parents),
                       retrieve=readonly(retrieve))


def causal_buffers(length: int) -> TreeBuffers:
    """A chain of `length` nodes (prefill, or a single vanilla step when length == 1)."""
    return buffers_from_parents(np.arange(-1, length - 1))


@dataclass(frozen=True)
class Tree:
    """A static candidate tree from Medusa-style paths of top-k ranks.

    `paths` lists every non-root node as the ranks taken from the root: `[0]` is the top-1
    candidate for the first position, `[0, 1]` the top-2 candidate for the second position
    after it. Every prefix of a path must itself be a path, ranks must be below `topk`.
    Node order: root, then paths sorted by (length, ranks) so parents come first.
    """

    paths: tuple[tuple[int, ...], ...]
    topk: int
    buffers: TreeBuffers = field(init=False, repr=False, compare=False)
    node_rank: np.ndarray = field(init=False, repr=False, compare=False)  # [T] rank, -1 for root

    def __post_init__(self) -> None:
        paths = tuple(sorted((tuple(int(r) for r in p) for p in self.paths), key=lambda p: (len(p), p)))
        if len(set(paths)) != len(paths):
            raise TreeError("duplicate path in tree")
        index = {(): 0}
        parents, ranks = [-1], [-1]
        for path in paths:
            if not path:
                raise TreeError("empty path: the root is implicit, list only candidate nodes")
            if any(r < 0 or r >= self.topk for r in path):
                raise TreeError(f"path {list(path)} has a rank outside 0..{self.topk - 1} (topk={self.topk})")
            if path[:-1] not in index:
                raise TreeError(f"path {list(path)} has no parent path {list(path[:-1])} in the tree")
            index[path] = len(parents)
            parents.append(index[path[:-1]])
            ranks.append(path[-1])
        object.__setattr__(self, "paths", paths)
        object.__setattr__(self, "buffers", buffers_from_parents(parents))
        object.__setattr__(self, "node_rank", readonly(np.asarray(ranks, dtype=np.int64)))

    @property
    def size(self) -> int:
        """Number of nodes including the root."""
        return self.buffers.size

    @property
    def depth(self) -> int:
        return int(self.buffers.depth.max())

    def to_json(self) -> dict:
        return {"topk": self.topk, "paths": [list(p) for p in self.paths]}

    @classmethod
    def from_json(cls, data: dict) -> "Tree":
        with fields_of(TreeError, "tree JSON needs 'paths' (list of rank lists) and 'topk' (int)"):
            return cls(paths=tuple(tuple(p) for p in data["paths"]), topk=int(data["topk"]))


def load_tree(path: str | Path) -> Tree:
    return Tree.from_json(read_json_file(path, TreeError, "tree file"))
