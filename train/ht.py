"""Training HT transfer maps by self-distillation (`python -m train ht`).

Per sample (context + the base model's greedy continuation, train/distill.py):

1. Sequence pass, no grad: StepModel over the whole sample with a causal mask, split at layer l:
   layers 0..l give the layer-l hidden state h_l(q) of every position, layers l+1..L-1 the rest;
   together the sequence KV cache of every layer and, through the final norm and LM head, the
   teacher's distribution at every continuation position (teacher-forced; row r predicts r + 1).
2. Pseudo pass, with grad: after every usable position q of the continuation, a group of k pseudo
   states pseudo_j = h_l(q) @ W_j + b_j at positions q+1+j. All groups go in one forward through
   layers l+1..L-1 only (layers 0..l are never recomputed: the pseudo states enter above them), on
   top of the cached sequence KV of those layers. A past mask lets the group at q see positions
   0..q only; the tree mask (PPD's layout, `export.ht.layout_config`) chains pseudo j after
   pseudo 0..j-1 of its own group. This is exactly what the inference step computes for pseudo
   slots attached after a node at position q (tests/train/test_ht_train.py checks it).
3. Loss: sum_j decay^j * mean_q KL(teacher(q + 2 + j) || student_j(q)), decay 0.8 as PPD.

Only the k maps train (W [k, H, H], b [k, H]; AdamW, cosine schedule with linear warm-up).

Initialisation: W_j = I, b_j = 0. h_l(q) is the residual stream of the real token at q, which the
upper layers already turn into a good prediction of the token at q+1; starting every pseudo state
as that state keeps it in the distribution the upper layers were trained on (scale, features) and
makes the starting prediction for q+2+j "the model's own guess for q+1", a sensible, non-random
guess that training shifts forward by j+1 tokens. A random or zero init would hand the upper
layers states they have never seen. (The paper gives no initialisation; this is our choice.)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from export.ht import (DEFAULT_HT_CHECKPOINT, DEFAULT_NUM_MAPS, MAX_MAPS, TransferMaps, default_transfer_layer,
                       layout_config, save_transfer_maps)
from export.step_model import StepModel
from train.common import (DistillTrainConfig, SampleOutput, TrainingRun, TrainResult, base_report,
                          causal_mask, distill_scores, evaluate, load_training_inputs, usable_positions, write_report)
from train.ppd import build_prompt_groups
from trees.config_args import option


@dataclass
class HTTrainConfig(DistillTrainConfig):
    """Every default of `python -m train ht` lives here or in DistillTrainConfig (the CLI is
    generated from these fields)."""

    output: Path = option(DEFAULT_HT_CHECKPOINT, "transfer-map checkpoint to write (.safetensors)")
    num_maps: int = option(DEFAULT_NUM_MAPS, "k: transfer maps (pseudo state j predicts t+2+j)")
    layer: int | None = option(None, "l: 0-based decoder layer whose output the maps read "
                                     "(default: export.ht.default_transfer_layer of the model's depth)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.num_maps, bool) or not 1 <= self.num_maps <= MAX_MAPS:
            raise ValueError(f"num_maps must be in 1..{MAX_MAPS}, got {self.num_maps}")
        if self.layer is not None and self.layer < 0:
            raise ValueError(f"layer must be >= 0, got {self.layer}")
        self.check_slots(self.num_maps, "num_maps")


def sample_forward(model: StepModel, seq: np.ndarray, context_len: int, ends_with_eos: bool,
                   weights: torch.Tensor) -> SampleOutput | None:
    """Teacher pass (no grad) + pseudo pass for one sample; None when no position is usable."""
    transfer = model.transfer
    k, split = transfer.num_maps, transfer.layer + 1
    qs = usable_positions(len(seq), context_len, ends_with_eos, k)
    if len(qs) == 0:
        return None
    device = model.lm_head_t.device
    s, layers = len(seq), model.num_layers
    with torch.no_grad():
        empty = [torch.zeros(0, model.num_kv_heads, model.head_dim, device=device)] * layers
        h = model.embed(torch.from_numpy(seq).to(device))
        positions, mask = torch.arange(s, device=device), causal_mask(s).to(device)
        inputs = model.step_inputs(positions, h.dtype, mask, empty[0], None, *model.sliding_masks(mask, positions, 0))
        h_l, keys, values = model.run_layers(h, inputs, empty, empty, 0, split)                   # h_l [S, H]
        h_top, upper_keys, upper_values = model.run_layers(h_l, inputs, empty, empty, split, layers)
        keys, values = keys + upper_keys, values + upper_values
        first_row = int(qs[0]) + 1
        teacher_logp = torch.log_softmax(model.logits(model.final_hidden(h_top[first_row:])).float(), dim=-1)
    groups = build_prompt_groups(qs, s, layout_config(k), model.vocab_size)
    pseudo = transfer.transfer(h_l[torch.from_numpy(qs).to(device)])                               # [G, k, H]
    # Sliding-window layers see, of the sequence, positions 0..q inside the window (export/masks.py).
    tree_mask, past_mask = groups.tree_mask.to(device), groups.past_mask.to(device)
    group_positions = groups.position_ids.to(device)
    inputs = model.step_inputs(group_positions, pseudo.dtype, tree_mask, keys[0], past_mask,
                                *model.sliding_masks(tree_mask, group_positions, s, past_mask))
    h, _, _ = model.run_layers(pseudo.reshape(len(qs) * k, -1), inputs, keys, values, split, layers)
    logits = model.logits(model.final_hidden(h)).view(len(qs), k, -1)
    student_logp = torch.log_softmax(logits.float(), dim=-1)                                       # [G, k, V]
    teacher = teacher_logp[(groups.target_rows - first_row).to(device)]                            # [G, k, V]
    return distill_scores(student_logp, teacher, weights)


def train_ht(config: HTTrainConfig, command: str | None = None) -> TrainResult | None:
    """Prepare (or reuse) the self-distilled data, train the transfer maps, evaluate, save.
    Returns None when `config.prepare_only` (the data cache is complete then)."""
    inputs = load_training_inputs(config)
    if inputs is None:
        return None
    device, fingerprint, hf_model = inputs.device, inputs.fingerprint, inputs.hf_model
    train_data, val_data, data_seconds = inputs.train_data, inputs.val_data, inputs.data_seconds

    num_layers, hidden = hf_model.config.num_hidden_layers, hf_model.config.hidden_size
    layer = default_transfer_layer(num_layers) if config.layer is None else config.layer
    if layer >= num_layers:
        raise ValueError(f"--layer {layer} is not a layer of this model (0..{num_layers - 1})")
    model_parameters = sum(p.numel() for p in hf_model.parameters())
    maps = TransferMaps.identity(config.num_maps, hidden, layer)
    model = StepModel(hf_model.cpu(), transfer_maps=maps).to(device)
    del hf_model
    params = {"weight": model.transfer.weight.requires_grad_(True), "bias": model.transfer.bias.requires_grad_(True)}
    weights = config.decay ** torch.arange(config.num_maps, dtype=torch.float32, device=device)

    def scores(data):
        # Looked up at call time (module global), so tests can wrap sample_forward.
        return lambda s: sample_forward(model, *data.sample(s), weights)

    k = config.num_maps
    initial = evaluate(scores(val_data), len(val_data), k, "validate (initial)") if config.eval_initial else None
    run = TrainingRun.start(config, params, len(train_data), fingerprint)
    run.train(scores(train_data), desc="train ht")

    eval_started = time.perf_counter()
    result = evaluate(scores(val_data), len(val_data), k)
    eval_seconds = time.perf_counter() - eval_started
    report = {"num_maps": k, "layer": layer, "num_layers": num_layers, "init": "identity",
              **base_report(command, config, fingerprint, train_data, val_data, result, initial, run,
                            model_parameters, data_seconds, eval_seconds, device)}
    trained = TransferMaps(model.transfer.weight.detach(), model.transfer.bias.detach(), layer)
    save_transfer_maps(config.output, trained, fingerprint, report, dtype=getattr(torch, config.save_dtype))
    write_report(config.report_path, report)
    config.resume_path.unlink(missing_ok=True)
    return TrainResult(config.output, result.top1, result.top10, result.loss, report["val_loss_initial"], run.losses,
                       data_seconds, run.train_seconds, eval_seconds, run.trainable_parameters, model_parameters,
                       report)
