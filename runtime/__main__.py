"""python -m runtime {generate,demo,bench,memory}: a thin CLI over runtime.Generator, runtime.bench and
runtime.memory."""

from __future__ import annotations

import argparse
import json
import sys

from export.checkpoint import CheckpointError
from export.paths import DEFAULT_MODEL_DIR
from runtime.backends import BACKENDS
from runtime.bench import PEERS, BenchConfig, format_table, run_bench, write_report
from runtime.generator import DEFAULT_MAX_CONTEXT, DEFAULT_MAX_NEW_TOKENS, Generator
from runtime.methods import METHODS

DEMO_PROMPT = "Write a Python function that returns the n-th Fibonacci number, then explain how it works."


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=str(DEFAULT_MODEL_DIR), help="Llama checkpoint dir (default: %(default)s)")
    p.add_argument("--backend", default="torch", choices=BACKENDS)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)


def parse_options(pairs: list[str]) -> dict:
    """--option key=value (value parsed as JSON when possible: numbers, booleans, lists)."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--option expects key=value, got {pair!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def cmd_generate(args: argparse.Namespace) -> int:
    gen = Generator.from_pretrained(args.model, method=args.method, backend=args.backend, device=args.device,
                                    max_context=args.max_context, **parse_options(args.option))
    from runtime.generator import Result

    result = Result([], "")
    for piece in gen.stream(args.prompt, max_new_tokens=args.max_new_tokens, stop=args.stop, result=result):
        print(piece, end="", flush=True)
    s = result.stats
    print(f"\n[{args.method}] {s.new_tokens} tokens, {s.tokens_per_s:.1f} tokens/s, "
          f"{s.mean_accepted:.2f} tokens/step, {s.forward_seconds:.2f}s forward / {s.other_seconds:.2f}s other",
          file=sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Generate with vanilla and a parallel method on one prompt; show the text and the speedup."""
    results = {}
    for method in ("vanilla", args.method):
        gen = Generator.from_pretrained(args.model, method=method, backend=args.backend, device=args.device)
        gen.generate("Hi", max_new_tokens=4)  # warm-up
        results[method] = gen.generate(DEMO_PROMPT, max_new_tokens=args.max_new_tokens)
    base, fast = results["vanilla"], results[args.method]
    print(f"prompt: {DEMO_PROMPT}\n\n{fast.text}\n")
    for method, r in results.items():
        print(f"{method:>8}: {r.stats.tokens_per_s:6.1f} tokens/s, {r.stats.mean_accepted:.2f} tokens/step")
    print(f"speedup of {args.method} over vanilla: {fast.stats.tokens_per_s / base.stats.tokens_per_s:.2f}x; "
          f"identical output: {fast.token_ids == base.token_ids}")
    return 0 if fast.token_ids == base.token_ids else 1


def cmd_bench(args: argparse.Namespace) -> int:
    cfg = BenchConfig(prompts=args.prompts, methods=tuple(args.methods.split(",")), backend=args.backend,
                      device=args.device, max_new_tokens=args.max_new_tokens, model_dir=args.model,
                      limit=args.limit, repeats=args.repeats)
    report = run_bench(cfg)
    print(format_table(report))
    if args.out:
        write_report(report, args.out)
        print(f"wrote {args.out}")
    return 0


def cmd_memory(args: argparse.Namespace) -> int:
    """Peak resident memory of each method, each alone in a fresh process on the same prompts."""
    from runtime.memory import format_memory, measure_methods

    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    bench_args = ["--prompts", args.prompts, "--limit", str(args.limit), "--backend", args.backend,
                  "--device", args.device, "--max-new-tokens", str(args.max_new_tokens), "--model", args.model]
    print(f"{args.prompts} x {args.limit} prompts, {args.max_new_tokens} new tokens, backend {args.backend}, "
          f"one fresh process per method")
    print(format_memory(measure_methods(methods, bench_args)))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate from one prompt, streaming the text")
    g.add_argument("prompt")
    add_model_args(g)
    g.add_argument("--method", default="vanilla", choices=METHODS)
    g.add_argument("--max-context", type=int, default=DEFAULT_MAX_CONTEXT)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--option", action="append", default=[], help="method option key=value (repeatable)")
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("demo", help=cmd_demo.__doc__)
    add_model_args(d)
    d.add_argument("--method", default="ngram", choices=[m for m in METHODS if m != "vanilla"])
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="tokens/s and accepted tokens per step of methods and peers")
    add_model_args(b)
    b.add_argument("--prompts", default="mtbench", help="mtbench, humaneval, or a JSONL file of {id, prompt}")
    b.add_argument("--methods", default="vanilla,ngram", help=f"comma list from {', '.join(METHODS + PEERS)}")
    b.add_argument("--limit", type=int, default=None, help="first N prompts only")
    b.add_argument("--repeats", type=int, default=BenchConfig.repeats, help="timed repeats; medians are reported")
    b.add_argument("--out", default=None, help="write report.json here")
    b.set_defaults(func=cmd_bench)

    m = sub.add_parser("memory", help=cmd_memory.__doc__)
    add_model_args(m)
    m.add_argument("--prompts", default="mtbench", help="mtbench, humaneval, or a JSONL file of {id, prompt}")
    m.add_argument("--methods", default="vanilla,ppd", help=f"comma list from {', '.join(METHODS)}")
    m.add_argument("--limit", type=int, default=5, help="first N prompts (default: %(default)s)")
    m.set_defaults(func=cmd_memory)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
