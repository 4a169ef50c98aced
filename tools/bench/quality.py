"""Quality of the quantized engines against fp32: the vanilla onnxruntime engine dir of
each variant (export/engine.py engine_dir: <model>/cpu/vanilla, vanilla-int8, vanilla-int4), measured on
the same token ids.

    perplexity   teacher-forced, on the first N ShareGPT validation conversations (file order), each
                 chat-template formatted as a whole and cut to its first L tokens: one prefill step per
                 sequence on a fresh cache, NLL of every next token from that step's logits (float64
                 log-softmax); perplexity = exp(total NLL / total predicted tokens)
    agreement    the first P MT-Bench and first P HumanEval prompts, M greedy new tokens with vanilla on
                 each variant: how many equal fp32's exactly, and the mean length of the common prefix

    report = measure_quality(QualityConfig(variants=("fp32", "int4")))
    print(format_table(report)); write_json(path, report.to_json())

A quality measurement, not a speed one: nothing here is timed.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from export.engine import CPU_TARGET, engine_dir
from export.manifest import MANIFEST_NAME, Manifest
from export.paths import ARTIFACTS_DIR, DEFAULT_MODEL_DIR
from export.quantize import DEFAULT_VARIANT, VARIANTS, check_variant
from runtime.backends import Backend
from runtime.draft import Draft
from runtime.generator import Generator
from tools.bench.prompts import PromptItem, load_prompts

METHOD = "vanilla"                   # the engine graph measured, and the decoding of the agreement check
REFERENCE = DEFAULT_VARIANT          # fp32: what every variant is compared with
DEFAULT_REPORT = ARTIFACTS_DIR / "quality" / "report.json"
Messages = Sequence[dict[str, str]]  # one conversation as chat-template messages


class QualityError(ValueError):
    """A quality run that cannot be done as asked (bad config, token ids differing between variants)."""


class EngineMissingError(FileNotFoundError):
    """The engine dir of a variant is not built yet."""


@dataclass(frozen=True)
class QualityConfig:
    """The one home of the quality run's defaults (the CLI's flags map to these fields)."""

    variants: tuple[str, ...] = VARIANTS          # engine variants measured; fp32 (the reference) must be one
    model_dir: Path = DEFAULT_MODEL_DIR           # the checkpoint whose vanilla engine dirs are measured
    num_sequences: int = 50                       # N: ShareGPT validation conversations for the perplexity
    max_tokens: int = 256                         # L: each conversation cut to its first L tokens
    prompts: int = 20                             # P: first P prompts of each prompt set
    prompt_sets: tuple[str, ...] = ("mtbench", "humaneval")
    max_new_tokens: int = 64                      # M: greedy new tokens per prompt

    def __post_init__(self) -> None:
        for variant in self.variants:
            check_variant(variant)
        if REFERENCE not in self.variants:
            raise QualityError(f"variants {list(self.variants)} lack {REFERENCE}, the reference every variant is "
                               f"compared with: add it (e.g. --variants {REFERENCE},{','.join(self.variants)})")
        if len(set(self.variants)) != len(self.variants):
            raise QualityError(f"variants {list(self.variants)} name one variant twice: list each once")
        counts = {"num_sequences": self.num_sequences, "prompts": self.prompts, "max_new_tokens": self.max_new_tokens}
        for name, value in counts.items():
            if value < 1:
                raise QualityError(f"{name} must be >= 1, got {value}")
        if self.max_tokens < 2:
            raise QualityError(f"max_tokens must be >= 2 (a sequence needs a token to predict), got {self.max_tokens}")


@dataclass(frozen=True)
class VariantQuality:
    """What one variant's engine produced: per-sequence NLL and the greedy outputs."""

    variant: str
    engine_dir: str
    onnx_sha256: str
    weight_bytes: int                           # model.onnx + its external data (the manifest's file records)
    sequence_nll: tuple[float, ...]             # [N] summed NLL of each sequence's predicted tokens (nats)
    sequence_tokens: tuple[int, ...]            # [N] predicted tokens per sequence (its length - 1)
    outputs: tuple[tuple[int, ...], ...]        # [P] greedy new tokens per prompt (shorter when EOS came first)

    @property
    def predicted_tokens(self) -> int:
        return sum(self.sequence_tokens)

    @property
    def perplexity(self) -> float:
        return math.exp(sum(self.sequence_nll) / self.predicted_tokens)


@dataclass(frozen=True)
class Agreement:
    """A variant's greedy outputs against the reference's, prompt by prompt."""

    common_prefix: tuple[int, ...]   # [P] tokens both produced before the first difference
    identical: int                   # prompts whose whole outputs are equal

    @property
    def prompts(self) -> int:
        return len(self.common_prefix)

    @property
    def mean_common_prefix(self) -> float:
        return sum(self.common_prefix) / self.prompts


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def agreement(outputs: Sequence[Sequence[int]], reference: Sequence[Sequence[int]]) -> Agreement:
    if len(outputs) != len(reference):
        raise QualityError(f"{len(outputs)} outputs against {len(reference)} reference outputs: measure the same prompts")
    return Agreement(tuple(common_prefix(o, r) for o, r in zip(outputs, reference)),
                     sum(list(o) == list(r) for o, r in zip(outputs, reference)))


@dataclass(frozen=True)
class QualityReport:
    config: QualityConfig
    prompt_ids: tuple[str, ...]                 # [P * sets] the prompts of the agreement check, in order
    variants: tuple[VariantQuality, ...]        # in config.variants order
    created: str                                # UTC date and time of the run

    def result(self, variant: str) -> VariantQuality:
        found = [v for v in self.variants if v.variant == variant]
        if not found:
            raise QualityError(f"no {variant} in this report (it has {', '.join(v.variant for v in self.variants)})")
        return found[0]

    def agreement(self, variant: str) -> Agreement:
        return agreement(self.result(variant).outputs, self.result(REFERENCE).outputs)

    def to_json(self) -> dict:
        reference = self.result(REFERENCE)
        rows = []
        for v in self.variants:
            agree = self.agreement(v.variant)
            rows.append({**dataclasses.asdict(v), "predicted_tokens": v.predicted_tokens, "perplexity": v.perplexity,
                         "perplexity_delta": v.perplexity - reference.perplexity, "identical_outputs": agree.identical,
                         "common_prefix": list(agree.common_prefix), "mean_common_prefix": agree.mean_common_prefix})
        config = {**dataclasses.asdict(self.config), "model_dir": str(self.config.model_dir), "method": METHOD,
                  "reference": REFERENCE}
        return {"format": "ppdeploy-quality", "created": self.created, "config": config,
                "prompt_ids": list(self.prompt_ids), "variants": rows}


# --- inputs ------------------------------------------------------------------------------------------

def sharegpt_validation(count: int, path: str | Path | None = None) -> list[list[dict[str, str]]]:
    """The first `count` ShareGPT validation conversations in file order that keep at least one turn
    (train/sharegpt.py chat_messages drops turns of unknown roles or without text)."""
    from train.sharegpt import chat_messages, load_sharegpt, sharegpt_split

    conversations = load_sharegpt(path)
    chats = (chat_messages(conversations[i]) for i in sharegpt_split(conversations)["validation"])
    chosen = [m for m in chats if m][:count]
    if len(chosen) < count:
        raise QualityError(f"the ShareGPT validation split has only {len(chosen)} non-empty conversations; "
                           f"ask for at most that many (--num-sequences {len(chosen)})")
    return chosen


def benchmark_prompts(config: QualityConfig) -> list[PromptItem]:
    """The first config.prompts prompts of each set, set by set."""
    return [item for name in config.prompt_sets for item in load_prompts(name, limit=config.prompts)]


def engine_dirs(config: QualityConfig) -> dict[str, Path]:
    """The built vanilla engine dir of each variant (export/engine.py's layout); every missing one is
    named at once, with the make command that builds it."""
    dirs = {variant: engine_dir(config.model_dir, CPU_TARGET, METHOD, variant) for variant in config.variants}
    missing = [f"no {variant} {METHOD} engine at {directory} (no {MANIFEST_NAME}): build it with "
               f"`make engine GPU={CPU_TARGET} QUANT={variant}`"
               for variant, directory in dirs.items() if not (directory / MANIFEST_NAME).is_file()]
    if missing:
        raise EngineMissingError("; ".join(missing))
    return dirs


def conversation_ids(generator: Generator, conversations: Sequence[Messages], max_tokens: int) -> list[list[int]]:
    """Each whole conversation through the engine's chat template (no generation prompt), cut to max_tokens."""
    tokenizer = generator.tokenizer
    texts = [tokenizer.apply_chat_template(list(m), tokenize=False, add_generation_prompt=False) for m in conversations]
    return [tokenizer(text, add_special_tokens=False).input_ids[:max_tokens] for text in texts]


def check_same_ids(variant: str, what: str, ids: list[list[int]], reference: list[list[int]] | None) -> None:
    """Every variant must score and decode the very token ids fp32 did (its tokenizer files are copies)."""
    if reference is None or ids == reference:
        return
    first = next(i for i, (a, b) in enumerate(zip(ids, reference)) if a != b) if len(ids) == len(reference) else 0
    raise QualityError(f"the {variant} engine's tokenizer gives other token ids than {REFERENCE}'s for {what} "
                       f"(first at item {first}): its tokenizer files differ from the fp32 dir's; rebuild it "
                       f"(`make engine GPU={CPU_TARGET} QUANT={variant}`)")


# --- measuring ---------------------------------------------------------------------------------------

def sequence_nll(backend: Backend, ids: Sequence[int]) -> float:
    """Summed NLL (nats) of ids[1:] given their prefixes: one prefill step on a fresh cache."""
    backend.reset()
    logits = backend.step(Draft.prefill(ids)).logits                   # [T, V]; row i predicts ids[i + 1]
    logp = torch.log_softmax(logits[:-1].to(torch.float64), dim=-1)    # [T-1, V]
    target = torch.as_tensor(ids[1:], dtype=torch.int64, device=logp.device)[:, None]  # [T-1, 1]
    return float(-logp.gather(1, target).sum())


def measure_variant(generator: Generator, variant: str, sequences: list[list[int]], prompts: list[list[int]],
                    max_new_tokens: int, progress: tqdm) -> tuple[tuple[float, ...], tuple[tuple[int, ...], ...]]:
    """([N] per-sequence NLL, [P] greedy outputs) of one variant's engine."""
    progress.set_description(f"{variant} perplexity")
    nlls = []
    for ids in sequences:
        nll = sequence_nll(generator.backend, ids)
        if not math.isfinite(nll):
            raise QualityError(f"the {variant} engine gives a non-finite NLL ({nll}) on a sequence of {len(ids)} "
                               f"tokens: its logits hold inf/nan; rebuild it (`make engine GPU={CPU_TARGET} "
                               f"QUANT={variant}`)")
        nlls.append(nll)
        progress.update()
    progress.set_description(f"{variant} greedy")
    outputs = []
    for ids in prompts:
        outputs.append(tuple(generator.generate(ids, max_new_tokens=max_new_tokens).token_ids))
        progress.update()
    return tuple(nlls), tuple(outputs)


def measure_quality(config: QualityConfig = QualityConfig(), conversations: Sequence[Messages] | None = None,
                    prompts: Sequence[PromptItem] | None = None, show_progress: bool = True) -> QualityReport:
    """Perplexity and greedy agreement of every variant in `config`. `conversations` (default: the first
    config.num_sequences ShareGPT validation ones) and `prompts` (default: config.prompts of each set)
    may be given instead; every engine dir is checked before any work."""
    dirs = engine_dirs(config)
    conversations = sharegpt_validation(config.num_sequences) if conversations is None else list(conversations)
    prompts = benchmark_prompts(config) if prompts is None else list(prompts)
    if not conversations or not prompts:
        raise QualityError(f"nothing to measure: {len(conversations)} conversations, {len(prompts)} prompts")
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    order = sorted(config.variants, key=lambda v: v != REFERENCE)   # fp32 first: the ids every variant must match
    reference_ids: dict[str, list[list[int]] | None] = {"sequences": None, "prompts": None}
    results = {}
    with tqdm(total=len(order) * (len(conversations) + len(prompts)), desc="quality", unit="item",
              disable=not show_progress) as progress:
        for variant in order:
            generator = Generator.from_engine(dirs[variant], method=METHOD, variant=variant)
            ids = {"sequences": conversation_ids(generator, conversations, config.max_tokens),
                   "prompts": [generator.encode(item.prompt) for item in prompts]}
            for what, have in ids.items():
                check_same_ids(variant, what, have, reference_ids[what])
                reference_ids[what] = have
            nlls, outputs = measure_variant(generator, variant, ids["sequences"], ids["prompts"],
                                            config.max_new_tokens, progress)
            manifest = Manifest.load(dirs[variant], verify_files=False)   # the backend hashed the graph it runs
            results[variant] = VariantQuality(
                variant, str(dirs[variant]), manifest.onnx.sha256,
                manifest.onnx.size + sum(r.size for r in manifest.external_data), nlls,
                tuple(len(s) - 1 for s in ids["sequences"]), outputs)
            del generator   # one engine session at a time
    return QualityReport(config, tuple(item.id for item in prompts),
                         tuple(results[v] for v in config.variants), created)


def format_table(report: QualityReport) -> str:
    """The markdown table: variant | weight bytes | perplexity | Δ vs fp32 | identical outputs | mean common prefix."""
    reference = report.result(REFERENCE)
    new = report.config.max_new_tokens
    lines = [f"| variant | weight bytes | perplexity | Δ vs {REFERENCE} | identical {new}-token outputs "
             f"/{len(report.prompt_ids)} | mean common prefix |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for v in report.variants:
        agree = report.agreement(v.variant)
        delta = v.perplexity - reference.perplexity
        shown = "—" if v.variant == REFERENCE else f"{delta:+.3f} ({delta / reference.perplexity:+.2%})"
        lines.append(f"| {v.variant} | {v.weight_bytes / 1e6:.1f} MB | {v.perplexity:.3f} | {shown} | "
                     f"{agree.identical} | {agree.mean_common_prefix:.1f} |")
    return "\n".join(lines)
