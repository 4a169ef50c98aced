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
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from export.manifest import DEFAULT_MAX_CONTEXT
from export.paths import DEFAULT_MODEL_DIR
from export.quantize import DEFAULT_VARIANT
from runtime.backends import DEFAULT_BACKEND, DEFAULT_DTYPE
from tools.bench.labels import GREEDY_ONLY_PEERS, LLAMACPP, RunLabel, parse_labels, speed_baseline, token_baseline
from export.devices import device_name
from runtime.generator import DEFAULT_MAX_NEW_TOKENS, Generator
from tools.peers.llamacpp_gguf import LLAMACPP_VERSION, ensure_gguf, require_llama_cpp
from tools.peers.llamacpp import LlamaCppPeer, check_tokenization, onnxruntime_threads, wait_policy
from tools.bench.prompts import PromptItem, load_prompts
from runtime.decoding import DecodingOptions
from trees.atomic import write_atomic

HF_PROMPT_LOOKUP_TOKENS = 10


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


@dataclass
class PromptRun:
    token_ids: list[int]
    steps: int | None                  # forward passes, prefill included; None where the peer hides them
    seconds: float
    accepted_tokens: int | None = None  # tokens the steps produced, before truncation (our generators only)
    first_token_seconds: float | None = None  # until the first new token (the prefill); None where a peer hides it


Runner = Callable[[list[int]], PromptRun]


def generator_runner(gen: Generator, max_new_tokens: int, decoding: DecodingOptions = DecodingOptions()) -> Runner:
    """Our generator on one prompt; under sampling every prompt uses decoding.seed, so methods compare
    token for token (lossless sampling emits what plain sampling emits)."""
    options = dataclasses.asdict(decoding)

    def run(prompt_ids: list[int]) -> PromptRun:
        result = gen.generate(prompt_ids, max_new_tokens=max_new_tokens, **options)
        stats = result.stats
        return PromptRun(result.token_ids, stats.steps, stats.seconds, stats.accepted_tokens, stats.first_token_seconds)
    return run


def hf_runner(model, max_new_tokens: int, eos_token_id: int, prompt_lookup: bool,
              decoding: DecodingOptions = DecodingOptions()) -> Runner:
    """transformers `generate`; under sampling with its own sampler (seeded per prompt with decoding.seed,
    so its tokens are not ours: only its speed compares)."""
    extra = {"prompt_lookup_num_tokens": HF_PROMPT_LOOKUP_TOKENS} if prompt_lookup else {}
    if not decoding.greedy:
        extra.update(do_sample=True, temperature=decoding.temperature, top_p=decoding.top_p, top_k=decoding.top_k)

    @torch.inference_mode()
    def run(prompt_ids: list[int]) -> PromptRun:
        ids = torch.tensor([prompt_ids], device=model.device)
        if not decoding.greedy:
            torch.manual_seed(decoding.seed)
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=not decoding.greedy, pad_token_id=eos_token_id, eos_token_id=eos_token_id,
                             **extra)
        seconds = time.perf_counter() - start
        new = out[0, len(prompt_ids):].tolist()
        # Without prompt lookup, HF decodes one token per forward after prefill.
        return PromptRun(new, None if prompt_lookup else len(new), seconds)
    return run


def make_runners(cfg: BenchConfig, decoding: DecodingOptions) -> tuple[dict[str, Runner], Generator]:
    """{label: runner} in the order listed, and the first generator (its tokenizer encodes the prompts)."""
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
    hf = None
    for run in cfg.runs:
        if run.method == "ortgenai":
            runners[run.label] = ortgenai_bench_runner(cfg)
        elif run.method == LLAMACPP:
            runners[run.label] = LlamaCppBenchRunner.load(cfg, run.variant, first.eos_token_ids)
        elif run.method.startswith("hf-"):
            if hf is None:
                from transformers import LlamaForCausalLM

                hf = LlamaForCausalLM.from_pretrained(cfg.model_dir, dtype=torch.float32).to(cfg.device).eval()
            runners[run.label] = hf_runner(hf, cfg.max_new_tokens, first.tokenizer.eos_token_id,
                                           run.method == "hf-prompt-lookup", decoding)
    return {run.label: runners[run.label] for run in cfg.runs}, first


def ortgenai_bench_runner(cfg: BenchConfig) -> Runner:
    """onnxruntime-genai greedy on its own fp32 CPU export of the model (the anchor of our ORT backend)."""
    from tools.peers import ortgenai as ortgenai_peer

    if cfg.device != "cpu":
        raise ValueError("the ortgenai peer is built for the CPU only (its fp32 CPU export); use --device cpu")
    run = ortgenai_peer.ortgenai_runner(cfg.model_dir, cfg.max_new_tokens)

    def bench_run(prompt_ids: list[int]) -> PromptRun:
        tokens, seconds = run(prompt_ids)
        return PromptRun(tokens, len(tokens), seconds)  # one token per forward after the prefill
    return bench_run


@dataclass
class LlamaCppBenchRunner:
    """llama.cpp greedy on one GGUF type of the model, with our thread count, context and EOS ids."""

    peer: LlamaCppPeer
    gguf_type: str
    max_new_tokens: int

    @classmethod
    def load(cls, cfg: BenchConfig, gguf_type: str, eos_token_ids: Iterable[int]) -> "LlamaCppBenchRunner":
        require_llama_cpp()  # before any conversion: the error names `make peers`
        threads = bench_threads(cfg.backend)
        path = ensure_gguf(cfg.model_dir, gguf_type, threads)
        return cls(LlamaCppPeer(path, threads, DEFAULT_MAX_CONTEXT, eos_token_ids), gguf_type, cfg.max_new_tokens)

    def check_prompts(self, texts: list[str], encoded: list[list[int]], names: list[str]) -> None:
        late = check_tokenization(self.peer.tokenize, texts, encoded, names)
        if late:
            print(f"note: llama.cpp's own tokenizer differs from ours late in {len(late)} of {len(texts)} prompts "
                  f"(it is fed our ids, so the input is the same):\n  " + "\n  ".join(late), file=sys.stderr)

    def __call__(self, prompt_ids: list[int]) -> PromptRun:
        out = self.peer.generate(prompt_ids, self.max_new_tokens)
        # one token per forward, the prefill's included
        return PromptRun(out.tokens, len(out.tokens), out.seconds, first_token_seconds=out.first_token_seconds)


def bench_threads(backend: str) -> int:
    """The compute threads of our backend, which llama.cpp is given too: onnxruntime's intra-op pool (one per
    physical core, OrtOptions' default), torch's intra-op threads."""
    return onnxruntime_threads() if backend == "onnxruntime" else torch.get_num_threads()


def prompt_text(tokenizer, prompt: str) -> str:
    """The text Generator.encode tokenizes for a string prompt: one user turn in the chat template. (The
    llama.cpp check compares its ids of this text with Generator.encode's, so a drift here fails loudly.)"""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def run_bench(cfg: BenchConfig, show_progress: bool = True) -> dict:
    items: list[PromptItem] = load_prompts(cfg.prompts, cfg.limit)
    decoding = cfg.decoding.with_seed()
    runners, gen = make_runners(cfg, decoding)
    encoded = [gen.encode(item.prompt) for item in items]
    for runner in runners.values():
        if isinstance(runner, LlamaCppBenchRunner):  # its own tokenizer must give our ids, before any timing
            runner.check_prompts([prompt_text(gen.tokenizer, item.prompt) for item in items], encoded,
                                 [item.id for item in items])
    results = run_interleaved(runners, encoded, cfg.repeats, show_progress=show_progress)
    report = {
        "model": cfg.model_dir,
        "backend": cfg.backend,
        "device": device_name(cfg.device),
        "dtype": cfg.dtype,
        "prompts": cfg.prompts,
        "max_new_tokens": cfg.max_new_tokens,
        "repeats": cfg.repeats,
        "decoding": dataclasses.asdict(decoding),
        "runs": [summarise(run, items, results[run.label]) for run in cfg.runs],
    }
    peers = {label: r for label, r in runners.items() if isinstance(r, LlamaCppBenchRunner)}
    if peers:
        report["llamacpp"] = {"version": LLAMACPP_VERSION, "threads": bench_threads(cfg.backend),
                              "omp_wait_policy": wait_policy(),
                              "gguf": {label: str(r.peer.gguf_path) for label, r in peers.items()}}
    add_comparisons(report)
    return report


def run_interleaved(runners: dict[str, Runner], encoded: list[list[int]], repeats: int, desc: str = "bench",
                    show_progress: bool = True) -> dict[str, list[list[PromptRun]]]:
    """{label: [repeat][prompt] PromptRun}. Each repeat runs every runner over all prompts in turn, so slow
    drifts of a shared machine hit all of them alike; one short warm-up run each first (allocator, thread
    pools, lazy init stay out of the figures)."""
    for run in runners.values():
        run(encoded[0][:32])
    results: dict[str, list[list[PromptRun]]] = {label: [] for label in runners}
    with tqdm(total=repeats * len(runners) * len(encoded), desc=desc, disable=not show_progress) as bar:
        for _ in range(repeats):
            for label, run in runners.items():
                runs = []
                for ids in encoded:
                    runs.append(run(ids))
                    bar.update()
                results[label].append(runs)
    return results


def tokens_per_s_per_repeat(reps: list[list[PromptRun]]) -> list[float]:
    """Generated tokens over generation seconds, all prompts of a repeat together, per repeat."""
    return [sum(len(r.token_ids) for r in runs) / sum(r.seconds for r in runs) for runs in reps]


def decode_tokens_per_s_per_repeat(reps: list[list[PromptRun]]) -> list[float] | None:
    """The decode phase alone, per repeat: tokens after each prompt's first over the time after it. Engines
    whose greedy outputs differ in length (another quantization) compare here: in the whole-generation rate
    a prompt answered in 2 tokens weighs its prefill, not its decoding. None where a runner hides its prefill."""
    if any(r.first_token_seconds is None for runs in reps for r in runs):
        return None
    rates = []
    for runs in reps:
        seconds = sum(r.seconds - r.first_token_seconds for r in runs)
        rates.append(sum(len(r.token_ids) - 1 for r in runs) / seconds if seconds > 0 else 0.0)
    return rates


def median_tokens_per_s(reps: list[list[PromptRun]]) -> float:
    return statistics.median(tokens_per_s_per_repeat(reps))


def accepted_interval(tokens: list[int], steps: list[int], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % bootstrap interval of mean accepted tokens per step (all tokens / all steps) over the prompts:
    how far another draw of as many prompts could move it. With 20 prompts a hybrid tree's spans ~±10 %:
    its n-gram part hits on some answers and not on others."""
    tokens_, steps_ = np.asarray(tokens, dtype=np.float64), np.asarray(steps, dtype=np.float64)
    draws = np.random.default_rng(seed).integers(0, len(tokens_), size=(resamples, len(tokens_)))
    means = tokens_[draws].sum(axis=1) / steps_[draws].sum(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def summarise(run: RunLabel, items: list[PromptItem], reps: list[list[PromptRun]]) -> dict:
    per_repeat, decode_per_repeat = tokens_per_s_per_repeat(reps), decode_tokens_per_s_per_repeat(reps)
    first = reps[0]
    first_token = None if decode_per_repeat is None else [  # per prompt, median over repeats
        statistics.median(runs[i].first_token_seconds for runs in reps) for i in range(len(first))]
    steps = [r.steps for r in first]
    tokens = [len(r.token_ids) for r in first]
    mean_accepted = None if None in steps else sum(tokens) / sum(steps)
    return {
        "label": run.label,
        "method": run.method,
        "variant": run.variant,
        "tokens_per_s": statistics.median(per_repeat),
        "tokens_per_s_repeats": per_repeat,
        "decode_tokens_per_s": None if decode_per_repeat is None else statistics.median(decode_per_repeat),
        "decode_tokens_per_s_repeats": decode_per_repeat,
        "mean_first_token_s": None if first_token is None else statistics.fmean(first_token),
        "mean_accepted": mean_accepted,
        "mean_accepted_ci95": None if mean_accepted is None else accepted_interval(tokens, steps),
        "deterministic": all([r.token_ids for r in runs] == [r.token_ids for r in first] for runs in reps),
        "prompts": [
            {"id": item.id, "token_ids": r.token_ids, "steps": r.steps,
             "seconds": statistics.median(runs[i].seconds for runs in reps),
             "first_token_seconds": None if first_token is None else first_token[i]}
            for i, (item, r) in enumerate(zip(items, first))
        ],
    }


def add_comparisons(report: dict) -> None:
    """Per run: speedup_vs_vanilla against the first vanilla listed; matches_vanilla (prompts with identical
    tokens) against matches_vanilla_of, the vanilla of the run's own precision when it ran, else the first
    vanilla (tools/bench/labels.py). All None without a vanilla in the run."""
    by_label = {r["label"]: r for r in report["runs"]}
    labels = [RunLabel(r["label"], r["method"], r["variant"]) for r in report["runs"]]
    speed = speed_baseline(labels)
    for label in labels:
        run = by_label[label.label]
        tokens = token_baseline(label, labels)
        if speed is None or tokens is None:
            run["speedup_vs_vanilla"] = run["decode_speedup_vs_vanilla"] = None
            run["matches_vanilla"] = run["matches_vanilla_of"] = None
            continue
        base_speed = by_label[speed.label]
        run["speedup_vs_vanilla"] = run["tokens_per_s"] / base_speed["tokens_per_s"]
        decode = run.get("decode_tokens_per_s"), base_speed.get("decode_tokens_per_s")
        run["decode_speedup_vs_vanilla"] = None if None in decode or not decode[1] else decode[0] / decode[1]
        base = by_label[tokens.label]
        run["matches_vanilla"] = sum(a["token_ids"] == b["token_ids"] for a, b in zip(run["prompts"], base["prompts"]))
        run["matches_vanilla_of"] = tokens.label


def format_table(report: dict) -> str:
    n = len(report["runs"][0]["prompts"]) if report["runs"] else 0
    d = report.get("decoding") or {}
    mode = "greedy" if not d.get("temperature") else (f"sampling (temperature {d['temperature']}, top-p {d['top_p']}, "
                                                     f"top-k {d['top_k']}, seed {d['seed']})")
    threads = f", llama.cpp on {report['llamacpp']['threads']} threads" if "llamacpp" in report else ""
    speed_base = next((r.get("label", "vanilla") for r in report["runs"] if r["method"] == "vanilla"), "vanilla")
    lines = [f"{report['prompts']} x {n} prompts, {report['max_new_tokens']} new tokens, backend {report['backend']}, "
             f"{report['device']}{threads}, {mode}, median of {report['repeats']} repeats; speedup vs {speed_base}",
             f"{'run':<20}{'tokens/s':>10}{'accepted/step':>15}{'speedup':>9}{'decode tok/s':>14}{'speedup':>9}"
             f"{'1st token':>11}{'same tokens as':>26}"]
    for r in report["runs"]:  # reports written before labels (gpu_check reads old ones) have method only
        acc = "-" if r["mean_accepted"] is None else f"{r['mean_accepted']:.2f}"
        speed = "-" if r["speedup_vs_vanilla"] is None else f"{r['speedup_vs_vanilla']:.2f}x"
        same = "-" if r["matches_vanilla"] is None else f"{r.get('matches_vanilla_of', 'vanilla')} {r['matches_vanilla']}/{n}"
        decode = "-" if r.get("decode_tokens_per_s") is None else f"{r['decode_tokens_per_s']:.1f}"
        decode_speed = "-" if r.get("decode_speedup_vs_vanilla") is None else f"{r['decode_speedup_vs_vanilla']:.2f}x"
        first = "-" if r.get("mean_first_token_s") is None else f"{r['mean_first_token_s'] * 1e3:.0f} ms"
        lines.append(f"{r.get('label', r['method']):<20}{r['tokens_per_s']:>10.1f}{acc:>15}{speed:>9}{decode:>14}"
                     f"{decode_speed:>9}{first:>11}{same:>26}")
    return "\n".join(lines)


def write_report(report: dict, path: str | Path) -> None:
    write_atomic(path, json.dumps(report, indent=1))
