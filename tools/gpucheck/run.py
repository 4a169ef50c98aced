"""python -m tools gpu-check (`make gpu-check`): everything a borrowed GPU machine should measure, in one
call of at most 6 minutes, into the report folder that is committed: reports/gpu-check/<device key>/.

    python -m tools gpu-check                    on a CUDA machine: run every step (tools/gpucheck/plan.py)
    python -m tools gpu-check --dry-run          anywhere: print the plan (what would run, what is skipped)
    python -m tools gpu-check --device cpu       the same steps on the CPU (checks the script itself)

Steps run as subprocesses of the package's own CLIs, each with its own time limit, so one failure or
hang does not stop the rest; each step's output goes to logs/<step>.log. Steps that cannot run here
(onnxruntime without the CUDA provider, no TensorRT) are skipped with the reason. A run with --only adds
its steps to the folder's report (earlier steps are kept). Before any step the model dir and the
prompt sets are checked: a machine without them stops at once, before any device time is spent.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from export.paths import DEFAULT_MODEL_DIR, REPO_ROOT
from tools.gpucheck.plan import DEADLINE_S, MIN_STEP_SECONDS, PROMPT_SETS, QUICK, Sizes, Step, plan
from tools.gpucheck.report import MachineFacts, StepResult, write_report
from trees.devices import device_key

REPORTS_DIR = REPO_ROOT / "reports" / "gpu-check"


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


def plan_for(facts: MachineFacts, out: Path, sizes: Sizes) -> list[Step]:
    gpu = facts.device_name if facts.device == "cuda" else "cpu"
    ort_skip = (None if facts.device == "cpu" or "CUDAExecutionProvider" in facts.ort_providers else
                f"onnxruntime {facts.versions['onnxruntime']} here has no CUDAExecutionProvider "
                f"(providers: {', '.join(facts.ort_providers)}); install onnxruntime-gpu (pip install '.[gpu]')")
    trt_skip = None if facts.tensorrt else "tensorrt is not importable here (pip install '.[tensorrt]' on a GPU machine)"
    if facts.device == "cpu":
        trt_skip = "CPU run: TensorRT needs a GPU"
    return plan(facts.device, gpu, facts.device_key, out, sizes, ort_skip, trt_skip)


def command_of(step: Step) -> str:
    return " ".join(shlex.quote(a) for a in ("python", *step.argv))


def run_steps(steps: list[Step], logs: Path, seconds_left: float = float("inf")) -> list[StepResult]:
    """Run steps side by side, each with its time limit (or what is left of the run's, if less)."""
    results: dict[str, StepResult] = {}
    running = []
    for step in steps:
        if step.skip:
            results[step.name] = StepResult(step.name, "skipped", 0.0, command_of(step), step.skip)
        elif seconds_left < MIN_STEP_SECONDS:
            results[step.name] = StepResult(step.name, "not run", 0.0, command_of(step),
                                            f"out of time ({seconds_left:.0f} s of the run left)")
        else:
            log = (logs / f"{step.name}.log").open("w")
            process = subprocess.Popen([sys.executable, *step.argv], stdout=log, stderr=subprocess.STDOUT,
                                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
            running.append((step, process, log, time.perf_counter(), min(step.timeout_s, seconds_left)))
    for step, process, log, start, limit in running:
        try:
            status = "passed" if process.wait(timeout=max(0.0, start + limit - time.perf_counter())) == 0 else "failed"
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            status = "timeout"
        log.close()
        seconds = time.perf_counter() - start
        tail = [line for line in (logs / f"{step.name}.log").read_text(errors="replace").splitlines() if line.strip()]
        note = tail[-1][-300:] if tail else ""
        if status == "timeout":
            note = f"stopped after {limit:.0f} s; {note}"
        results[step.name] = StepResult(step.name, status, seconds, command_of(step), note)
    return [results[step.name] for step in steps]


def run_step(step: Step, logs: Path, seconds_left: float = float("inf")) -> StepResult:
    return run_steps([step], logs, seconds_left)[0]


def groups(steps: list[Step]) -> list[list[Step]]:
    """The steps in order, consecutive steps of one group together."""
    batches: list[list[Step]] = []
    for step in steps:
        if batches and step.group is not None and batches[-1][0].group == step.group:
            batches[-1].append(step)
        else:
            batches.append([step])
    return batches


def missing_inputs(model_dir: Path) -> list[str]:
    """What the steps need that this machine lacks: the model dir and the prompt sets' data."""
    from export.checkpoint import CheckpointError, check_model_dir
    from tools.bench import prompts

    missing = []
    try:
        check_model_dir(model_dir)
    except (CheckpointError, FileNotFoundError) as exc:
        missing.append(str(exc))
    for name in PROMPT_SETS:
        try:
            prompts.load_prompts(name, 1)
        except FileNotFoundError as exc:
            missing.append(str(exc))
    return missing


def previous_results(out: Path, rerun: set[str]) -> list[StepResult]:
    """The steps of an earlier run into the same folder that this run does not repeat."""
    path = out / "report.json"
    if not path.is_file():
        return []
    return [StepResult(**step) for step in json.loads(path.read_text())["steps"] if step["name"] not in rerun]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools gpu-check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (checks the script on the CPU)")
    parser.add_argument("--out", help=f"report folder (default: {REPORTS_DIR.relative_to(REPO_ROOT)}/<device key>)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan only (automatic without CUDA)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: exercise every step in about a minute")
    parser.add_argument("--only", help="comma list of step names to run (others are left out)")
    parser.add_argument("--deadline", type=float, default=DEADLINE_S,
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
    out = Path(args.out) if args.out else REPORTS_DIR / facts.device_key
    steps = plan_for(facts, out, QUICK if args.quick else Sizes())
    only = set(args.only.split(",")) if args.only else None
    if dry_run:
        print(f"dry run ({'no CUDA device here' if not torch.cuda.is_available() else 'asked for'}): "
              f"on a GPU machine `make gpu-check` would run, writing {out}/:")
        for step in steps:
            state = f"skip: {step.skip}" if step.skip else f"run (limit {step.timeout_s:.0f} s)"
            beside = f", beside the rest of group {step.group}" if step.group else ""
            print(f"  {step.name:<22} {state}{beside}\n      {command_of(step)}")
        return 0
    missing = missing_inputs(DEFAULT_MODEL_DIR)
    if missing:
        print("gpu-check cannot run: " + "; ".join(missing), file=sys.stderr)
        return 2
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    results = previous_results(out, {s.name for s in steps if only is None or s.name in only})
    start = time.perf_counter()
    for batch in groups([s for s in steps if only is None or s.name in only]):
        for result in run_steps(batch, logs, args.deadline - (time.perf_counter() - start)):
            print(f"{result.name:<22} {result.status:<8} {result.seconds:6.0f} s  {result.note[:120]}", flush=True)
            results.append(result)
        write_report(out, facts, results, dry_run=False)   # after every step: a killed run keeps its report
    report = write_report(out, facts, results, dry_run=False)
    print(f"report: {report}")
    return 0 if all(r.status in ("passed", "skipped", "not run") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
