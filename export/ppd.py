"""Parallel Prompt Decoding (PPD): prompt-token ids, their tree layout, and their checkpoint file.

N trained prompt tokens, each made of k ensemble virtual tokens (EPT), are appended after a node
of the tree. Each virtual token is a plain id after the vocabulary,

    id(i, j) = vocab_size + i * k + j        prompt token i in 0..N-1, virtual token j in 0..k-1

so every backend takes int ids and StepModel looks the rows up in its extra embedding table
(row i * k + j). Attached after node n (position q), virtual token j of prompt token i sits at
position q + 1 + i, attends to n's ancestors and to virtual token j of prompt tokens 0..i only
(k chains of N nodes hanging off n), and the k logit vectors of prompt token i are averaged: that
average predicts the token at q + 2 + i (n itself predicts q + 1).

Training (train/) and inference (runtime/) both build the layout with `attach_prompt_tokens`, so
the masks they use cannot drift apart.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from export.paths import REPO_ROOT
from export.trained_file import (TrainedFileFormat, check_hidden_size, header_ints, load_checked_tensors,
                                 read_checked_header, save_safetensors_atomic)

# Measured on the held-out ShareGPT split (checkpoints/smollm2-135m-instruct/README.md), 300 training
# samples each: k=3 vs k=1 top-1 0.241/0.121/0.097 vs 0.252/0.117/0.090, top-10 +1 to +1.6 points,
# i.e. within noise, for 2.3x the training time per sample, and every node that carries prompt
# tokens costs k times more tree tokens at inference. So the default is k=1.
DEFAULT_ENSEMBLE = 1
DEFAULT_NUM_PROMPT_TOKENS = 3
MAX_PROMPT_TOKENS = 16
MAX_ENSEMBLE = 16
DEFAULT_PPD_CHECKPOINT = REPO_ROOT / "checkpoints" / "smollm2-135m-instruct" / "ppd-prompt-tokens.safetensors"

CHECKPOINT_FORMAT = "ppdeploy-ppd-prompt-tokens"
CHECKPOINT_VERSION = "1"
TENSOR_NAME = "prompt_embeddings"
TRAIN_COMMAND = "python -m train ppd"


class PromptTokenError(ValueError):
    """A PPD prompt-token checkpoint that cannot be used here, with the reason and the fix."""


FILE_FORMAT = TrainedFileFormat(what="PPD prompt-token", contents="prompt tokens", file_format=CHECKPOINT_FORMAT,
                                version=CHECKPOINT_VERSION, tensor_names=frozenset({TENSOR_NAME}),
                                train_command=TRAIN_COMMAND, error=PromptTokenError, missing_hint=" (`make train`)")


@dataclass(frozen=True)
class PPDConfig:
    """N prompt tokens (`num_prompt_tokens`) with k virtual tokens each (`ensemble`)."""

    num_prompt_tokens: int = DEFAULT_NUM_PROMPT_TOKENS
    ensemble: int = DEFAULT_ENSEMBLE

    def __post_init__(self) -> None:
        for name, limit in (("num_prompt_tokens", MAX_PROMPT_TOKENS), ("ensemble", MAX_ENSEMBLE)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= limit:
                raise ValueError(f"PPDConfig.{name} must be an integer in 1..{limit}, got {value!r}")
            object.__setattr__(self, name, int(value))

    @property
    def num_virtual_tokens(self) -> int:
        """N * k: rows of the extra embedding table, nodes appended per attachment."""
        return self.num_prompt_tokens * self.ensemble


def prompt_token_ids(config: PPDConfig, vocab_size: int) -> np.ndarray:
    """[N, k] int64: id of virtual token j of prompt token i = vocab_size + i * k + j."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    ids = vocab_size + np.arange(config.num_virtual_tokens, dtype=np.int64).reshape(
        config.num_prompt_tokens, config.ensemble)
    ids.setflags(write=False)
    return ids


def attach_prompt_tokens(parents: list[int], tokens: list[int], node: int, config: PPDConfig,
                         vocab_size: int) -> tuple[list[int], list[int]]:
    """Append the N*k prompt nodes after tree node `node`; returns new (parents, tokens) lists.

    The new nodes start at index len(parents) and come in id order (i-major: node start + i*k + j
    holds id(i, j)), so their logits reshape to [N, k, V] for `average_ensemble_logits`. Virtual
    token j of prompt token i has parent `node` for i == 0, else virtual token j of prompt token
    i - 1: k chains of N nodes. `trees.buffers_from_parents` then gives exactly the EPT mask and
    depth(node) + 1 + i as the depth.
    """
    if len(parents) != len(tokens):
        raise ValueError(f"parents ({len(parents)}) and tokens ({len(tokens)}) must have the same length")
    if not 0 <= node < len(parents):
        raise ValueError(f"node {node} is not in the tree (0..{len(parents) - 1})")
    ids = prompt_token_ids(config, vocab_size)
    start, k = len(parents), config.ensemble
    new_parents, new_tokens = list(parents), list(tokens)
    for i in range(config.num_prompt_tokens):
        for j in range(k):
            new_parents.append(node if i == 0 else start + (i - 1) * k + j)
            new_tokens.append(int(ids[i, j]))
    return new_parents, new_tokens


def average_ensemble_logits(logits: torch.Tensor, config: PPDConfig) -> torch.Tensor:
    """[..., N*k, V] logits of one attachment's prompt nodes (in attach order) -> [..., N, V].

    The k virtual tokens' logit vectors of each prompt token are averaged (EPT); for k == 1 this
    is a reshape.
    """
    n, k = config.num_prompt_tokens, config.ensemble
    if logits.dim() < 2 or logits.shape[-2] != n * k:
        raise ValueError(f"expected logits [..., {n * k}, V] for N={n}, k={k}, got {tuple(logits.shape)}")
    grouped = logits.reshape(*logits.shape[:-2], n, k, logits.shape[-1])
    return grouped[..., 0, :] if k == 1 else grouped.mean(dim=-2)


# --- checkpoint file ------------------------------------------------------------------------------

def save_prompt_tokens(path: str | Path, embeddings: torch.Tensor, config: PPDConfig, fingerprint: str,
                       metadata: dict | None = None, dtype: torch.dtype = torch.float16) -> Path:
    """Write the [N*k, H] prompt embeddings as safetensors (fp16 or fp32), atomically.

    The header records N, k, the hidden size and the model fingerprint (`export.checkpoint.
    model_fingerprint`) so a checkpoint is refused for any other model; `metadata` (training
    command, seed, data size, accuracies...) is stored as JSON under "training".
    """
    path = Path(path)
    if dtype not in (torch.float16, torch.float32):
        raise ValueError(f"prompt tokens are saved as float16 or float32, not {dtype}")
    if embeddings.dim() != 2 or embeddings.shape[0] != config.num_virtual_tokens:
        raise ValueError(f"expected embeddings [{config.num_virtual_tokens}, H] for N={config.num_prompt_tokens}, "
                         f"k={config.ensemble}, got {tuple(embeddings.shape)}")
    header = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "num_prompt_tokens": str(config.num_prompt_tokens),
        "ensemble": str(config.ensemble),
        "hidden_size": str(int(embeddings.shape[1])),
        "model_fingerprint": fingerprint,
        "training": json.dumps(metadata or {}, sort_keys=True),
    }
    return save_safetensors_atomic(path, {TENSOR_NAME: embeddings.detach().to("cpu", dtype).contiguous()}, header)


def read_prompt_token_header(path: str | Path, expected_fingerprint: str | None = None) -> dict[str, str]:
    """The raw safetensors header of a prompt-token checkpoint (raises PromptTokenError)."""
    return read_checked_header(path, FILE_FORMAT, expected_fingerprint)


def prompt_token_metadata(path: str | Path) -> dict:
    """The training metadata stored with a checkpoint (command, seed, data size, accuracies...)."""
    return json.loads(read_prompt_token_header(path).get("training", "{}"))


def load_prompt_tokens(path: str | Path, expected_fingerprint: str, hidden_size: int,
                       expected: PPDConfig | None = None) -> tuple[torch.Tensor, PPDConfig]:
    """Load [N*k, H] fp32 prompt embeddings and their PPDConfig, refusing a checkpoint trained for
    another model (fingerprint), another hidden size, or an N/k other than `expected` (when given)."""
    path = Path(path)
    header = read_prompt_token_header(path, expected_fingerprint)
    n, ensemble, saved_hidden = header_ints(path, header, ("num_prompt_tokens", "ensemble", "hidden_size"),
                                            FILE_FORMAT)
    try:
        config = PPDConfig(n, ensemble)
    except ValueError as exc:  # out-of-range N or k: written by something other than our saver
        raise PromptTokenError(f"{path} has a damaged header ({exc}): re-create it with `{TRAIN_COMMAND}`") from exc
    check_hidden_size(path, saved_hidden, hidden_size, FILE_FORMAT)
    if expected is not None and expected != config:
        raise PromptTokenError(
            f"{path} has N={config.num_prompt_tokens} prompt tokens with k={config.ensemble} virtual tokens, "
            f"but N={expected.num_prompt_tokens}, k={expected.ensemble} was requested: drop the explicit "
            f"N/k to use the checkpoint's, or retrain with `{TRAIN_COMMAND} --num-prompt-tokens "
            f"{expected.num_prompt_tokens} --ensemble {expected.ensemble}`")
    shape = (config.num_virtual_tokens, saved_hidden)
    embeddings = load_checked_tensors(path, {TENSOR_NAME: shape}, FILE_FORMAT)[TENSOR_NAME]
    return embeddings, config
