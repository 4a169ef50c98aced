"""Row independence of a step graph: a tree node's logits must not
depend on the other nodes of its step, or tree verification stops being lossless. Weight-only
quantization keeps it; per-tensor dynamic activation quantization (one scale over all T rows) breaks it.

    prefill the prefix (S entries) -> one tree step over T nodes: logits [T, V]
    for each node: its own path (root .. node) alone, as a chain over the same S entries: the last row
    compare the node's two rows: argmax identical, max |diff| within the tolerance

Across sequences (batch invariance, `check_batch_independence`): two sequences' trees in one packed
step, their committed entries interleaved in one cache with a past mask (runtime/backends/packing.py),
against each sequence's tree step alone over its own cache: every row compared the same way. A
sequence's logits must not depend on which others share its step, or on their lengths.

Runs on a plain onnxruntime session of the graph (the backend's own `session` works too), so
export/ can check what it builds and tests can check what the runtime loads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from export.manifest import Manifest
from export.masks import sliding_window_masks

# Max |diff| allowed between a node's row in the tree step and the same node scored along its own path
# alone: atol + rtol * max|logit| of that row (logits are O(10)). fp32 (ordinary attention, measured on the
# 135M model, T=15 tree): 3.5e-5, fp32 sums reordered. The quantized variants (accuracy level 4 on
# row-exact attention, export/quantize.py) must agree bitwise: their int8 activation rounding turns any
# 1e-7 difference into 0.3-1.0 logits a few layers later, so no tolerance would be safe.
ROW_TOLERANCES = {"fp32": (1e-4, 1e-4), "int8": (0.0, 0.0), "int4": (0.0, 0.0)}


@dataclass(frozen=True)
class RowCheck:
    node: int
    depth: int
    max_abs_diff: float       # over the node's V logits
    tolerance: float
    argmax_tree: int          # the node's greedy token in the tree step
    argmax_alone: int         # ... and along its own path alone
    top2_gap: float           # of the row alone: how close a flip would be

    @property
    def ok(self) -> bool:
        return self.argmax_tree == self.argmax_alone and self.max_abs_diff <= self.tolerance


@dataclass(frozen=True)
class RowReport:
    rows: tuple[RowCheck, ...]

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    @property
    def max_abs_diff(self) -> float:
        return max(r.max_abs_diff for r in self.rows)

    def failures(self) -> list[str]:
        return [f"node {r.node} (depth {r.depth}): argmax {r.argmax_tree} in the tree vs {r.argmax_alone} alone, "
                f"max|diff| {r.max_abs_diff:.2e} (tol {r.tolerance:.2e}, top-2 gap {r.top2_gap:.2e})"
                for r in self.rows if not r.ok]

    def summary(self) -> str:
        worst = max(self.rows, key=lambda r: (r.max_abs_diff - r.tolerance, r.max_abs_diff))   # tolerance may be 0
        return (f"row independence over {len(self.rows)} tree nodes: {len(self.failures())} failures; max|diff| "
                f"{self.max_abs_diff:.2e} (node {worst.node}, tol {worst.tolerance:.2e})")

    def to_json(self) -> dict:
        return {"nodes": len(self.rows), "max_abs_diff": self.max_abs_diff, "ok": self.ok,
                "rows": [asdict(r) for r in self.rows]}


def binary_tree_parents(size: int) -> list[int]:
    """Parents of a complete binary tree of `size` nodes (root first): branching at every depth."""
    return [-1] + [(i - 1) // 2 for i in range(1, size)]


def path_to(parents: Sequence[int], node: int) -> list[int]:
    """The nodes from the root to `node`, both included."""
    path = [node]
    while parents[path[-1]] >= 0:
        path.append(parents[path[-1]])
    return path[::-1]


def tree_mask(parents: Sequence[int], dtype: np.dtype) -> np.ndarray:
    """Additive [T, T] mask: row i sees its ancestors and itself (0), the rest the dtype's lowest value."""
    mask = np.full((len(parents), len(parents)), np.finfo(dtype).min, dtype=dtype)
    for node in range(len(parents)):
        mask[node, path_to(parents, node)] = 0
    return mask


def pad_rows(ids: np.ndarray, positions: np.ndarray, mask: np.ndarray,
             min_rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The step's inputs with rows appended up to `min_rows`, each the child of the row before (its
    token repeated, one position further); the real rows cannot see them."""
    t = len(ids)
    extra = min_rows - t
    if extra <= 0:
        return ids, positions, mask
    padded = np.full((min_rows, min_rows), np.finfo(mask.dtype).min, dtype=mask.dtype)
    padded[:t, :t] = mask
    for row in range(t, min_rows):
        padded[row, : row + 1] = padded[row - 1, : row + 1]
        padded[row, row] = 0
    return (np.concatenate([ids, np.repeat(ids[-1:], extra)]),
            np.concatenate([positions, positions[-1] + np.arange(1, extra + 1)]), padded)


class StepRunner:
    """Runs the step graph in an onnxruntime session over a fixed committed prefix (numpy, no cache owner)."""

    def __init__(self, session, manifest: Manifest) -> None:
        self.session, self.manifest = session, manifest
        self.dtype = np.dtype(manifest.dtype)
        m = manifest.model
        empty = np.zeros((0, m.num_kv_heads, m.head_dim), self.dtype)
        self.past = {f"past_{kind}.{i}": empty for kind in ("key", "value") for i in range(m.num_layers)}

    def run(self, ids: Sequence[int], positions: Sequence[int], mask: np.ndarray, past_mask: np.ndarray | None = None,
            past_positions: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
        """logits [T, V], new keys and values [L, T, Hkv, D]; `past_mask` [T, S] and the cells' positions
        [S] default to one sequence's (every entry its own, at 0..S-1). A step of fewer than the manifest's
        min_step_rows rows runs padded, as the runtime runs it (runtime/backends/packing.py)."""
        t = len(ids)
        s = self.past["past_key.0"].shape[0]
        past_mask = np.zeros((t, s), self.dtype) if past_mask is None else past_mask.astype(self.dtype)
        ids, positions, mask = pad_rows(np.asarray(ids, np.int64), np.asarray(positions, np.int64),
                                        mask.astype(self.dtype), self.manifest.min_step_rows)
        past_mask = np.concatenate([past_mask, np.repeat(past_mask[-1:], len(ids) - t, axis=0)])  # padding: as the last
        feeds = {"input_ids": ids, "position_ids": positions, "tree_mask": mask, "past_mask": past_mask}
        model = self.manifest.model
        if model.sliding_mask_inputs:   # sliding-window families: the window over each cell's position and the tree
            past_positions = np.arange(s) if past_positions is None else past_positions
            feeds.update(zip(model.sliding_mask_inputs,
                             sliding_window_masks(mask, positions, past_positions, model.sliding_window, past_mask)))
        feeds.update(self.past)
        logits, keys, values = self.session.run(["logits", "new_keys", "new_values"], feeds)
        return logits[:t], keys[:, :t], values[:, :t]

    def prefill(self, ids: Sequence[int]) -> None:
        """Commit `ids` as the prefix every later run sees."""
        _, keys, values = self.run(ids, range(len(ids)), tree_mask(list(range(-1, len(ids) - 1)), self.dtype))
        for i in range(self.manifest.model.num_layers):
            self.past[f"past_key.{i}"], self.past[f"past_value.{i}"] = keys[i], values[i]


def check_batch_independence(session, manifest: Manifest, prefixes: Sequence[Sequence[int]],
                             trees: Sequence[tuple[Sequence[int], Sequence[int]]],
                             tolerance: tuple[float, float]) -> RowReport:
    """Each sequence's tree (tokens, parents) after its own prefix, alone; then all of them packed into one
    step whose cache holds every prefix's entries interleaved (cell i of the cache: prefix i % n's next
    entry, while it has one); compare each node's row. Node numbers in the report run over the packed step."""
    if len(prefixes) != len(trees) or len(prefixes) < 2 or not all(prefixes):
        raise ValueError("need two or more non-empty prefixes, one tree each")
    alone, caches = [], []
    for prefix, (tokens, parents) in zip(prefixes, trees):
        runner = StepRunner(session, manifest)
        runner.prefill(prefix)
        depths = [len(path_to(parents, n)) - 1 for n in range(len(parents))]
        alone.append(runner.run(tokens, [len(prefix) + d for d in depths], tree_mask(parents, runner.dtype))[0])
        caches.append(runner.past)
    owner = interleaved_owners([len(p) for p in prefixes])          # [S] the sequence of each cell
    runner = StepRunner(session, manifest)
    dtype, low = runner.dtype, np.finfo(runner.dtype).min
    index = [np.flatnonzero(owner == i) for i in range(len(prefixes))]
    for name in runner.past:                                        # the interleaved cache
        runner.past[name] = np.concatenate([c[name] for c in caches])[np.argsort(np.concatenate(index), kind="stable")]
    ids, positions, rows = [], [], []
    for i, (tokens, parents) in enumerate(trees):
        rows.append(len(ids))
        ids += list(tokens)
        positions += [len(prefixes[i]) + len(path_to(parents, n)) - 1 for n in range(len(parents))]
    t = len(ids)
    mask = np.full((t, t), low, dtype)
    past_mask = np.full((t, len(owner)), low, dtype)
    for i, (tokens, parents) in enumerate(trees):
        block = slice(rows[i], rows[i] + len(tokens))
        mask[block, block] = tree_mask(parents, dtype)
        past_mask[block, index[i]] = 0
    past_positions = np.concatenate([np.arange(len(p)) for p in prefixes])[np.argsort(np.concatenate(index),
                                                                                      kind="stable")]
    packed = runner.run(ids, positions, mask, past_mask, past_positions)[0]
    atol, rtol = tolerance
    checks = []
    for i, (tokens, parents) in enumerate(trees):
        for node in range(len(tokens)):
            want, got = alone[i][node], packed[rows[i] + node]
            top2 = np.sort(want)[-2:]
            checks.append(RowCheck(rows[i] + node, len(path_to(parents, node)) - 1, float(np.abs(got - want).max()),
                                   atol + rtol * float(np.abs(want).max()), int(got.argmax()), int(want.argmax()),
                                   float(top2[1] - top2[0])))
    return RowReport(tuple(checks))


def interleaved_owners(lengths: Sequence[int]) -> np.ndarray:
    """[sum(lengths)] the sequence owning each cache cell when sequences commit one entry each in turn."""
    owners, left = [], list(lengths)
    while any(left):
        for i in range(len(left)):
            if left[i]:
                owners.append(i)
                left[i] -= 1
    return np.asarray(owners)


def check_row_independence(session, manifest: Manifest, prefix: Sequence[int], tokens: Sequence[int],
                           parents: Sequence[int], tolerance: tuple[float, float]) -> RowReport:
    """Score the tree (`tokens[i]` at node i, `parents[i]` its parent, -1 the root) in one step after
    `prefix`, then each node along its own path alone; compare every node's logits row."""
    if len(tokens) != len(parents) or not prefix:
        raise ValueError("need one token per tree node and a non-empty prefix")
    runner = StepRunner(session, manifest)
    runner.prefill(prefix)
    s = len(prefix)
    depths = [len(path_to(parents, n)) - 1 for n in range(len(parents))]
    tree_logits = runner.run(tokens, [s + d for d in depths], tree_mask(parents, runner.dtype))[0]
    atol, rtol = tolerance
    rows = []
    for node in range(len(parents)):
        path = path_to(parents, node)
        alone = runner.run([tokens[n] for n in path], range(s, s + len(path)),
                           tree_mask(list(range(-1, len(path) - 1)), runner.dtype))[0][-1]
        top2 = np.sort(alone)[-2:]
        rows.append(RowCheck(node, depths[node], float(np.abs(tree_logits[node] - alone).max()),
                             atol + rtol * float(np.abs(alone).max()), int(tree_logits[node].argmax()),
                             int(alone.argmax()), float(top2[1] - top2[0])))
    return RowReport(tuple(rows))
