"""Acceptance statistics of PPD or HT on calibration prompts: the backend-running half of `python -m tools trees
stats` (trees.stats holds the data type and the estimates, trees.search consumes them). HT's pseudo
slots use PPD's layout (N = k, ensemble 1), so both methods are measured and searched the same way.

The decode loop runs unchanged with a collection tree set in which every node carries all N prompt
tokens, so every step predicts N rows ahead whatever it accepts. After each step the accepted
node's prediction rows ([m, K] top-K ids, read from the step's readout through the draft's layout)
are kept with the position they refer to; the decode is lossless greedy, so the tokens it goes on
to produce are exactly the tokens those rows had to guess.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm
from transformers import AutoConfig

from export.checkpoint import model_fingerprint
from export.methods import METHODS, STATS_METHODS, TREE_SEARCH_METHODS, method_spec
from export.paths import DEFAULT_MODEL_DIR
from export.ppd import PPDConfig
from export.quantize import DEFAULT_VARIANT, check_variant
from runtime.backends import DEFAULT_BACKEND
from runtime.generator import DEFAULT_MAX_NEW_TOKENS, GenerationStats, Generator
from runtime.prompting import Prompt
from trees import PPDStepTree, PPDTreeSet, Tree
from trees.stats import AcceptanceStats


@dataclass(frozen=True)
class CalibrationRun:
    """What the acceptance and the n-gram statistics both decode: the model, where it runs, and how much
    of the calibration prompts."""

    model_dir: str = str(DEFAULT_MODEL_DIR)
    backend: str = DEFAULT_BACKEND
    device: str = "cpu"
    variant: str = DEFAULT_VARIANT         # the onnxruntime engine's weights (export/quantize.py)
    num_prompts: int = 40                  # calibration prompts that are decoded
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    max_prompt_tokens: int = 1024          # longer prompts are skipped (prefill time, context)

    def check_counts(self, *names: str) -> None:
        """The variant exists, and these counts (and the calibration run's own) are >= 1."""
        check_variant(self.variant)
        for name in ("num_prompts", "max_new_tokens", "max_prompt_tokens", *names):
            if getattr(self, name) < 1:
                raise ValueError(f"{type(self).__name__}.{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class StatsConfig(CalibrationRun):
    method: str = "ppd"                    # ppd or ht
    checkpoint: str | None = None          # None: the committed checkpoint of `method`
    topk: int = 10                         # K: ranks recorded per prediction row

    def __post_init__(self) -> None:
        if self.method not in STATS_METHODS:
            raise ValueError(f"acceptance statistics are for {' or '.join(STATS_METHODS)}, not {self.method!r}")
        self.check_counts("topk")


@dataclass(frozen=True)
class CheckpointIdentity:
    model_fingerprint: str
    checkpoint_sha256: str
    config: PPDConfig


def method_checkpoint(method: str, checkpoint: str | Path | None) -> Path:
    """`checkpoint`, or the committed one of `method` when None."""
    spec = method_spec(method, among=TREE_SEARCH_METHODS)
    return Path(spec.default_checkpoint if checkpoint is None else checkpoint)


def checkpoint_identity(model_dir: str | Path, checkpoint: str | Path, method: str = "ppd") -> CheckpointIdentity:
    """Model fingerprint, hash of the trained tensors and slot layout of a ppd (prompt tokens, N/k) or
    ht (transfer maps, N = k, ensemble 1) checkpoint; refused for another model."""
    fingerprint = model_fingerprint(model_dir)
    hidden_size = AutoConfig.from_pretrained(model_dir).hidden_size
    extras = METHODS[method].load_extras(checkpoint, fingerprint, hidden_size)
    return CheckpointIdentity(fingerprint, extras.weights_sha256, extras.slot_layout)


def collection_trees(num_prompt_tokens: int, topk: int) -> PPDTreeSet:
    """For each m: the rank-0 chain of depth m (it speeds the decode up), every node carrying all N
    prompt tokens, so that every step produces N prediction rows."""
    steps = []
    for m in range(num_prompt_tokens + 1):
        tree = Tree(paths=tuple((0,) * d for d in range(1, m + 1)), topk=topk)
        steps.append(PPDStepTree(tree, (num_prompt_tokens,) * tree.size))
    return PPDTreeSet(num_prompt_tokens, topk, tuple(steps))


def step_ranks(predictions: np.ndarray, future: Sequence[int]) -> tuple[int, ...]:
    """(m, rank_1..rank_j): rank of future[d-1] in predictions[d-1] (K when absent), for the rows whose
    true token is known (j = min(m, len(future)))."""
    m, k = predictions.shape
    ranks = []
    for row, token in zip(predictions, future):
        hit = np.flatnonzero(row == token)
        ranks.append(int(hit[0]) if hit.size else k)
    return (m, *ranks)


def decode_records(gen: Generator, prompt_ids: list[int], max_new_tokens: int) -> list[tuple[int, ...]]:
    """Decode one prompt greedily with `gen` (a tree method carrying prediction rows, i.e. ppd or ht);
    one rank record per step: the accepted node's predictions against the tokens that followed."""
    generated: list[int] = []
    pending: list[tuple[np.ndarray, int]] = []  # (predictions, index in `generated` of their depth-1 token)
    for step in gen.decode_steps(prompt_ids, GenerationStats()):
        generated.extend(step.tokens)
        pending.append((step.readout.predictions_of(step.draft, step.path[-1]), len(generated)))
        if any(t in gen.eos_token_ids for t in step.tokens) or len(generated) >= max_new_tokens:
            break
    if not any(len(predictions) for predictions, _ in pending):
        raise ValueError("acceptance statistics need a ppd or ht generator: this one's steps carry no prediction rows")
    end = next((i + 1 for i, t in enumerate(generated) if t in gen.eos_token_ids), len(generated))
    return [step_ranks(predictions, generated[start:end]) for predictions, start in pending]


def calibration_prompt_ids(gen: Generator, prompts: Sequence[Prompt], num_prompts: int, max_prompt_tokens: int,
                           max_new_tokens: int, desc: str, show_progress: bool = True) -> Iterator[list[int]]:
    """The token ids of the first `num_prompts` prompts at most `max_prompt_tokens` long (a progress
    bar counts them); fewer than that is an error naming the fix."""
    used = 0
    with tqdm(total=num_prompts, desc=desc, disable=not show_progress) as bar:
        for prompt in prompts:
            if used == num_prompts:
                return
            ids = gen.encode(prompt)
            if len(ids) > max_prompt_tokens:
                continue
            gen.check_budget(len(ids), max_new_tokens)
            yield ids
            used += 1
            bar.update()
    if used < num_prompts:
        raise ValueError(f"only {used} of the {num_prompts} requested calibration prompts are at most "
                         f"{max_prompt_tokens} tokens long: ask for fewer, or raise max_prompt_tokens")


def collect_acceptance(config: StatsConfig, prompts: Sequence[Prompt], calibration: str,
                       show_progress: bool = True) -> AcceptanceStats:
    """Run ppd or ht on the first `config.num_prompts` prompts that fit and record every step's ranks.
    `calibration` says where the prompts come from (held-out data, never an evaluation set)."""
    checkpoint = method_checkpoint(config.method, config.checkpoint)
    identity = checkpoint_identity(config.model_dir, checkpoint, config.method)
    n = identity.config.num_prompt_tokens
    with tempfile.TemporaryDirectory(prefix=f"{config.method}-collect-") as tmp:
        tree_file = Path(tmp) / "collection-tree.json"
        tree_file.write_text(json.dumps(collection_trees(n, config.topk).to_json()))
        gen = Generator.from_pretrained(config.model_dir, method=config.method, backend=config.backend,
                                        device=config.device, variant=config.variant, checkpoint=str(checkpoint),
                                        tree=str(tree_file))
    records: list[tuple[int, ...]] = []
    for ids in calibration_prompt_ids(gen, prompts, config.num_prompts, config.max_prompt_tokens,
                                      config.max_new_tokens, "acceptance", show_progress):
        records.extend(decode_records(gen, ids, config.max_new_tokens))
    used = config.num_prompts
    return AcceptanceStats(num_prompt_tokens=n, ensemble=identity.config.ensemble, topk=config.topk,
                           steps=tuple(records), model_fingerprint=identity.model_fingerprint,
                           checkpoint_sha256=identity.checkpoint_sha256, calibration=calibration,
                           num_prompts=used, max_new_tokens=config.max_new_tokens, backend=config.backend,
                           device=config.device, variant=config.variant,
                           graph_sha256=gen.backend.info.graph_sha256)
