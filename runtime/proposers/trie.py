"""A candidate trie: token paths from one or more sources merged under the root, shared prefixes
once, within a node budget. It is the tree of a step's candidate nodes (n-gram continuations, and
any other source a proposer merges in)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from runtime.draft import Draft, Layout


class CandidateTrie:
    def __init__(self, root: int, max_nodes: int) -> None:
        if max_nodes < 1:
            raise ValueError(f"a candidate trie needs max_nodes >= 1, got {max_nodes}")
        self.max_nodes = max_nodes
        self.tokens: list[int] = [int(root)]
        self.parents: list[int] = [-1]
        self.sources: list[str] = ["root"]
        self._index: dict[tuple[int, int], int] = {}   # (parent node, token) -> node

    @property
    def full(self) -> bool:
        return len(self.tokens) >= self.max_nodes

    def add(self, path: Iterable[int], source: str, below: int = 0) -> list[int]:
        """Merge a token path below node `below` (nodes already present are shared, keeping the source
        that made them first); stops at the budget. Returns the path's nodes that are in the trie."""
        node, nodes = below, []
        for token in path:
            token = int(token)
            child = self._index.get((node, token))
            if child is None:
                if self.full:
                    break
                child = len(self.tokens)
                self._index[(node, token)] = child
                self.tokens.append(token)
                self.parents.append(node)
                self.sources.append(source)
            node = child
            nodes.append(node)
        return nodes

    def __len__(self) -> int:
        return len(self.tokens)

    def layout(self) -> Layout:
        return Layout.from_parents(self.parents)

    def draft(self, layout: Layout | None = None) -> Draft:
        """The trie as a draft (every node a candidate); pass `layout` to reuse a cached one."""
        return Draft(np.asarray(self.tokens, dtype=np.int64), layout or self.layout(), tuple(self.sources))
