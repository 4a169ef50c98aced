"""PPD's dynamic sparse trees: one candidate tree per number of available prompt predictions.

After a step, the accepted node's prompt tokens give m predictions (m = how many it carried), so
the next step uses the tree for m: its candidates reach depth <= m, and each node carries its own
prompt tokens (0..N) that produce the predictions for the step after. JSON form:

    {"num_prompt_tokens": 3, "topk": 4,
     "trees": {"3": [{"path": [], "prompt_tokens": 3}, {"path": [0], "prompt_tokens": 3}, ...],
               "2": [...], "1": [...], "0": [{"path": [], "prompt_tokens": 3}]}}

Any other top-level keys are kept as `PPDTreeSet.metadata` and written back: searched trees
(`python -m tools trees build`) record there the model fingerprint and prompt-token hash they were built
for (checked by `check_tree_identity`), the device, backend, budget and predicted figures.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trees._json import fields_of, read_json_file
from trees.devices import DEFAULT_VARIANT
from trees.tree import Tree, TreeError

_TREE_KEYS = ("num_prompt_tokens", "topk", "trees")


@dataclass(frozen=True)
class PPDStepTree:
    """A candidate tree plus the number of prompt tokens each node (Tree node order) carries."""

    tree: Tree
    prompt_counts: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        """T of the step (times k virtual tokens per prompt token is applied by the caller)."""
        return self.tree.size + sum(self.prompt_counts)

    def tokens_with_ensemble(self, ensemble: int) -> int:
        return self.tree.size + ensemble * sum(self.prompt_counts)


@dataclass(frozen=True)
class PPDTreeSet:
    """The per-m trees of PPD (see the module doc for the JSON form)."""

    num_prompt_tokens: int
    topk: int
    trees: tuple[PPDStepTree, ...]  # index m = number of available predictions, 0..N
    # Extra top-level JSON keys (provenance, predicted figures); not part of the tree's identity.
    metadata: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        n = self.num_prompt_tokens
        if len(self.trees) != n + 1:
            raise TreeError(f"a PPD tree set for N={n} needs trees for 0..{n} available predictions, got {len(self.trees)}")
        for m, step in enumerate(self.trees):
            if step.tree.depth > m:
                raise TreeError(f"tree for {m} predictions reaches depth {step.tree.depth} > {m}")
            if len(step.prompt_counts) != step.tree.size:
                raise TreeError(f"tree for {m} predictions: {len(step.prompt_counts)} prompt counts for {step.tree.size} nodes")
            if any(not 0 <= c <= n for c in step.prompt_counts):
                raise TreeError(f"tree for {m} predictions: prompt token counts must be in 0..{n}")
            if step.prompt_counts[0] == 0 and m == 0:
                raise TreeError("the tree for 0 predictions must give its root prompt tokens, or PPD never restarts")

    def max_tokens(self, ensemble: int) -> int:
        return max(step.tokens_with_ensemble(ensemble) for step in self.trees)

    def to_json(self) -> dict:
        return {
            **self.metadata,
            "num_prompt_tokens": self.num_prompt_tokens,
            "topk": self.topk,
            "trees": {
                str(m): [{"path": [], "prompt_tokens": step.prompt_counts[0]}]
                + [{"path": list(p), "prompt_tokens": c} for p, c in zip(step.tree.paths, step.prompt_counts[1:])]
                for m, step in enumerate(self.trees)
            },
        }

    @classmethod
    def from_json(cls, data: dict) -> "PPDTreeSet":
        with fields_of(TreeError, "PPD tree JSON needs num_prompt_tokens, topk and trees['0'..'N'] node lists"):
            n, topk = int(data["num_prompt_tokens"]), int(data["topk"])
            steps = []
            for m in range(n + 1):
                nodes = data["trees"][str(m)]
                counts = {tuple(node["path"]): int(node["prompt_tokens"]) for node in nodes}
                if () not in counts:
                    raise TreeError(f"tree for {m} predictions has no root entry (path [])")
                tree = Tree(paths=tuple(p for p in counts if p), topk=topk)
                steps.append(PPDStepTree(tree, (counts[()],) + tuple(counts[p] for p in tree.paths)))
        metadata = {key: value for key, value in data.items() if key not in _TREE_KEYS}
        return cls(n, topk, tuple(steps), metadata)


def load_ppd_trees(path: str | Path) -> PPDTreeSet:
    return PPDTreeSet.from_json(read_json_file(path, TreeError, "PPD tree file"))


def prompt_tokens_sha256(embeddings: Any) -> str:
    """The identity of a prompt-token checkpoint: sha256 of its [N*k, H] embeddings as contiguous
    float32 (an array, or a CPU torch tensor); equal to export.onnx_export.tensor_sha256, which the
    ONNX manifest records, so trees, statistics and engines name the same rows the same way."""
    array = np.ascontiguousarray(np.asarray(embeddings, dtype=np.float32))
    return hashlib.sha256(array.tobytes()).hexdigest()


def tree_variant(trees: PPDTreeSet) -> str:
    """The engine variant a tree was searched for (fp32 when it records none: hand-picked trees, trees
    searched before variants)."""
    return str(trees.metadata.get("variant", DEFAULT_VARIANT))


def check_tree_identity(trees: PPDTreeSet, model_fingerprint: str, checkpoint_sha256: str,
                        variant: str = DEFAULT_VARIANT) -> None:
    """Refuse a searched tree built for another model or another checkpoint (ppd prompt tokens or
    ht transfer maps, by the hash of their tensors), or searched for another quantized engine
    variant than `variant`, the engine it will run on: a variant's tree was searched on that
    engine's latency curve. fp32's trees run on every variant (a variant without its own tree
    falls back to them).

    Trees without a recorded identity (hand-picked ones) are accepted for any model."""
    searched = tree_variant(trees)
    if searched not in (variant, DEFAULT_VARIANT):
        raise TreeError(f"this tree was searched for the {searched} engine (on its latency curve), but the engine "
                        f"loaded is {variant}: use the {variant} engine's tree (`python -m tools trees build "
                        f"--backend onnxruntime --variant {variant}`, or `make tree QUANT={variant}`) or fp32's, "
                        f"or leave the tree to the default")
    built_model = trees.metadata.get("model_fingerprint")
    built_checkpoint = trees.metadata.get("checkpoint_sha256")
    if built_model is not None and built_model != model_fingerprint:
        raise TreeError(f"this tree was built for model {built_model}, but the model loaded is "
                        f"{model_fingerprint}: build one for it with `python -m tools trees build` (or `make tree`)")
    if built_checkpoint is not None and built_checkpoint != checkpoint_sha256:
        raise TreeError(f"this tree was built for checkpoint tensors {built_checkpoint[:16]}, but the checkpoint "
                        f"loaded has {checkpoint_sha256[:16]} (retrained?): rebuild it with "
                        f"`python -m tools trees stats` then `python -m tools trees build` (--method ppd|ht; "
                        f"or `make tree`)")


# --- trees per batch size -------------------------------------------------------------------------------
# A tree file's "batch" record (tools/treesearch/batch.py): per B > 1, the tree set searched for steps of B
# sequences, or null where B sequences decode fastest without a tree (vanilla steps).
BATCH_FIELD = "batch"


def batch_tree_sets(trees: PPDTreeSet) -> dict[int, PPDTreeSet | None]:
    """{B: the tree set for steps of B sequences (None: no tree)} of a tree file's "batch" record; B = 1 is
    the file's own tree set. Empty for files searched for one sequence only."""
    record = trees.metadata.get(BATCH_FIELD) or {}
    with fields_of(TreeError, "a tree file's batch record maps B to {\"trees\": tree set or null, ...}"):
        sets = {int(b): None if entry["trees"] is None else PPDTreeSet.from_json(entry["trees"])
                for b, entry in record.items()}
    for b, tree_set in sets.items():
        if b < 2 or (tree_set is not None and tree_set.num_prompt_tokens != trees.num_prompt_tokens):
            raise TreeError(f"the batch record's B={b} entry must be for B >= 2 with the file's N="
                            f"{trees.num_prompt_tokens} prompt tokens")
    return {1: trees, **dict(sorted(sets.items()))}


def for_batch(sets: dict[int, Any], batch_size: int) -> Any:
    """The entry searched for the fewest sequences B >= batch_size (B = 1 always present), or the largest
    B's beyond them. Rounding up, a tree never decodes more sequences per step than it was priced for: a
    step of 7 sequences with the trees searched for 4 costs nearly twice what the search assumed (measured
    2026-12-06, onnxruntime on the 2-core EPYC: hybrid at B = 8 fell to 0.88x vanilla while 5-7 requests
    ran between admissions), whereas B = 8's (none there) only gives up what trees would win at 5-7."""
    at_least = [b for b in sets if b >= batch_size]
    return sets[min(at_least) if at_least else max(sets)]
