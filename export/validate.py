"""Numerical validation of an exported step graph against the torch step it was traced from.

Run on every export, at shapes other than the traced one (T=3, S=5): real token ids from the
model's own tokenizer, a past KV cache from a real prefill of that text, and real tree masks
(ancestor masks of a branching tree, and a causal chain for the prefill profile). A model with
sliding-window layers gets its sliding masks (export/masks.py) in every case, and one more case whose
cache is longer than the window: each tree node's window boundary p - window falls inside the
committed entries, at a different entry per depth (and a tiny window also cuts through the tree and
the prefill chain). Every mismatch of every case is collected and reported at once with its max abs
difference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from export.masks import SLIDING_PAST_MASK, SLIDING_TREE_MASK
from export.step_model import StepModel, lowest_mask_value
from trees import buffers_from_parents, causal_buffers

# Any prose works; it only has to tokenize to enough real ids for the longest case.
VALIDATION_TEXT = (
    "The quick brown fox jumps over the lazy dog while the committee discusses the budget for next year. "
    "Parallel decoding verifies several candidate tokens in one forward pass, and the accepted prefix is "
    "exactly what greedy decoding would have produced, one token at a time, on the same hardware."
)


@dataclass(frozen=True)
class Case:
    tree_size: int       # T
    cache_length: int    # S
    chain: bool = False  # a causal chain (prefill) instead of a branching tree
    # Every third cache cell hidden by the past mask (cells of another sequence sharing the step): the
    # nodes see the others, at positions 0.. in order.
    shared_cache: bool = False

    @property
    def label(self) -> str:
        shared = ", a third of the cells another sequence's" if self.shared_cache else ""
        return f"{'chain' if self.chain else 'tree'} T={self.tree_size} S={self.cache_length}{shared}"


def default_cases(max_tree: int, window: int | None = None) -> tuple[Case, ...]:
    """Tree sizes 1, 5, 16 (capped by max_tree) on caches of 0, 7, 50 entries, plus a prefill chain; with a
    sliding window, a tree on a cache of window + 3 entries (the window boundary inside the cache)."""
    cases = [Case(1, 0), Case(min(5, max_tree), 7), Case(min(16, max_tree), 50), Case(1, 50), Case(24, 0, chain=True),
             Case(min(5, max_tree), 31, shared_cache=True)]
    if window is not None:
        cases.append(Case(min(16, max_tree), window + 3))
    return tuple(dict.fromkeys(cases))


# Max abs difference allowed: atol + rtol * max|reference| per output (logits are O(10), KV O(1)).
TOLERANCES = {"float32": (1e-4, 1e-4), "float16": (2e-2, 1e-2)}


@dataclass(frozen=True)
class Comparison:
    case: Case
    output: str
    max_abs_diff: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.max_abs_diff)) and self.max_abs_diff <= self.tolerance


class ValidationError(ValueError):
    """The ONNX step disagrees with the torch step; lists every mismatch."""


@dataclass(frozen=True)
class ValidationReport:
    comparisons: tuple[Comparison, ...]

    @property
    def mismatches(self) -> list[Comparison]:
        return [c for c in self.comparisons if not c.ok]

    def summary(self) -> str:
        worst = max(self.comparisons, key=lambda c: c.max_abs_diff / c.tolerance)
        return (f"validated {len({c.case for c in self.comparisons})} cases x {len({c.output for c in self.comparisons})} "
                f"outputs: {len(self.mismatches)} mismatches; closest to tolerance: {worst.case.label} "
                f"{worst.output} max|diff| {worst.max_abs_diff:.3g} (tol {worst.tolerance:.3g})")

    def to_json(self) -> list[dict]:
        return [{"tree_size": c.case.tree_size, "cache_length": c.case.cache_length, "chain": c.case.chain,
                 "output": c.output, "max_abs_diff": c.max_abs_diff, "tolerance": c.tolerance}
                for c in self.comparisons]

    def raise_on_mismatch(self) -> None:
        if self.mismatches:
            lines = [f"  {c.case.label} {c.output}: max|diff| {c.max_abs_diff:.4g} > tol {c.tolerance:.3g}"
                     for c in self.mismatches]
            raise ValidationError(f"the ONNX step disagrees with the torch step in {len(lines)} place(s):\n"
                                  + "\n".join(lines))


def text_ids(tokenizer: PreTrainedTokenizerBase, vocab_size: int, length: int) -> np.ndarray:
    ids = tokenizer(VALIDATION_TEXT, add_special_tokens=False).input_ids
    if not ids or max(ids) >= vocab_size:
        raise ValueError(f"the tokenizer does not fit the model (ids up to {max(ids, default=None)}, vocab {vocab_size})")
    reps = -(-length // len(ids))
    return np.asarray((ids * reps)[:length], dtype=np.int64)


def case_inputs(step: StepModel, tokens: np.ndarray, case: Case) -> dict[str, np.ndarray]:
    """Feed for one case: the committed prefix is tokens[:S] (prefilled through the torch step),
    the tree holds real next tokens, and PPD prompt-token ids on the last nodes when the model has them."""
    t, s = case.tree_size, case.cache_length
    buffers = causal_buffers(t) if case.chain else buffers_from_parents([-1] + [(i - 1) // 2 for i in range(1, t)])
    # Siblings get different real tokens: node i reads the text at depth + (i mod 3).
    ids = tokens[s + buffers.depth + (0 if case.chain else np.arange(t) % 3)].copy()
    extra = min(step.num_extra_tokens, t - 1) if not case.chain else 0
    if extra:
        ids[t - extra:] = step.vocab_size + np.arange(extra)
    dtype = next(step.parameters()).dtype
    mask = np.where(buffers.ancestor_mask, 0.0, lowest_mask_value(dtype))
    own = np.arange(s) % 3 != 2 if case.shared_cache else np.ones(s, dtype=bool)   # the cells this sequence owns
    # The cache as the step sees it: this sequence's committed entries at positions 0.. in its own cells,
    # and (shared_cache) another prefix's entries in every third cell, which the past mask hides.
    past_keys, past_values = prefill_cache(step, tokens[:s])
    if case.shared_cache:
        other_keys, other_values = prefill_cache(step, tokens[::-1][:s].copy())
        past_keys = [torch.where(torch.from_numpy(own)[:, None, None], k[np.cumsum(own) - 1], o)
                     for k, o in zip(past_keys, other_keys)]
        past_values = [torch.where(torch.from_numpy(own)[:, None, None], v[np.cumsum(own) - 1], o)
                       for v, o in zip(past_values, other_values)]
    length = int(own.sum())
    tree_mask = torch.tensor(mask, dtype=dtype)
    past_mask = torch.tensor(np.where(own[None, :], 0.0, lowest_mask_value(dtype)), dtype=dtype).expand(t, s)
    positions = torch.from_numpy(length + buffers.depth)
    past_positions = torch.from_numpy(np.where(own, np.cumsum(own) - 1, -1))
    feed = {"input_ids": ids, "position_ids": positions.numpy(), "tree_mask": tree_mask.numpy(),
            "past_mask": past_mask.contiguous().numpy()}
    sliding = step.sliding_masks(tree_mask, positions, past_positions, past_mask)
    if sliding[0] is not None:
        feed.update({SLIDING_TREE_MASK: sliding[0].numpy(), SLIDING_PAST_MASK: sliding[1].numpy()})
    feed.update({f"past_key.{i}": k.numpy() for i, k in enumerate(past_keys)})
    feed.update({f"past_value.{i}": v.numpy() for i, v in enumerate(past_values)})
    return feed


@torch.no_grad()
def prefill_cache(step: StepModel, prefix: np.ndarray) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer [S, Hkv, D] keys and values of `prefix`, from one causal step on an empty cache."""
    dtype = next(step.parameters()).dtype
    empty = [torch.zeros(0, step.num_kv_heads, step.head_dim, dtype=dtype) for _ in range(step.num_layers)]
    if len(prefix) == 0:
        return empty, list(empty)
    s = len(prefix)
    mask = torch.full((s, s), lowest_mask_value(dtype), dtype=dtype).triu(1)
    positions = torch.arange(s)
    _, keys, values = step(torch.from_numpy(prefix), positions, mask, empty, list(empty), None,
                           *step.sliding_masks(mask, positions, 0))
    return list(keys.contiguous()), list(values.contiguous())


@torch.no_grad()
def torch_outputs(step: StepModel, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    n = step.num_layers
    sliding = [torch.from_numpy(feed[name]) for name in (SLIDING_TREE_MASK, SLIDING_PAST_MASK) if name in feed]
    logits, keys, values = step(torch.from_numpy(feed["input_ids"]), torch.from_numpy(feed["position_ids"]),
                                torch.from_numpy(feed["tree_mask"]),
                                [torch.from_numpy(feed[f"past_key.{i}"]) for i in range(n)],
                                [torch.from_numpy(feed[f"past_value.{i}"]) for i in range(n)],
                                torch.from_numpy(feed["past_mask"]), *sliding)
    return {"logits": logits.numpy(), "new_keys": keys.numpy(), "new_values": values.numpy()}


def validate_step_graph(onnx_path, step: StepModel, tokenizer: PreTrainedTokenizerBase, max_tree: int,
                        cases: tuple[Case, ...] | None = None, raise_on_mismatch: bool = True) -> ValidationReport:
    """Run the graph with onnxruntime (CPU EP, default optimisations: what the runtime runs) and the
    torch step on the same inputs; compare every output of every case."""
    import onnxruntime as ort

    cases = default_cases(max_tree, step.family.sliding_window) if cases is None else cases
    dtype = str(next(step.parameters()).dtype).removeprefix("torch.")
    atol, rtol = TOLERANCES[dtype]
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    tokens = text_ids(tokenizer, step.vocab_size, max(c.cache_length + c.tree_size + 3 for c in cases))
    comparisons = []
    for case in cases:
        feed = case_inputs(step, tokens, case)
        expected = torch_outputs(step, feed)
        got = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))
        for name, ref in expected.items():
            out = got[name]
            if out.shape != ref.shape or out.dtype != ref.dtype:
                diff = float("inf")  # a shape or dtype mismatch can never pass
            else:
                diff = float(np.max(np.abs(out.astype(np.float64) - ref.astype(np.float64)), initial=0.0))
            tol = atol + rtol * float(np.max(np.abs(ref.astype(np.float64)), initial=0.0))
            comparisons.append(Comparison(case, name, diff, tol))
    report = ValidationReport(tuple(comparisons))
    if raise_on_mismatch:
        report.raise_on_mismatch()
    return report
