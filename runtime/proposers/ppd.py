"""PPD inference: the dynamic sparse tree. One forward pass verifies this step's candidates and,
through the prompt tokens each candidate carries, predicts the next step's candidates."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from export.ppd import PPDConfig, attach_prompt_tokens, average_ensemble_logits
from runtime.backends.base import StepOutput
from runtime.draft import Draft
from trees import PPDStepTree, PPDTreeSet, buffers_from_parents


@dataclass(frozen=True)
class StepLayout:
    """The static layout of one PPD step tree (built once per m): candidates first, then the
    prompt-token nodes of every candidate that carries some.

    template:      [T] token ids with prompt ids filled in and candidates zero
    cand_depth:    [C-1] depth (1..m) of candidate nodes 1..C-1 -> which prediction row
    cand_rank:     [C-1] top-k rank of candidate nodes 1..C-1
    prompt_nodes:  per candidate node, the indices of its prompt nodes (attach order) or empty
    """

    draft_template: Draft
    cand_depth: np.ndarray
    cand_rank: np.ndarray
    prompt_nodes: tuple[np.ndarray, ...]


def build_layout(step: PPDStepTree, config: PPDConfig, vocab_size: int) -> StepLayout:
    tree = step.tree
    parents, tokens = tree.buffers.parents.tolist(), [0] * tree.size
    prompt_nodes = []
    for node, count in enumerate(step.prompt_counts):
        start = len(parents)
        if count:
            parents, tokens = attach_prompt_tokens(parents, tokens, node, PPDConfig(count, config.ensemble), vocab_size)
        prompt_nodes.append(np.arange(start, len(parents)))
    template = Draft(np.asarray(tokens, dtype=np.int64), buffers_from_parents(parents), tree.size)
    return StepLayout(template, tree.buffers.depth[1:].copy(), tree.node_rank[1:].copy(), tuple(prompt_nodes))


class PPDProposer:
    def __init__(self, config: PPDConfig, trees: PPDTreeSet, vocab_size: int) -> None:
        if trees.num_prompt_tokens != config.num_prompt_tokens:
            raise ValueError(f"tree file is for N={trees.num_prompt_tokens} prompt tokens, the checkpoint has "
                             f"N={config.num_prompt_tokens}: use a tree built for this checkpoint")
        self.config = config
        self.trees = trees
        self.vocab_size = vocab_size
        self.layouts = [build_layout(step, config, vocab_size) for step in trees.trees]
        self._top_ids = np.zeros((0, trees.topk), dtype=np.int64)  # [m, topk] predictions for the next step
        self._last_layout: StepLayout | None = None

    @property
    def predictions(self) -> np.ndarray:
        """[m, topk] read-only: the top-k token ids the last step's accepted node predicted for the
        next step; row i guesses the token i + 1 places after the next root (m = the prompt tokens
        that node carried). Read by acceptance statistics (runtime/acceptance.py)."""
        view = self._top_ids.view()
        view.setflags(write=False)
        return view

    @property
    def max_draft_tokens(self) -> int:
        return max(layout.draft_template.size for layout in self.layouts)

    def prefill_draft(self, prompt_ids: list[int]) -> Draft:
        n = len(prompt_ids)
        parents, tokens = attach_prompt_tokens(list(range(-1, n - 1)), list(prompt_ids), n - 1, self.config,
                                               self.vocab_size)
        self._last_layout = None
        return Draft(np.asarray(tokens, dtype=np.int64), buffers_from_parents(parents), n)

    def propose(self, history: list[int]) -> Draft:
        layout = self.layouts[len(self._top_ids)]
        tokens = layout.draft_template.tokens.copy()
        tokens[0] = history[-1]
        tokens[1: layout.draft_template.num_candidates] = self._top_ids[layout.cand_depth - 1, layout.cand_rank]
        self._last_layout = layout
        return Draft(tokens, layout.draft_template.buffers, layout.draft_template.num_candidates)

    def observe(self, draft: Draft, output: StepOutput, last_accepted: int) -> None:
        if self._last_layout is None:  # prefill: the prompt tokens follow the prompt
            nodes = np.arange(draft.num_candidates, draft.size)
        else:
            nodes = self._last_layout.prompt_nodes[last_accepted]
        count = len(nodes) // self.config.ensemble
        if count == 0:
            self._top_ids = np.zeros((0, self.trees.topk), dtype=np.int64)
            return
        index = torch.as_tensor(nodes, device=output.logits.device)
        logits = average_ensemble_logits(output.logits.index_select(0, index),
                                         PPDConfig(count, self.config.ensemble))   # [count, V]
        self._top_ids = torch.topk(logits, self.trees.topk, dim=-1).indices.cpu().numpy()
