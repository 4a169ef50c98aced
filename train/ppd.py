"""Training PPD prompt tokens by self-distillation (`python -m train ppd`).

Per sample (context + the base model's greedy continuation, train/distill.py):

1. Sequence pass, no grad: StepModel over the whole sample with a causal mask gives the sequence
   KV cache and, through the LM head, the teacher's distribution at every continuation position
   (teacher-forced; row r predicts the token at r + 1).
2. Prompt pass, with grad: one prompt group (N*k virtual tokens, `export.ppd.attach_prompt_tokens`)
   after every usable position q of the continuation, all groups in one forward on top of the
   cached sequence. A past mask lets the group at q see positions 0..q only; the tree mask
   (`trees.buffers_from_parents`) keeps groups apart and gives each virtual token its own chain.
   Gradients flow into the prompt embeddings only, never through the real-token sequence.
3. Loss: sum_i 0.8^i * mean_q KL(teacher(q + 2 + i) || student_i(q)), student_i = softmax of the
   average of prompt token i's k logit vectors (the token at q + 2 + i is predicted by hidden row
   q + 1 + i of the teacher pass).

Only the [N*k, H] prompt embeddings train (AdamW, cosine schedule with linear warm-up). The
held-out accuracies per prompt position (top-1: student argmax == teacher argmax; top-10: the
teacher's argmax in the student's top 10) go into the checkpoint metadata and a JSON beside it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from export.ppd import (DEFAULT_ENSEMBLE, DEFAULT_NUM_PROMPT_TOKENS, DEFAULT_PPD_CHECKPOINT, PPDConfig,
                        attach_prompt_tokens, average_ensemble_logits, save_prompt_tokens)
from export.step_model import StepModel, lowest_mask_value
from train.common import (DistillTrainConfig, SampleOutput, TrainingRun, TrainResult, base_report,
                          causal_mask, distill_scores, evaluate, format_command, load_training_inputs,
                          usable_positions, write_report)
from trees import buffers_from_parents
from trees.config_args import option

__all__ = ["PPDTrainConfig", "PromptGroups", "build_prompt_groups", "causal_mask", "format_command",
           "initial_embeddings", "sample_forward", "train_ppd", "usable_positions"]


@dataclass
class PPDTrainConfig(DistillTrainConfig):
    """Every default of `python -m train ppd` lives here or in DistillTrainConfig (the CLI is
    generated from these fields)."""

    output: Path = option(DEFAULT_PPD_CHECKPOINT, "prompt-token checkpoint to write (.safetensors)")
    lr: float = option(DistillTrainConfig.lr, "AdamW peak learning rate (PPD paper: 1e-2)")
    num_prompt_tokens: int = option(DEFAULT_NUM_PROMPT_TOKENS, "N: prompt tokens (prompt token i predicts t+2+i)")
    ensemble: int = option(DEFAULT_ENSEMBLE, "k: ensemble virtual tokens per prompt token (EPT)")
    init_noise: float = option(0.1, "init = mean vocab embedding + this * per-dim std * N(0, 1)")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_slots(self.num_prompt_tokens, "num_prompt_tokens")
        self.ppd  # validates N and k

    @property
    def ppd(self) -> PPDConfig:
        return PPDConfig(self.num_prompt_tokens, self.ensemble)


# --- one sample's tensors --------------------------------------------------------------------------

@dataclass(frozen=True)
class PromptGroups:
    """Prompt groups attached after positions `qs` of one sequence of length S (T = len(qs) * N*k)."""

    qs: np.ndarray              # [G] attachment positions
    input_ids: torch.Tensor     # [T]
    position_ids: torch.Tensor  # [T]  q + 1 + i
    tree_mask: torch.Tensor     # [T, T] additive: own chain within own group
    past_mask: torch.Tensor     # [T, S] additive: sequence positions 0..q
    target_rows: torch.Tensor   # [G, N] teacher-pass row predicting each prompt position's token


def build_prompt_groups(qs: np.ndarray, seq_len: int, config: PPDConfig, vocab_size: int,
                        dtype: torch.dtype = torch.float32) -> PromptGroups:
    parents, tokens = attach_prompt_tokens([-1], [0], 0, config, vocab_size)
    buffers = buffers_from_parents(parents)
    local_mask = buffers.ancestor_mask[1:, 1:]                   # [M, M], M = N*k
    local_depth = buffers.depth[1:]                              # [M]: 1 + i
    m, g = config.num_virtual_tokens, len(qs)
    visible_tree = np.kron(np.eye(g, dtype=bool), local_mask)   # groups never see each other
    visible_past = np.repeat(np.arange(seq_len)[None, :] <= qs[:, None], m, axis=0)
    low = lowest_mask_value(dtype)
    to_additive = lambda v: torch.where(torch.from_numpy(v), 0.0, low).to(dtype)  # noqa: E731
    prompt_index = np.arange(config.num_prompt_tokens)
    return PromptGroups(
        qs=qs,
        input_ids=torch.from_numpy(np.tile(np.asarray(tokens[1:], dtype=np.int64), g)),
        position_ids=torch.from_numpy((qs[:, None] + local_depth[None, :]).reshape(-1)),
        tree_mask=to_additive(visible_tree),
        past_mask=to_additive(visible_past),
        target_rows=torch.from_numpy(qs[:, None] + 1 + prompt_index[None, :]),
    )


def sample_forward(model: StepModel, seq: np.ndarray, context_len: int, ends_with_eos: bool, config: PPDConfig,
                   weights: torch.Tensor) -> SampleOutput | None:
    """Teacher pass (no grad) + prompt pass for one sample; None when no position is usable."""
    qs = usable_positions(len(seq), context_len, ends_with_eos, config.num_prompt_tokens)
    if len(qs) == 0:
        return None
    device = model.lm_head_t.device
    s = len(seq)
    with torch.no_grad():
        empty = torch.zeros(0, model.num_kv_heads, model.head_dim, device=device)
        positions, mask = torch.arange(s, device=device), causal_mask(s).to(device)
        hidden, keys, values = model.hidden_states(
            torch.from_numpy(seq).to(device), positions, mask, [empty] * model.num_layers, [empty] * model.num_layers,
            None, *model.sliding_masks(mask, positions, 0))
        first_row = int(qs[0]) + 1
        teacher_logp = torch.log_softmax(model.logits(hidden[first_row:]).float(), dim=-1)          # [R, V]
    groups = build_prompt_groups(qs, s, config, model.vocab_size)
    # Sliding-window layers see, of the sequence, positions 0..q inside the window (export/masks.py).
    tree_mask, past_mask = groups.tree_mask.to(device), groups.past_mask.to(device)
    group_positions = groups.position_ids.to(device)
    h, _, _ = model.hidden_states(groups.input_ids.to(device), group_positions, tree_mask, list(keys), list(values),
                                  past_mask, *model.sliding_masks(tree_mask, group_positions, s, past_mask))
    logits = model.logits(h).view(len(qs), config.num_virtual_tokens, -1)
    student_logp = torch.log_softmax(average_ensemble_logits(logits, config).float(), dim=-1)    # [G, N, V]
    teacher = teacher_logp[(groups.target_rows - first_row).to(device)]                          # [G, N, V]
    return distill_scores(student_logp, teacher, weights)


# --- the training run ------------------------------------------------------------------------------

def initial_embeddings(model: StepModel, config: PPDConfig, noise: float, generator: torch.Generator) -> torch.Tensor:
    """Mean vocabulary embedding + small per-row noise, [N*k, H].

    The mean embedding is the input that commits to no particular token, so the first steps start
    from a neutral prediction rather than from a token's meaning; the noise (scaled by the
    embedding table's per-dimension std) makes the k virtual tokens of EPT differ, otherwise their
    chains would get identical gradients and never diverge."""
    table = model.embed_vocab(torch.arange(model.vocab_size, device=model.lm_head_t.device)).float().cpu()
    mean, std = table.mean(0), table.std(0)
    rows = torch.randn(config.num_virtual_tokens, table.shape[1], generator=generator)
    return mean + noise * std * rows


def train_ppd(config: PPDTrainConfig, command: str | None = None) -> TrainResult | None:
    """Prepare (or reuse) the self-distilled data, train the prompt tokens, evaluate, save.
    Returns None when `config.prepare_only` (the data cache is complete then)."""
    ppd = config.ppd
    inputs = load_training_inputs(config)
    if inputs is None:
        return None
    device, fingerprint, hf_model = inputs.device, inputs.fingerprint, inputs.hf_model
    train_data, val_data, data_seconds = inputs.train_data, inputs.val_data, inputs.data_seconds

    model_parameters = sum(p.numel() for p in hf_model.parameters())
    model = StepModel(hf_model.cpu()).to(device)
    del hf_model
    generator = torch.Generator().manual_seed(config.seed)
    model.extra_embeddings = torch.nn.Parameter(
        initial_embeddings(model, ppd, config.init_noise, generator).to(device), requires_grad=True)
    weights = config.decay ** torch.arange(ppd.num_prompt_tokens, dtype=torch.float32, device=device)

    def scores(data):
        # Looked up at call time (module global), so tests can wrap sample_forward.
        return lambda s: sample_forward(model, *data.sample(s), ppd, weights)

    n = ppd.num_prompt_tokens
    initial = evaluate(scores(val_data), len(val_data), n, "validate (initial)") if config.eval_initial else None
    run = TrainingRun.start(config, {"embeddings": model.extra_embeddings}, len(train_data), fingerprint)
    run.train(scores(train_data), desc="train ppd")

    eval_started = time.perf_counter()
    result = evaluate(scores(val_data), len(val_data), n)
    eval_seconds = time.perf_counter() - eval_started
    report = {"num_prompt_tokens": ppd.num_prompt_tokens, "ensemble": ppd.ensemble,
              **base_report(command, config, fingerprint, train_data, val_data, result, initial, run,
                            model_parameters, data_seconds, eval_seconds, device)}
    save_prompt_tokens(config.output, model.extra_embeddings.detach(), ppd, fingerprint, report,
                       dtype=getattr(torch, config.save_dtype))
    write_report(config.report_path, report)
    config.resume_path.unlink(missing_ok=True)
    return TrainResult(config.output, result.top1, result.top10, result.loss, report["val_loss_initial"], run.losses,
                       data_seconds, run.train_seconds, eval_seconds, run.trainable_parameters, model_parameters,
                       report)
