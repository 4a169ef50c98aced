"""python -m tools gpu-check (`make gpu-check`): everything a borrowed GPU machine should measure, in
one call of a few minutes, written to one report folder that is committed with the device named.

    python -m tools gpu-check                    on a CUDA machine: run every step
    python -m tools gpu-check --dry-run          anywhere: print the plan (what would run, what is skipped)
    python -m tools gpu-check --device cpu       the same steps on the CPU (checks the script itself)

Steps run as subprocesses of the package's own CLIs, each with its own time limit, so one failure or
hang does not stop the rest; each step's output goes to logs/<step>.log. Steps that cannot run here
(onnxruntime without the CUDA provider, no TensorRT) are skipped with the reason. The report folder:

    report.md / report.json     machine facts, per step: status, seconds, command, summary
    latency-<device>-<backend>.json, <method>-tree-<device>-<backend>.json (+ .png): profile and trees
    bench-*.json                 vanilla / ngram / ppd / hybrid / ht on 10 MT-Bench and 10 HumanEval
                                 prompts: tokens/s, accepted tokens per step, identical outputs
    regression-baseline-*.json   the latency regression baseline of the device (make latency-test)
    roofline-vs-measured.json    the datasheet roofline of the GPU against the measured curve

A run with --only adds its steps to the folder's report (earlier steps are kept). Before any step,
the model dir and the prompt packages are checked: a machine without them stops at once.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from export.paths import ARTIFACTS_DIR, DEFAULT_MODEL_DIR
from trees.atomic import write_atomic
from trees.devices import device_key

TREE_METHODS = ("ppd", "ht", "hybrid")
BENCH_METHODS = "vanilla,ngram,ppd,hybrid,ht"
BENCH_SETS = ("mtbench", "humaneval")
DEFAULT_DEADLINE_S = 450     # the whole run: a borrowed machine's call is short (the device tool allows 600 s)
MIN_STEP_SECONDS = 30        # a step is not started with less left than this


@dataclass(frozen=True)
class Sizes:
    """How much each step measures: the full check, or a quick one that only exercises the script."""
    prompts: int = 10              # per prompt set
    new_tokens: int = 64           # eager torch on the H200 took 20 ms a step: 10 x 128 x 5 methods x 2 = 235 s
    repeats: int = 2
    profile_max_tokens: int = 64
    profile_repeats: int = 10
    profile_rounds: int = 5


QUICK = Sizes(prompts=2, new_tokens=16, repeats=1, profile_max_tokens=8, profile_repeats=2, profile_rounds=1)


@dataclass(frozen=True)
class MachineFacts:
    device: str                    # "cuda" or "cpu"
    device_name: str               # the GPU's name, or the CPU model
    device_key: str
    versions: dict[str, str]
    ort_providers: tuple[str, ...]
    tensorrt: str | None           # version, when importable
    load_average: tuple[float, float, float]


def machine_facts(device: str) -> MachineFacts:
    import onnxruntime as ort
    import torch

    from export.devices import present_device

    kind, name = present_device(device)
    versions = {"python": sys.version.split()[0], "torch": torch.__version__, "onnxruntime": ort.__version__,
                "cuda": str(torch.version.cuda)}
    try:
        import tensorrt
        trt_version = tensorrt.__version__
    except ImportError:
        trt_version = None
    return MachineFacts(kind, name, device_key(kind, name), versions, tuple(ort.get_available_providers()),
                        trt_version, os.getloadavg())


@dataclass(frozen=True)
class Step:
    name: str
    argv: tuple[str, ...]          # run with this interpreter: python -m ...
    timeout_s: float
    skip: str | None = None        # why it cannot run here (then it is reported, not run)


@dataclass
class StepResult:
    name: str
    status: str                    # passed | failed | timeout | skipped | not run (out of time)
    seconds: float
    command: str
    note: str = ""                 # skip reason, or the last line of the output
    outputs: list[str] = field(default_factory=list)


def plan(facts: MachineFacts, out: Path, sizes: Sizes) -> list[Step]:
    """The steps, most wanted first (a run out of time drops the tail): the latency profile, the trees
    searched on it, the fp32 benches that use them, the CUDA tests, then bf16, the other backends and
    TensorRT."""
    gpu, device, key = facts.device_name if facts.device == "cuda" else "cpu", facts.device, facts.device_key
    py = ("-m",)
    profile = out / f"latency-{key}-torch.json"
    steps = [Step("profile-torch", (*py, "tools", "trees", "profile", "--gpu", gpu, "--backend", "torch",
                                    "--device", device, "--max-tokens", str(sizes.profile_max_tokens),
                                    "--repeats", str(sizes.profile_repeats), "--rounds", str(sizes.profile_rounds),
                                    "--out", str(profile), "--force"), 150)]   # one shot: quietness recorded, not refused
    for method in TREE_METHODS:
        steps.append(Step(f"tree-{method}-torch", (*py, "tools", "trees", "build", "--method", method, "--gpu", gpu,
                                                   "--backend", "torch", "--device", device, "--profile", str(profile),
                                                   "--budgets", budgets(sizes.profile_max_tokens),
                                                   "--out", str(out / f"{method}-tree-{key}-torch.json")), 90))
    steps.append(Step("roofline-vs-measured", (*py, "tools", "trees", "roofline", "--gpu", gpu, "--compare",
                                               str(profile), "--out", str(out / "roofline-vs-measured.json")), 60,
                      None if device == "cuda" else "CPU run: the roofline models GPUs"))
    bench = ("--methods", BENCH_METHODS, "--limit", str(sizes.prompts), "--max-new-tokens", str(sizes.new_tokens),
             "--repeats", str(sizes.repeats), "--trees", str(out))   # the trees just searched for this device
    ort_skip = (None if facts.device == "cpu" or "CUDAExecutionProvider" in facts.ort_providers else
                f"onnxruntime {facts.versions['onnxruntime']} here has no CUDAExecutionProvider "
                f"(providers: {', '.join(facts.ort_providers)}); install onnxruntime-gpu (pip install '.[gpu]')")

    def benches(backend: str, dtype: str, skip: str | None) -> list[Step]:
        names = [(f"bench-{backend}-{dtype}-{prompts}", prompts) for prompts in BENCH_SETS]
        return [Step(name, (*py, "tools", "bench", "--backend", backend, "--device", device, "--dtype", dtype,
                            "--prompts", prompts, *bench, "--out", str(out / f"{name}.json")), 240, skip)
                for name, prompts in names]

    steps += benches("torch", "fp32", None)
    steps.append(Step("latency-baseline-torch", (*py, "tools", "latency-baseline", "--gpu", gpu, "--backend", "torch",
                                                 "--device", device, "--out",
                                                 str(out / f"regression-baseline-{key}-torch.json"), "--force"), 150))
    steps.append(Step("cuda-tests", (*py, "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests",
                                 "--ignore=tests/runtime/serving"),
                      240, None if device == "cuda" else "CPU run: the gpu-marked tests need CUDA"))
    steps += benches("torch", "bf16", None) + benches("onnxruntime", "fp32", ort_skip)
    trt_skip = None if facts.tensorrt else "tensorrt is not importable here (pip install '.[tensorrt]' on a GPU machine)"
    if facts.device == "cpu":
        trt_skip = "CPU run: TensorRT needs a GPU"
    trt_dir = ARTIFACTS_DIR / "engines" / "gpu-check" / key / "ppd"
    steps.append(Step("tensorrt-engine", (*py, "export", "engine", "--target", gpu, "--method", "ppd",
                                          "--out", str(trt_dir)), 300, trt_skip))
    steps.append(Step("tensorrt-parity", (*py, "tools", "check", str(trt_dir)), 120, trt_skip))
    return steps


def budgets(max_tokens: int) -> str:
    """The search's fixed budgets up to the profiled size."""
    return ",".join(str(b) for b in (2, 4, 8, 16, 32, 64) if b <= max_tokens) or str(max_tokens)


def run_step(step: Step, logs: Path, seconds_left: float = float("inf")) -> StepResult:
    """Run one step with its time limit (or what is left of the run's, if less)."""
    command = " ".join(shlex.quote(a) for a in ("python", *step.argv))
    if step.skip:
        return StepResult(step.name, "skipped", 0.0, command, step.skip)
    if seconds_left < MIN_STEP_SECONDS:
        return StepResult(step.name, "not run", 0.0, command, f"out of time ({seconds_left:.0f} s of the run left)")
    limit = min(step.timeout_s, seconds_left)
    log = logs / f"{step.name}.log"
    start = time.perf_counter()
    with log.open("w") as f:
        try:
            code = subprocess.run([sys.executable, *step.argv], stdout=f, stderr=subprocess.STDOUT,
                                  timeout=limit, env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
            status = "passed" if code == 0 else "failed"
        except subprocess.TimeoutExpired:
            status = "timeout"
    seconds = time.perf_counter() - start
    tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    note = tail[-1][-300:] if tail else ""
    if status == "timeout":
        note = f"stopped after {limit:.0f} s; {note}"
    return StepResult(step.name, status, seconds, command, note)


def missing_inputs(model_dir: Path) -> list[str]:
    """What the steps need that this machine lacks: the model dir and the prompt sets' data packages."""
    from export.checkpoint import CheckpointError, check_model_dir
    from tools.bench.prompts import load_prompts

    missing = []
    try:
        check_model_dir(model_dir)
    except (CheckpointError, FileNotFoundError) as exc:
        missing.append(str(exc))
    for prompts in BENCH_SETS:
        try:
            load_prompts(prompts, 1)
        except FileNotFoundError as exc:
            missing.append(str(exc))
    return missing


def previous_results(out: Path, rerun: set[str]) -> list[StepResult]:
    """The steps of an earlier run into the same folder that this run does not repeat (a run with
    --only adds to the report instead of replacing it)."""
    path = out / "report.json"
    if not path.is_file():
        return []
    return [StepResult(**step) for step in json.loads(path.read_text())["steps"] if step["name"] not in rerun]


def bench_tables(out: Path) -> list[str]:
    from tools.bench.report import format_table

    tables = []
    for path in sorted(out.glob("bench-*.json")):
        tables += [f"### {path.stem}", "", "```", format_table(json.loads(path.read_text())), "```", ""]
    return tables


def write_report(out: Path, facts: MachineFacts, results: list[StepResult], dry_run: bool) -> Path:
    data = {"facts": asdict(facts), "dry_run": dry_run, "steps": [asdict(r) for r in results],
            "load_average_after": os.getloadavg()}
    write_atomic(out / "report.json", json.dumps(data, indent=1))
    lines = [f"# gpu-check on {facts.device_name}", "",
             f"versions: {', '.join(f'{k} {v}' for k, v in facts.versions.items())}; onnxruntime providers: "
             f"{', '.join(facts.ort_providers)}; tensorrt: {facts.tensorrt or 'not importable'}; load average "
             f"before {facts.load_average[0]:.2f}, after {os.getloadavg()[0]:.2f}", "",
             "| step | status | seconds | note |", "| --- | --- | --- | --- |"]
    lines += [f"| {r.name} | {r.status} | {r.seconds:.0f} | {r.note.replace('|', '/')} |" for r in results]
    lines += ["", "## Benchmarks (speedup and identical outputs against vanilla on the same backend, same run)", ""]
    lines += bench_tables(out)
    lines += ["## Commands", ""] + [f"- {r.name}: `{r.command}`" for r in results]
    return write_atomic(out / "report.md", "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools gpu-check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (checks the script on the CPU)")
    parser.add_argument("--out", help="report folder (default: artifacts/gpu-check/<device key>)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan only (automatic without CUDA)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: exercise every step in about a minute")
    parser.add_argument("--only", help="comma list of step names to run (others are left out)")
    parser.add_argument("--deadline", type=float, default=DEFAULT_DEADLINE_S,
                        help="seconds for the whole run; steps that no longer fit are reported as not run "
                             "(default: %(default)s)")
    args = parser.parse_args(argv)
    import torch

    no_cuda = args.device.startswith("cuda") and not torch.cuda.is_available()
    dry_run = args.dry_run or no_cuda
    facts = machine_facts("cpu" if no_cuda else args.device)
    if no_cuda:
        facts = MachineFacts("cuda", "<the GPU present>", "<gpu>", facts.versions, facts.ort_providers,
                             facts.tensorrt, facts.load_average)
    out = Path(args.out) if args.out else ARTIFACTS_DIR / "gpu-check" / facts.device_key
    steps = plan(facts, out, QUICK if args.quick else Sizes())
    only = set(args.only.split(",")) if args.only else None
    if dry_run:
        print(f"dry run ({'no CUDA device here' if not torch.cuda.is_available() else 'asked for'}): "
              f"on a GPU machine `make gpu-check` would run, writing {out}/:")
        for step in steps:
            state = f"skip: {step.skip}" if step.skip else f"run (limit {step.timeout_s:.0f} s)"
            print(f"  {step.name:<34} {state}\n      python {' '.join(shlex.quote(a) for a in step.argv)}")
        return 0
    missing = missing_inputs(DEFAULT_MODEL_DIR)
    if missing:   # found before any device time is spent
        print("gpu-check cannot run: " + "; ".join(missing), file=sys.stderr)
        return 2
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    results = previous_results(out, {s.name for s in steps if only is None or s.name in only})
    start = time.perf_counter()
    for step in steps:
        if only is not None and step.name not in only:
            continue
        result = run_step(step, logs, args.deadline - (time.perf_counter() - start))
        print(f"{result.name:<34} {result.status:<8} {result.seconds:6.0f} s  {result.note[:120]}", flush=True)
        results.append(result)
        write_report(out, facts, results, dry_run=False)   # after every step: a killed run keeps its report
    report = write_report(out, facts, results, dry_run=False)
    print(f"report: {report}")
    return 0 if all(r.status in ("passed", "skipped", "not run") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
