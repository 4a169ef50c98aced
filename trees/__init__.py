"""Trees: pure data and search. Imports nothing else of ppdeploy."""

from trees.ppd_tree import (PPDStepTree, PPDTreeSet, batch_tree_sets, check_tree_identity, for_batch, load_ppd_trees,
                            prompt_tokens_sha256)
from trees.tree import Tree, TreeBuffers, TreeError, buffers_from_parents, causal_buffers, load_tree

__all__ = ["PPDStepTree", "PPDTreeSet", "Tree", "TreeBuffers", "TreeError", "batch_tree_sets", "buffers_from_parents",
           "causal_buffers", "check_tree_identity", "for_batch", "load_ppd_trees", "load_tree", "prompt_tokens_sha256"]
