"""Trees: pure data and search. Imports nothing else of ppdeploy."""

from trees.tree import Tree, TreeBuffers, TreeError, buffers_from_parents, causal_buffers, load_tree

__all__ = ["Tree", "TreeBuffers", "TreeError", "buffers_from_parents", "causal_buffers", "load_tree"]
