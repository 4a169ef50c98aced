"""Trees: pure data and search. Imports nothing else of ppdeploy."""

from trees.ppd_tree import PPDStepTree, PPDTreeSet, load_ppd_trees
from trees.tree import Tree, TreeBuffers, TreeError, buffers_from_parents, causal_buffers, load_tree

__all__ = ["PPDStepTree", "PPDTreeSet", "Tree", "TreeBuffers", "TreeError", "buffers_from_parents",
           "causal_buffers", "load_ppd_trees", "load_tree"]
