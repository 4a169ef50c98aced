"""Batched decoding benchmark (`python -m tools batch-bench`): aggregate tokens/s and per-request latency
of runtime.BatchGenerator at several batch sizes, per method, on one backend in one run.

At batch size B a BatchGenerator with places for B sequences is loaded (on CUDA its static steps bind
B x max_context cells, so B is part of the engine, as it would be in a deployment) and `requests`
requests (default 2 B: requests join as others leave) are submitted at once and decoded to the end.
Figures per (method, B), medians over the repeats, the methods interleaved within each repeat (the
order reversed every other repeat):

    tokens_per_s        all new tokens / wall time from the first submit to the last token
    request_s_p50/p90   a request's wall time from submit to its last token (queueing included)
    tokens_per_step     new tokens per batched step over all running sequences (the batch's yield)
    accepted_per_seq    new tokens per step a sequence took part in (its prefill chunks included)

    vs_vanilla_paired   the median over repeats of tokens/s / vanilla's in the same repeat (runs adjacent
                        in time, so a slow spell of the machine hits both)

Every request's tokens are checked against the same method's tokens at B = 1 (batching is lossless:
tests/runtime/test_batch.py), and each method's against vanilla's (`identical_to_vanilla`).

A method named twice (`--methods vanilla,hybrid,vanilla`) runs twice, as separate generators labelled
`vanilla`, `vanilla#2`: an A/A control, whose spread is what the machine's noise alone makes of one
method against itself."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from tqdm import tqdm

from export.paths import DEFAULT_MODEL_DIR
from runtime.backends import DEFAULT_BACKEND, DEFAULT_DTYPE
from runtime.batch import BatchGenerator
from runtime.generator import DEFAULT_MAX_NEW_TOKENS
from tools.bench.prompts import load_prompts

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class BatchBenchConfig:
    prompts: str = "mtbench"
    methods: tuple[str, ...] = ("vanilla", "hybrid")
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    requests: int | None = None            # per batch size; default 2 B (at least the batch size)
    backend: str = DEFAULT_BACKEND
    device: str = "cpu"
    dtype: str = DEFAULT_DTYPE
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    model_dir: str = str(DEFAULT_MODEL_DIR)
    repeats: int = 3
    threads: int | None = None             # the backend's compute threads (None: its default)
    method_options: dict[str, dict] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.methods or not self.batch_sizes:
            raise ValueError("name at least one method and one batch size")
        if min(self.batch_sizes) < 1 or self.repeats < 1 or (self.requests is not None and self.requests < 1):
            raise ValueError("batch sizes, repeats and requests must be >= 1")
        if self.requests is not None and self.requests < max(self.batch_sizes):
            raise ValueError(f"--requests {self.requests} cannot fill a batch of {max(self.batch_sizes)}: give at "
                             "least the largest batch size")

    def request_count(self, batch: int) -> int:
        return self.requests or 2 * batch


@dataclass
class BatchRun:
    """One timed run of `requests` requests at one batch size."""
    seconds: float
    new_tokens: int
    steps: int                             # batched steps
    sequence_steps: int                    # sum over requests of the steps each took part in
    request_seconds: list[float]
    tokens: list[list[int]]                # per request, in submit order


def run_batch(batch: BatchGenerator, prompt_ids: Sequence[list[int]], max_new_tokens: int) -> BatchRun:
    """Submit every prompt at once and step until all are done."""
    steps_before = batch.steps
    start = time.perf_counter()
    requests = [batch.submit(ids, max_new_tokens=max_new_tokens) for ids in prompt_ids]
    finished: dict[int, float] = {}
    while batch.step():
        now = time.perf_counter()
        finished.update({r.id: now - start for r in requests if r.done and r.id not in finished})
    seconds = time.perf_counter() - start
    return BatchRun(seconds, sum(len(r.result.token_ids) for r in requests), batch.steps - steps_before,
                    sum(r.result.stats.steps for r in requests), [finished[r.id] for r in requests],
                    [r.result.token_ids for r in requests])


def summarise(method: str, batch: int, runs: list[BatchRun]) -> dict:
    first = runs[0]
    ordered = sorted(statistics.median(r.request_seconds[i] for r in runs) for i in range(len(first.tokens)))
    return {"method": method, "batch": batch, "requests": len(first.tokens),
            "tokens_per_s": statistics.median(r.new_tokens / r.seconds for r in runs),
            "tokens_per_s_repeats": [r.new_tokens / r.seconds for r in runs],
            "request_s_p50": statistics.median(ordered), "request_s_p90": ordered[math.ceil(0.9 * len(ordered)) - 1],
            "tokens_per_step": first.new_tokens / first.steps,
            "accepted_per_seq": first.new_tokens / first.sequence_steps,
            "deterministic": all(r.tokens == first.tokens for r in runs), "tokens": first.tokens}


def run_labels(methods: Sequence[str]) -> list[tuple[str, str]]:
    """(label, method) per entry of `methods`: a method's k-th mention is labelled "method#k" (k >= 2)."""
    labels = []
    for i, method in enumerate(methods):
        k = methods[:i].count(method) + 1
        labels.append((method if k == 1 else f"{method}#{k}", method))
    return labels


def run_batch_bench(cfg: BatchBenchConfig) -> dict:
    """Every (method, B): loaded once, `repeats` timed runs with the methods interleaved per repeat."""
    from runtime.prompting import encode_prompt

    items = load_prompts(cfg.prompts)
    labels = run_labels(cfg.methods)
    rows: dict[tuple[str, int], list[BatchRun]] = {}
    gens = {}
    with tqdm(total=len(cfg.batch_sizes) * len(labels) * (cfg.repeats + 1), desc="batch bench", unit="run") as bar:
        for b in cfg.batch_sizes:
            for label, method in labels:
                gens[label] = BatchGenerator.from_pretrained(
                    cfg.model_dir, methods=(method,), backend=cfg.backend, device=cfg.device, max_batch=b,
                    dtype=cfg.dtype, threads=cfg.threads, **cfg.method_options.get(method, {}))
            first = gens[labels[0][0]]
            count = cfg.request_count(b)
            prompts = [encode_prompt(first.tokenizer, items[i % len(items)].prompt, first.backend.info.vocab_size)
                       for i in range(count)]
            for label, _ in labels:   # warm-up: lazy allocation, CUDA graph capture
                run_batch(gens[label], prompts[:b], 4)
                bar.update()
            for repeat in range(cfg.repeats):
                # ABBA: the order flips each repeat, so a drift of the machine's speed favours no method
                for label, _ in labels if repeat % 2 == 0 else labels[::-1]:
                    rows.setdefault((label, b), []).append(run_batch(gens[label], prompts, cfg.max_new_tokens))
                    bar.update()
            for gen in gens.values():
                gen.close()
    results = [summarise(label, b, runs) for (label, b), runs in rows.items()]
    # Request i is prompt i at every B (the prompts cycle), so requests compare index for index.
    solo = {r["method"]: r["tokens"] for r in results if r["batch"] == min(cfg.batch_sizes)}
    vanilla = {r["batch"]: r for r in results if r["method"] == "vanilla"}
    for row in results:
        row["identical_to_smallest_batch"] = sum(a == b for a, b in zip(row["tokens"], solo[row["method"]]))
        base = vanilla.get(row["batch"])
        row["identical_to_vanilla"] = None if base is None else sum(
            a == b for a, b in zip(row["tokens"], base["tokens"]))
        row["vs_vanilla_paired"] = None if base is None else statistics.median(
            mine / theirs for mine, theirs in zip(row["tokens_per_s_repeats"], base["tokens_per_s_repeats"]))
    return {"config": {**cfg.__dict__, "methods": list(cfg.methods), "batch_sizes": list(cfg.batch_sizes)},
            "results": results}


def format_batch_table(report: dict) -> str:
    rows = report["results"]
    base = {r["method"]: r["tokens_per_s"] for r in rows if r["batch"] == min(x["batch"] for x in rows)}
    vanilla = {r["batch"]: r["tokens_per_s"] for r in rows if r["method"] == "vanilla"}
    lines = [f"{'method':<10} {'B':>3} {'req':>4} {'tok/s':>8} {'x B=1':>6} {'x van':>6} {'paired':>6} {'p50 s':>7} "
             f"{'p90 s':>7} {'tok/step':>8} {'acc/seq':>7} {'=B1':>5} {'=van':>5}"]
    for r in sorted(rows, key=lambda r: (r["batch"], r["method"])):
        versus = f"{r['tokens_per_s'] / vanilla[r['batch']]:.2f}" if r["batch"] in vanilla else "-"
        paired = "-" if r.get("vs_vanilla_paired") is None else f"{r['vs_vanilla_paired']:.2f}"
        same_vanilla = "-" if r["identical_to_vanilla"] is None else f"{r['identical_to_vanilla']}"
        lines.append(f"{r['method']:<10} {r['batch']:>3} {r['requests']:>4} {r['tokens_per_s']:>8.1f} "
                     f"{r['tokens_per_s'] / base[r['method']]:>6.2f} {versus:>6} {paired:>6} {r['request_s_p50']:>7.2f} "
                     f"{r['request_s_p90']:>7.2f} {r['tokens_per_step']:>8.2f} {r['accepted_per_seq']:>7.2f} "
                     f"{r['identical_to_smallest_batch']:>5} {same_vanilla:>5}")
    return "\n".join(lines)
