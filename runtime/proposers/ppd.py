"""PPD inference: the dynamic sparse tree. One forward pass verifies this step's candidates and,
through the prompt tokens each candidate carries, predicts the next step's candidates.

Each per-m tree of the tree set becomes one static Layout (built once): candidates first, then the
prompt-token nodes of every candidate that carries some, with the prediction rows of each
candidate recorded in the layout. After a step, the accepted node's rows of the readout ([m, K]
top-K ids, row i guessing the token i + 1 places after the next root) are the next step's guesses,
and m picks the next tree.

A tree file searched for batches (its "batch" record, trees/ppd_tree.py batch_tree_sets) holds a tree set
per batch size B: in a step of B sequences each takes the set searched for the smallest B' >= B (trees
sized for at least as many sequences, trees/ppd_tree.py for_batch), smaller trees as B grows, and none (a
vanilla step: the root alone) where the search found B' sequences fastest without.
The guesses carry over between sets (every set has a tree for every m).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

from export.ppd import PPDConfig, attach_prompt_tokens
from runtime.draft import NO_GROUP, Draft, Layout
from runtime.readout import StepReadout
from trees import PPDStepTree, PPDTreeSet, batch_tree_sets, buffers_from_parents, for_batch


@dataclass(frozen=True)
class StepTemplate:
    """One per-m step: its layout, the prompt-id template (candidates zero) and, per candidate node
    1..C-1, which prediction row (depth - 1) and rank its token is read from."""

    layout: Layout
    tokens: np.ndarray      # [T]
    cand_depth: np.ndarray  # [C-1]
    cand_rank: np.ndarray   # [C-1]


def attach_layout(parents: list[int], tokens: list[int], counts: list[int], num_candidates: int,
                  config: PPDConfig, vocab_size: int, topk: int, first_verified: int = 0) -> tuple[Layout, np.ndarray]:
    """Attach counts[c] prompt tokens (x k ensemble nodes) after each candidate c; the layout records
    each candidate's prediction rows ([count, k] node indices, i-major as attach_prompt_tokens lays them)."""
    groups, rows = [], []
    for node, count in enumerate(counts):
        if not count:
            groups.append(NO_GROUP)
            continue
        start = len(parents)
        parents, tokens = attach_prompt_tokens(parents, tokens, node, PPDConfig(count, config.ensemble), vocab_size)
        groups.append((len(rows), len(rows) + count))
        rows.extend(np.arange(start, len(parents)).reshape(count, config.ensemble))
    predict_rows = np.asarray(rows, dtype=np.int64).reshape(-1, config.ensemble)
    layout = Layout(buffers_from_parents(parents), num_candidates, predict_rows, tuple(groups),
                    predict_topk=topk if rows else 0, first_verified=first_verified)
    return layout, np.asarray(tokens, dtype=np.int64)


def step_template(step: PPDStepTree, config: PPDConfig, vocab_size: int, topk: int) -> StepTemplate:
    tree = step.tree
    layout, tokens = attach_layout(tree.buffers.parents.tolist(), [0] * tree.size, list(step.prompt_counts),
                                   tree.size, config, vocab_size, topk)
    return StepTemplate(layout, tokens, tree.buffers.depth[1:].copy(), tree.node_rank[1:].copy())


class PPDProposer:
    def __init__(self, config: PPDConfig, trees: PPDTreeSet, vocab_size: int) -> None:
        if trees.num_prompt_tokens != config.num_prompt_tokens:
            raise ValueError(f"tree file is for N={trees.num_prompt_tokens} prompt tokens, the checkpoint has "
                             f"N={config.num_prompt_tokens}: use a tree built for this checkpoint")
        self.config = config
        self.trees = trees
        self.vocab_size = vocab_size
        sets = batch_tree_sets(trees)
        # Every step reads the same top-K of its prediction rows, so guesses fit the trees of any B
        self.topk = max(tree_set.topk for tree_set in sets.values() if tree_set is not None)
        # {B: per-m templates of the tree set for B sequences per step, or None: the root alone}
        self.batch_templates = {b: None if tree_set is None else
                                [step_template(step, config, vocab_size, self.topk) for step in tree_set.trees]
                                for b, tree_set in sets.items()}
        self.templates = self.batch_templates[1]
        self.root_only = attach_layout([-1], [0], [0], 1, config, vocab_size, self.topk)[0]
        # [m, topk] the guesses for the next step: what the last accepted node's prompt tokens predicted.
        self.guesses = np.zeros((0, self.topk), dtype=np.int64)

    @property
    def max_draft_tokens(self) -> int:
        return max(t.layout.size for templates in self.batch_templates.values() for t in templates or ())

    def prefill_draft(self, prompt_ids: list[int], batch_size: int = 1) -> Draft:
        """The prompt as a chain, with all N prompt tokens attached after its last node; none where steps
        of `batch_size` sequences take no tree (nothing would read their guesses: the step is vanilla's)."""
        n = len(prompt_ids)
        attached = 0 if for_batch(self.batch_templates, batch_size) is None else self.config.num_prompt_tokens
        counts = [0] * (n - 1) + [attached]
        layout, tokens = attach_layout(list(range(-1, n - 1)), list(prompt_ids), counts, n, self.config,
                                       self.vocab_size, self.topk, first_verified=n - 1)
        return Draft(tokens, layout)

    def propose(self, history: list[int], batch_size: int = 1) -> Draft:
        templates = for_batch(self.batch_templates, batch_size)
        if templates is None:   # no tree at this batch size: the root alone, no guesses made
            return Draft(np.asarray(history[-1:], dtype=np.int64), self.root_only)
        template = templates[len(self.guesses)]
        tokens = template.tokens.copy()
        tokens[0] = history[-1]
        tokens[1: template.layout.num_candidates] = self.guesses[template.cand_depth - 1, template.cand_rank]
        return Draft(tokens, template.layout)

    def new_sequence(self) -> "PPDProposer":
        fresh = copy.copy(self)   # templates and trees shared (never mutated); the guesses its own
        fresh.guesses = np.zeros((0, self.topk), dtype=np.int64)
        return fresh

    def observe(self, draft: Draft, readout: StepReadout, path: list[int]) -> None:
        self.guesses = readout.predictions_of(draft, path[-1])
