"""python -m tools {generate,demo,bench,batch-bench,memory,quality,floor,breakdown,trees,serve,latency-test,
latency-baseline}: a thin CLI over runtime.Generator, tools.bench.harness, tools.bench.memory, tools.bench.quality (the
quantized engines against fp32), tools.latency.floor and tools.latency.breakdown (where a CPU step goes),
the tree search (`python -m tools trees --help`, tools/treesearch/cli.py), the OpenAI-compatible server
(`python -m tools serve --help`, tools/serving/cli.py) and the latency regression test per device
(tools/latency/cli.py).

Each command's flags are the fields of its config dataclass below (trees/config_args.py), and every
default is read from the library: the model dir from export.paths, the backend from runtime.backends,
the budgets from runtime.generator and export.manifest, the decoding options from
runtime.decoding.DecodingOptions, the benchmark's from tools.bench.harness.BenchConfig, the quality run's from
tools.bench.quality.QualityConfig.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from export.checkpoint import CheckpointError
from export.manifest import DEFAULT_MAX_CONTEXT
from export.methods import METHODS
from export.paths import DEFAULT_MODEL_DIR
from export.quantize import DEFAULT_VARIANT, VARIANTS
from runtime.backends import DEFAULT_BACKEND, DEFAULT_DTYPE, DTYPES
from runtime.loading import BACKENDS
from tools.bench.batch import DEFAULT_BATCH_SIZES, BatchBenchConfig, format_batch_table, run_batch_bench
from tools.bench.harness import BenchConfig, run_bench
from tools.bench.report import format_table, write_report
from tools.bench.labels import label_choices
from export.devices import device_name
from tools.parity.cli import add_check_command
from tools.latency.cli import LatencyBaselineCommand, LatencyTestCommand, cmd_latency_baseline, cmd_latency_test
from runtime.generator import DEFAULT_DEVICE, DEFAULT_MAX_NEW_TOKENS, DEFAULT_METHOD, Generator, Result
from tools.bench.quality import DEFAULT_REPORT, QualityConfig, measure_quality
from tools.bench.prompts import PROMPTS_HELP
from tools.bench.quality import format_table as quality_table
from tools.recommended import FASTEST_BACKEND, FASTEST_METHOD
from runtime.decoding import DecodingOptions
from trees._json import write_json
from trees.config_args import add_config_command, config_from_args, exit_code_of, option, parse_options

DEMO_PROMPT = "Write a Python function that returns the n-th Fibonacci number, then explain how it works."


# --- configs: one per command, mapped to argparse ---------------------------------------------------

@dataclass(frozen=True)
class ModelOptions:
    """What every command shares: which model, where it runs, how many tokens."""
    model: str = option(str(DEFAULT_MODEL_DIR), "checkpoint dir of a supported family (`python -m export model`)")
    backend: str = option(DEFAULT_BACKEND, "backend that runs the model", choices=tuple(BACKENDS))
    device: str = option(DEFAULT_DEVICE, "cpu or cuda")
    max_new_tokens: int = option(DEFAULT_MAX_NEW_TOKENS, "new tokens per prompt")


@dataclass(frozen=True)
class DecodingFlags:
    """How tokens are chosen (runtime.decoding.DecodingOptions): greedy, or exact sampling."""
    temperature: float = option(DecodingOptions.temperature, "0 = greedy; > 0 samples (lossless: for a seed, "
                                                             "every method emits what plain sampling emits)")
    top_p: float = option(DecodingOptions.top_p, "sampling: nucleus mass kept (1 = off)")
    top_k: int = option(DecodingOptions.top_k, "sampling: most likely tokens kept (0 = off)")
    seed: int | None = option(DecodingOptions.seed, "sampling: the random stream's key (default: a random one)")

    def decoding(self) -> DecodingOptions:
        """The decoding options, validated (ValueError names the bad one)."""
        return DecodingOptions(self.temperature, self.top_p, self.top_k, self.seed)


@dataclass(frozen=True)
class GenerateFlags(ModelOptions, DecodingFlags):
    method: str = option(DEFAULT_METHOD, "decoding method", choices=tuple(METHODS))
    max_context: int = option(DEFAULT_MAX_CONTEXT, "cache entries: prompt + new tokens must fit")
    dtype: str = option(DEFAULT_DTYPE, "torch backend precision (fp16 / bf16 for GPUs)", choices=DTYPES)
    variant: str = option(DEFAULT_VARIANT, "onnxruntime engine weights (int8 / int4: weight-only quantized)",
                          choices=VARIANTS)


@dataclass(frozen=True, kw_only=True)
class GenerateCommand(GenerateFlags):
    """GenerateFlags plus the arguments argparse takes positionally or repeatedly (added in build_parser)."""
    prompt: str
    stop: list[str] | None = None      # --stop S, repeatable
    option: list[str] | None = None    # --option key=value, repeatable


@dataclass(frozen=True)
class DemoCommand(ModelOptions):
    backend: str = option(FASTEST_BACKEND, "backend that runs the model (default: the fastest measured here)",
                          choices=tuple(BACKENDS))
    method: str = option(FASTEST_METHOD, "the parallel method compared with vanilla (default: the fastest "
                                         "lossless one measured here, tools/recommended.py)",
                         choices=tuple(m for m in METHODS if m != "vanilla"))
    repeats: int = option(3, "timed generations per method, interleaved (the median is shown)")
    checkpoint: str | None = option(None, "the trained method's checkpoint for --model (default: the committed "
                                          "SmolLM2 one)")


@dataclass(frozen=True)
class BenchCommand(ModelOptions, DecodingFlags):
    prompts: str = option(BenchConfig.prompts, PROMPTS_HELP)
    methods: str = option(",".join(BenchConfig.methods),
                          f"comma list of runs METHOD[@VARIANT] (e.g. vanilla@fp32,ppd@int8,llamacpp@q8_0): "
                          f"{label_choices()}; speedups are against the first vanilla listed")
    limit: int | None = option(BenchConfig.limit, "first N prompts only (default: all)")
    repeats: int = option(BenchConfig.repeats, "timed repeats; medians are reported")
    dtype: str = option(BenchConfig.dtype, "torch backend precision (fp16 / bf16 for GPUs)", choices=DTYPES)
    trees: str | None = option(None, "folder whose <method>-tree-*.json files the tree methods use (default: the "
                                     "trees searched for this device)")
    checkpoint: str | None = option(None, "the ppd / hybrid prompt tokens for --model (default: the committed "
                                          "SmolLM2 ones; ht keeps its own)")
    out: str | None = option(None, "write report.json here")

    def bench_config(self) -> BenchConfig:
        methods = tuple(self.methods.split(","))
        options = trees_in(self.trees, methods)
        if self.checkpoint is not None:
            for method in {label.partition("@")[0] for label in methods} & {"ppd", "hybrid"}:
                options.setdefault(method, {})["checkpoint"] = self.checkpoint
        return BenchConfig(prompts=self.prompts, methods=methods, backend=self.backend, device=self.device,
                           dtype=self.dtype, max_new_tokens=self.max_new_tokens, model_dir=self.model,
                           limit=self.limit, repeats=self.repeats, method_options=options,
                           **dataclasses.asdict(self.decoding()))


@dataclass(frozen=True)
class BatchBenchCommand(ModelOptions):
    prompts: str = option(BatchBenchConfig.prompts, PROMPTS_HELP)
    methods: str = option(",".join(BatchBenchConfig.methods), f"comma list from {', '.join(METHODS)} (one named "
                          "twice runs twice: an A/A control of the machine's noise)")
    batch_sizes: str = option(",".join(map(str, DEFAULT_BATCH_SIZES)), "comma list of batch sizes B")
    requests: int | None = option(None, "requests per batch size (default: 2 B)")
    repeats: int = option(BatchBenchConfig.repeats, "timed repeats, methods interleaved; medians are reported")
    dtype: str = option(BatchBenchConfig.dtype, "torch backend precision (fp16 / bf16 for GPUs)", choices=DTYPES)
    threads: int | None = option(None, "the backend's compute threads (default: its own)")
    trees: str | None = option(None, "folder whose <method>-tree-*.json files the tree methods use")
    out: str | None = option(None, "write the report (JSON) here")

    def batch_config(self) -> BatchBenchConfig:
        methods = tuple(self.methods.split(","))
        return BatchBenchConfig(self.prompts, methods, parse_ints(self.batch_sizes, "--batch-sizes"), self.requests,
                                self.backend, self.device, self.dtype, self.max_new_tokens, self.model, self.repeats,
                                self.threads, trees_in(self.trees, methods))


def trees_in(folder: str | None, methods: tuple[str, ...]) -> dict[str, dict]:
    """{method: {"tree": file}} for the tree methods with exactly one <method>-tree-*.json in `folder`."""
    if folder is None:
        return {}
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"--trees {folder}: no such folder")
    chosen = {}
    for method in (m for m in methods if m in METHODS and METHODS[m].tree_set):
        files = sorted(Path(folder).glob(f"{method}-tree-*.json"))
        if len(files) > 1:
            raise ValueError(f"--trees {folder} holds several {method} trees ({', '.join(f.name for f in files)}); "
                             "keep one per method")
        if files:
            chosen[method] = {"tree": str(files[0])}
    return chosen


@dataclass(frozen=True)
class MemoryCommand(ModelOptions):
    prompts: str = option(BenchConfig.prompts, PROMPTS_HELP)
    methods: str = option("vanilla,ppd", f"comma list from {', '.join(METHODS)}")
    limit: int = option(5, "first N prompts")


@dataclass(frozen=True)
class QualityCommand:
    """tools.bench.quality.QualityConfig as flags (its defaults), plus where the report goes."""
    variants: str = option(",".join(QualityConfig.variants), "comma list of engine variants of the vanilla engine; "
                                                             "fp32 is the reference and must be one")
    model_dir: str = option(str(QualityConfig.model_dir), "Llama checkpoint dir whose engine dirs are measured")
    num_sequences: int = option(QualityConfig.num_sequences, "perplexity: first N ShareGPT validation conversations")
    max_tokens: int = option(QualityConfig.max_tokens, "perplexity: each conversation cut to its first N tokens")
    prompts: int = option(QualityConfig.prompts, "agreement: first N prompts of MT-Bench and of HumanEval each")
    max_new_tokens: int = option(QualityConfig.max_new_tokens, "agreement: greedy new tokens per prompt")
    out: str = option(str(DEFAULT_REPORT), "report JSON (written atomically)")

    def quality_config(self) -> QualityConfig:
        return QualityConfig(variants=tuple(v.strip() for v in self.variants.split(",") if v.strip()),
                             model_dir=Path(self.model_dir), num_sequences=self.num_sequences,
                             max_tokens=self.max_tokens, prompts=self.prompts, max_new_tokens=self.max_new_tokens)


def shared_flags(cfg: ModelOptions, *names: str) -> list[str]:
    """`cfg`'s ModelOptions fields and `names` as command-line flags (for a child `python -m tools`)."""
    fields = [f.name for f in dataclasses.fields(ModelOptions)] + list(names)
    return [arg for name in fields for arg in ("--" + name.replace("_", "-"), str(getattr(cfg, name)))]


# --- commands -----------------------------------------------------------------------------------------

def cmd_generate(cfg: GenerateCommand) -> int:
    """generate from one prompt, streaming the text"""
    decoding = cfg.decoding()   # bad options are refused before the model loads
    gen = Generator.from_pretrained(cfg.model, method=cfg.method, backend=cfg.backend, device=cfg.device,
                                    max_context=cfg.max_context, dtype=cfg.dtype, variant=cfg.variant,
                                    **parse_options(cfg.option or []))
    result = Result([], "")
    for piece in gen.stream(cfg.prompt, max_new_tokens=cfg.max_new_tokens, stop=cfg.stop, result=result,
                            **dataclasses.asdict(decoding)):
        print(piece, end="", flush=True)
    s = result.stats
    print(f"\n[{cfg.method}] {s.new_tokens} tokens, {s.tokens_per_s:.1f} tokens/s, "
          f"{s.mean_accepted:.2f} tokens/step, {s.forward_seconds:.2f}s forward / {s.other_seconds:.2f}s other"
          + ("" if result.seed is None else f", seed {result.seed}"),
          file=sys.stderr)
    return 0


def cmd_demo(cfg: DemoCommand) -> int:
    """Generate with vanilla and the fastest parallel method on one prompt, on the same backend; show the
    text, the measured speedup (median of interleaved repeats) and whether the outputs are identical."""
    if cfg.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {cfg.repeats}")
    methods = ("vanilla", cfg.method)
    trained = {} if cfg.checkpoint is None or not METHODS[cfg.method].trained else {"checkpoint": cfg.checkpoint}
    gens = {m: Generator.from_pretrained(cfg.model, method=m, backend=cfg.backend, device=cfg.device,
                                         **(trained if m == cfg.method else {})) for m in methods}
    for gen in gens.values():
        gen.generate("Hi", max_new_tokens=4)  # warm-up
    runs: dict[str, list[Result]] = {m: [] for m in methods}
    for _ in range(cfg.repeats):             # interleaved: a drift of the machine hits both alike
        for method, gen in gens.items():
            runs[method].append(gen.generate(DEMO_PROMPT, max_new_tokens=cfg.max_new_tokens))
    speed = {m: statistics.median(r.stats.tokens_per_s for r in rs) for m, rs in runs.items()}
    base, fast = runs["vanilla"][0], runs[cfg.method][0]
    print(f"prompt: {DEMO_PROMPT}\n\n{fast.text}\n")
    print(f"backend {cfg.backend} on {device_name(cfg.device)}, {cfg.max_new_tokens} new tokens, "
          f"median of {cfg.repeats}:")
    for method in methods:
        print(f"{method:>8}: {speed[method]:6.1f} tokens/s, {runs[method][0].stats.mean_accepted:.2f} tokens/step")
    identical = all(r.token_ids == base.token_ids for rs in runs.values() for r in rs)
    print(f"speedup of {cfg.method} over vanilla: {speed[cfg.method] / speed['vanilla']:.2f}x; "
          f"identical output: {identical}")
    print("serve it: `make serve` (OpenAI-compatible API on http://127.0.0.1:8000/v1)")
    return 0 if identical else 1


def cmd_bench(cfg: BenchCommand) -> int:
    """tokens/s and accepted tokens per step of methods and peers"""
    report = run_bench(cfg.bench_config())
    print(format_table(report))
    if cfg.out:
        write_report(report, cfg.out)
        print(f"wrote {cfg.out}")
    return 0


def cmd_batch_bench(cfg: BatchBenchCommand) -> int:
    """aggregate tokens/s and request latency of batched decoding (runtime.BatchGenerator) per batch size"""
    report = run_batch_bench(cfg.batch_config())
    print(format_batch_table(report))
    if cfg.out:
        write_json(Path(cfg.out), report)
        print(f"wrote {cfg.out}")
    return 0


def cmd_memory(cfg: MemoryCommand) -> int:
    """Peak resident memory of each method, each alone in a fresh process on the same prompts."""
    from tools.bench.memory import format_memory, measure_methods

    methods = cfg.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    print(f"{cfg.prompts} x {cfg.limit} prompts, {cfg.max_new_tokens} new tokens, backend {cfg.backend}, "
          f"one fresh process per method")
    print(format_memory(measure_methods(methods, shared_flags(cfg, "prompts", "limit"))))
    return 0


def cmd_quality(cfg: QualityCommand) -> int:
    """Quality of the quantized engines against fp32: teacher-forced perplexity on ShareGPT validation and
    identical greedy outputs on MT-Bench + HumanEval (tools/bench/quality.py); a markdown table and a JSON report"""
    report = measure_quality(cfg.quality_config())
    write_json(cfg.out, report.to_json())
    print(quality_table(report))
    print(f"wrote {cfg.out}")
    return 0


@dataclass(frozen=True)
class FloorCommand:
    model: str = option(str(DEFAULT_MODEL_DIR), "checkpoint dir of a supported family (`python -m export model`)")
    variants: str = option("fp32,int8,int4", "comma list of CPU engine variants")
    threads: int | None = option(None, "threads reading the bandwidth buffer (default: every core)")
    out: str | None = option(None, "also write the rows as JSON here")


def cmd_floor(cfg: FloorCommand) -> int:
    """One-token step latency of each CPU engine variant (its latency profile) against its bandwidth floor:
    the weights a step reads / the measured read bandwidth (tools/latency/floor.py)"""
    from tools.latency.floor import floor_rows, format_floor, measure_read_bandwidth, variant_engines

    engines = variant_engines(cfg.model, [v for v in cfg.variants.split(",") if v])
    bandwidth = measure_read_bandwidth(cfg.threads)
    rows = floor_rows(engines, bandwidth)
    print(format_floor(rows, bandwidth))
    write_rows(cfg.out, rows, read_bandwidth_gb_s=round(bandwidth / 1e9, 2))
    return 0


def write_rows(out: str | None, rows, **facts) -> None:
    """The rows of a CPU measurement as JSON at `out` (nothing when None), with the CPU's name and `facts`."""
    if out:
        write_json(out, {"device": device_name("cpu"), **facts, "rows": [r.to_json() for r in rows]})
        print(f"wrote {out}")


@dataclass(frozen=True)
class BreakdownCommand:
    model: str = option(str(DEFAULT_MODEL_DIR), "checkpoint dir of a supported family (`python -m export model`)")
    variants: str = option("fp32,int8,int4", "comma list of CPU engine variants (their vanilla engines)")
    nodes: str = option("1,2,8", "comma list of draft sizes T (chains)")
    caches: str = option("50,200,400", "comma list of committed cache lengths S")
    repeats: int = option(40, "interleaved timings of each, medians taken")
    out: str | None = option(None, "also write the rows as JSON here")


def cmd_breakdown(cfg: BreakdownCommand) -> int:
    """Where each CPU engine variant's step goes: the runtime's step against the graph's weight products
    alone (the same kernels and rows), per T and cache length (tools/latency/breakdown.py)"""
    from tqdm import tqdm

    from tools.latency.floor import vanilla_engine_dir
    from tools.latency.breakdown import format_breakdown, measure_breakdown

    variants = [v for v in cfg.variants.split(",") if v]
    nodes, caches = parse_ints(cfg.nodes, "--nodes"), parse_ints(cfg.caches, "--caches")
    engines = [vanilla_engine_dir(cfg.model, v) for v in variants]
    missing = [absent for _, absent in engines if absent]
    if missing:
        raise FileNotFoundError("; ".join(missing))
    rows = []
    with tqdm(total=len(variants) * len(nodes) * len(caches), desc="breakdown", unit="shape") as bar:
        for variant, (directory, _) in zip(variants, engines):
            rows += measure_breakdown(directory, variant, nodes, caches, cfg.repeats, progress=bar)
    print(format_breakdown(rows))
    write_rows(cfg.out, rows, repeats=cfg.repeats)
    return 0


def parse_ints(text: str, flag: str) -> tuple[int, ...]:
    from tools.treesearch.files import parse_int_list

    return parse_int_list(text, f"{flag} takes a comma list of integers, got {text!r}",
                          f"{flag} is empty; give a comma list of integers")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    g = add_config_command(sub, "generate", GenerateFlags, cmd_generate)
    g.add_argument("prompt", help="the prompt: one user turn through the chat template")
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--option", action="append", help="method option key=value (repeatable)")
    g.set_defaults(config_class=GenerateCommand)
    add_config_command(sub, "demo", DemoCommand, cmd_demo)
    add_config_command(sub, "bench", BenchCommand, cmd_bench)
    add_config_command(sub, "batch-bench", BatchBenchCommand, cmd_batch_bench)
    add_config_command(sub, "memory", MemoryCommand, cmd_memory)
    add_config_command(sub, "quality", QualityCommand, cmd_quality)
    add_config_command(sub, "floor", FloorCommand, cmd_floor)
    add_config_command(sub, "breakdown", BreakdownCommand, cmd_breakdown)
    add_config_command(sub, "latency-test", LatencyTestCommand, cmd_latency_test)
    add_config_command(sub, "latency-baseline", LatencyBaselineCommand, cmd_latency_baseline)
    add_check_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["trees"]:  # the tree search has its own command set (tools/treesearch/cli.py)
        from tools.treesearch.cli import main as trees_main

        return trees_main(argv[1:])
    if argv[:1] == ["gpu-check"]:  # the one device check of a borrowed GPU machine (tools/gpucheck/)
        from tools.gpucheck.run import main as gpu_check_main

        return gpu_check_main(argv[1:])
    if argv[:1] == ["serve"]:  # the OpenAI-compatible server has its own flags (tools/serving/cli.py)
        from tools.serving.cli import main as serve_main

        return serve_main(argv[1:])
    args = build_parser().parse_args(argv)
    errors = (CheckpointError, FileNotFoundError, ValueError)
    return exit_code_of(lambda: args.func(config_from_args(args)), errors)

