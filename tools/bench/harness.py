"""Benchmark harness: methods and peers on the same prompts, backend and machine, in one run.

Runs are labels `method@variant` (tools/bench/labels.py): `vanilla@fp32,ppd@int8,llamacpp@q8_0` runs our
fp32 and int8 onnxruntime engines next to llama.cpp's q8_0 in one interleaved run.

Two rates per run: tokens/s of the whole generation (prefill included, the number a user waits for) and
decode tokens/s (the tokens after the first over the time after it: what parallel decoding speeds up), with
the mean time to the first token beside it. Runs of one engine emit the same tokens, so both rates rank
them alike; engines of another quantization emit answers of other lengths, and there the whole-generation
rate mixes prefill speed into decoding speed (a prompt answered in 2 tokens is almost all prefill)."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from export.manifest import DEFAULT_MAX_CONTEXT
from export.paths import DEFAULT_MODEL_DIR
from export.quantize import DEFAULT_VARIANT
from runtime.backends import DEFAULT_BACKEND, DEFAULT_DTYPE
from tools.bench.labels import GREEDY_ONLY_PEERS, LLAMACPP, RunLabel, parse_label, parse_labels
from export.devices import device_name
from runtime.generator import DEFAULT_MAX_NEW_TOKENS, Generator
from runtime.prompting import prompt_text
from tools.bench.report import add_comparisons, failed_summary, summarise
from tools.bench.runs import PeerFailed, PromptRun, Runner
from tools.peers import hf, llamacpp, ortgenai
from tools.peers.llamacpp import onnxruntime_threads, wait_policy
from tools.peers.llamacpp_gguf import LLAMACPP_VERSION, require_llama_cpp
from tools.peers.process import PeerProcess
from tools.bench.prompts import PromptItem, load_prompts
from runtime.decoding import DecodingOptions

@dataclass(frozen=True)
class BenchConfig:
    prompts: str = "mtbench"
    methods: tuple[str, ...] = ("vanilla", "ngram")     # run labels, `method` or `method@variant`
    backend: str = DEFAULT_BACKEND
    device: str = "cpu"
    dtype: str = DEFAULT_DTYPE                           # torch backend precision (fp16 / bf16 on GPUs)
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    model_dir: str = str(DEFAULT_MODEL_DIR)
    limit: int | None = None
    repeats: int = 3
    method_options: dict[str, dict] = field(default_factory=dict)
    temperature: float = DecodingOptions.temperature   # 0 = greedy; else every method samples with one seed
    top_p: float = DecodingOptions.top_p
    top_k: int = DecodingOptions.top_k
    seed: int | None = DecodingOptions.seed            # sampling without a seed: one random seed for the run

    @property
    def decoding(self) -> DecodingOptions:
        return DecodingOptions(self.temperature, self.top_p, self.top_k, self.seed)

    @property
    def runs(self) -> tuple[RunLabel, ...]:
        return parse_labels(self.methods)

    def __post_init__(self) -> None:
        runs = self.runs  # ValueError naming a bad label and the choices
        if self.repeats < 1:
            raise ValueError("repeats must be >= 1")
        for run in runs:
            if not self.decoding.greedy and run.method in GREEDY_ONLY_PEERS:
                raise ValueError(f"the {run.method} peer runs greedy only: drop {run.label!r}, or benchmark with "
                                 "--temperature 0")
            if run.ours and run.variant != DEFAULT_VARIANT and self.backend != "onnxruntime":
                raise ValueError(f"bench run {run.label!r}: the {run.variant} variant is an onnxruntime engine; "
                                 f"use --backend onnxruntime (this run is on {self.backend})")
            if run.method == LLAMACPP and self.device != "cpu":
                raise ValueError(f"bench run {run.label!r}: the llama.cpp peer is built for the CPU only; use --device cpu")


def generator_runner(gen: Generator, max_new_tokens: int, decoding: DecodingOptions = DecodingOptions()) -> Runner:
    """Our generator on one prompt; under sampling every prompt uses decoding.seed, so methods compare
    token for token (lossless sampling emits what plain sampling emits)."""
    options = dataclasses.asdict(decoding)

    def run(prompt_ids: list[int]) -> PromptRun:
        result = gen.generate(prompt_ids, max_new_tokens=max_new_tokens, **options)
        stats = result.stats
        return PromptRun(result.token_ids, stats.steps, stats.seconds, stats.accepted_tokens, stats.first_token_seconds)
    return run


def make_runners(cfg: BenchConfig, decoding: DecodingOptions) -> tuple[dict[str, Runner], Generator]:
    """{label: runner} in the order listed, and the first generator (its tokenizer encodes the prompts).
    Peers each run in a process of their own (tools/peers/process.py)."""
    runners: dict[str, Runner] = {}
    first: Generator | None = None
    for run in cfg.runs:
        if run.ours:
            # variant= only off the default, so backends that predate variants still load fp32.
            variant = {} if run.variant == DEFAULT_VARIANT else {"variant": run.variant}
            gen = Generator.from_pretrained(cfg.model_dir, method=run.method, backend=cfg.backend, device=cfg.device,
                                            dtype=cfg.dtype, **variant, **cfg.method_options.get(run.method, {}))
            first = first or gen
            runners[run.label] = generator_runner(gen, cfg.max_new_tokens, decoding)
    if first is None:  # peers only: a vanilla generator still provides the tokenizer
        first = Generator.from_pretrained(cfg.model_dir, backend=cfg.backend, device=cfg.device, dtype=cfg.dtype)
    for run in cfg.runs:
        if not run.ours:
            runners[run.label] = start_peer(cfg, run, first.eos_token_ids, decoding)
    return {run.label: runners[run.label] for run in cfg.runs}, first


def start_peer(cfg: BenchConfig, run: RunLabel, eos_token_ids: Iterable[int], decoding: DecodingOptions) -> Runner:
    """The peer of `run` loaded in its own process (its crash is reported as its failure, PeerFailed); a
    peer whose process died while loading is a runner that fails at once."""
    if run.method == "ortgenai":
        if cfg.device != "cpu":
            raise ValueError("the ortgenai peer is built for the CPU only (its fp32 CPU export); use --device cpu")
        factory, kwargs = ortgenai.bench_runner, {"model_dir": cfg.model_dir, "max_new_tokens": cfg.max_new_tokens}
    elif run.method == LLAMACPP:
        require_llama_cpp()  # before any conversion: the error names `make peers`
        factory, kwargs = llamacpp.bench_runner, {
            "model_dir": cfg.model_dir, "gguf_type": run.variant, "threads": bench_threads(cfg.backend),
            "max_context": DEFAULT_MAX_CONTEXT, "eos_token_ids": sorted(eos_token_ids),
            "max_new_tokens": cfg.max_new_tokens}
    else:
        factory, kwargs = hf.bench_runner, {
            "model_dir": cfg.model_dir, "device": cfg.device, "max_new_tokens": cfg.max_new_tokens,
            "eos_token_id": min(eos_token_ids), "mode": run.method.removeprefix("hf-"), "decoding": decoding,
            "dtype": cfg.dtype}
    try:
        return PeerProcess(run.label, factory, kwargs)
    except PeerFailed as exc:
        return failed_runner(str(exc))


def failed_runner(reason: str) -> Runner:
    def run(prompt_ids: list[int]) -> PromptRun:
        raise PeerFailed(reason)
    return run


def bench_threads(backend: str) -> int:
    """The compute threads of our backend, which llama.cpp is given too: onnxruntime's intra-op pool (one per
    physical core, OrtOptions' default), torch's intra-op threads."""
    return onnxruntime_threads() if backend == "onnxruntime" else torch.get_num_threads()


def run_bench(cfg: BenchConfig, show_progress: bool = True) -> dict:
    items: list[PromptItem] = load_prompts(cfg.prompts, cfg.limit)
    decoding = cfg.decoding.with_seed()
    runners, gen = make_runners(cfg, decoding)
    try:
        encoded = [gen.encode(item.prompt) for item in items]
        llama = {label: runner for label, runner in runners.items()
                 if isinstance(runner, PeerProcess) and parse_label(label).method == LLAMACPP}
        failures = {} if not llama else check_llamacpp_prompts(
            llama, [prompt_text(gen.tokenizer, item.prompt) for item in items], encoded, [item.id for item in items])
        results, failed = run_interleaved({label: r for label, r in runners.items() if label not in failures}, encoded,
                                          cfg.repeats, show_progress=show_progress)
        failures.update(failed)
        report = {
            "model": cfg.model_dir,
            "backend": cfg.backend,
            "device": device_name(cfg.device),
            "dtype": cfg.dtype,
            "prompts": cfg.prompts,
            # a base model has no chat template: its prompts are the raw text (runtime/prompting.py)
            "prompt_format": "chat template" if gen.tokenizer.chat_template else "raw text (no chat template)",
            "max_new_tokens": cfg.max_new_tokens,
            "repeats": cfg.repeats,
            "decoding": dataclasses.asdict(decoding),
            "runs": [failed_summary(run, failures[run.label]) if run.label in failures
                     else summarise(run, items, results[run.label]) for run in cfg.runs],
        }
        if llama:
            report["llamacpp"] = {"version": LLAMACPP_VERSION, "threads": bench_threads(cfg.backend),
                                  "omp_wait_policy": wait_policy(),
                                  "gguf": {label: peer.call("gguf_path") for label, peer in llama.items()
                                           if label not in failures}}
    finally:
        for runner in runners.values():
            if isinstance(runner, PeerProcess):
                runner.close()
    add_comparisons(report)
    return report


def check_llamacpp_prompts(peers: dict[str, PeerProcess], texts: list[str], encoded: list[list[int]],
                           names: list[str]) -> dict[str, str]:
    """llama.cpp's own tokenizer must give our ids (else it decodes another input: TokenizationMismatch),
    checked before any timing; later differences are printed as a note. {label: why} of peers that died."""
    failures = {}
    for label, peer in peers.items():
        try:
            late = peer.call("check_prompts", texts, encoded, names)
        except PeerFailed as exc:
            failures[label] = str(exc)
            continue
        if late:
            print(f"note: llama.cpp's own tokenizer differs from ours late in {len(late)} of {len(texts)} prompts "
                  f"(it is fed our ids, so the input is the same):\n  " + "\n  ".join(late), file=sys.stderr)
    return failures


def run_interleaved(runners: dict[str, Runner], encoded: list[list[int]], repeats: int, desc: str = "bench",
                    show_progress: bool = True) -> tuple[dict[str, list[list[PromptRun]]], dict[str, str]]:
    """({label: [repeat][prompt] PromptRun}, {label: why it failed}). Each repeat runs every runner over all
    prompts in turn, so slow drifts of a shared machine hit all of them alike; one short warm-up run each
    first (allocator, thread pools, lazy init stay out of the figures). A runner that raises PeerFailed
    (its process died) is dropped from the rest of the run and reported; the others complete."""
    failures: dict[str, str] = {}

    def attempt(label: str, run: Runner, ids: list[int]) -> PromptRun | None:
        try:
            return run(ids)
        except PeerFailed as exc:
            failures[label] = str(exc)
            print(f"{label} failed, the other runs go on: {exc}", file=sys.stderr)
            return None

    for label, run in runners.items():
        attempt(label, run, encoded[0][:32])
    results: dict[str, list[list[PromptRun]]] = {label: [] for label in runners}
    with tqdm(total=repeats * len(runners) * len(encoded), desc=desc, disable=not show_progress) as bar:
        for _ in range(repeats):
            for label, run in runners.items():
                runs = []
                for ids in encoded:
                    if label not in failures:
                        runs.append(attempt(label, run, ids))
                    bar.update()
                results[label].append(runs)
    return {label: reps for label, reps in results.items() if label not in failures}, failures
