"""The gpu-check report (report.md, report.json) from what the steps wrote into its folder: the steps, the
latency profile raw and fitted against the targets, the benches per precision and per prompt set with
their lossless counts, the searched trees' predicted speedup against the measured one, the bench's own
vanilla step against the profile's T = 1, the batched throughput and the roofline."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from trees.atomic import write_atomic

PREDICTION_TOLERANCE = 0.15      # predicted vs measured speedup of a searched tree
STEP_TARGET_S, FLAT_TARGET = 2e-3, 1.3   # SmolLM2-135M bf16: T = 1 within 2 ms, T = 64 within 1.3x T = 1
TREE_METHODS = ("ppd", "ht", "hybrid")


@dataclass(frozen=True)
class MachineFacts:
    device: str                    # "cuda" or "cpu"
    device_name: str               # the GPU's name, or the CPU model
    device_key: str
    versions: dict[str, str]
    ort_providers: tuple[str, ...]
    tensorrt: str | None           # version, when importable
    load_average: tuple[float, float, float]


@dataclass
class StepResult:
    name: str
    status: str                    # passed | failed | timeout | skipped | not run (out of time)
    seconds: float
    command: str
    note: str = ""                 # skip reason, or the last line of the output
    outputs: list[str] = field(default_factory=list)


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def prompt_set(prompt_id: str) -> str:
    return "humaneval" if prompt_id.startswith("HumanEval") else prompt_id.split("-")[0]


def profile_section(out: Path) -> list[str]:
    from trees.latency import load_profile

    lines = []
    for path in sorted(out.glob("latency-*.json")):
        p = load_profile(path)
        shown = [t for t in (1, 2, 4, 8, 16, 32, 48, 64) if t <= p.max_tokens]
        raw = dict(zip(p.sizes, p.seconds))
        lines += [f"### {path.name}: {p.device_name}, {p.backend} {p.dtype}, "
                  f"{'static steps (CUDA graphs)' if p.static_steps else 'dynamic steps'}, context {p.context}", "",
                  "| T | " + " | ".join(map(str, shown)) + " |", "| --- |" + " --- |" * len(shown),
                  "| raw median ms | " + " | ".join(f"{1e3 * raw[t]:.3f}" for t in shown) + " |",
                  "| fitted ms (search) | " + " | ".join(f"{1e3 * p.latency(t):.3f}" for t in shown) + " |", ""]
        flat = p.latency(p.max_tokens) / p.latency(1)
        lines.append(f"T = 1: {1e3 * p.latency(1):.2f} ms (target <= {1e3 * STEP_TARGET_S:.0f} ms: "
                     f"{'met' if p.latency(1) <= STEP_TARGET_S else 'missed'}); T = {p.max_tokens} / T = 1: "
                     f"{flat:.2f}x (target <= {FLAT_TARGET}x: {'met' if flat <= FLAT_TARGET else 'missed'})"
                     + (f"; machine {p.quiet.summary()}" if p.quiet else ""))
        lines.append("")
    return lines


def bench_section(out: Path) -> list[str]:
    from tools.bench.report import format_table

    lines = []
    for path in sorted(out.glob("bench-*.json")):
        report = json.loads(path.read_text())
        lines += [f"### {path.stem}", "", "```", format_table(report), "```", ""]
        runs = [r for r in report["runs"] if not r.get("failed")]
        sets = sorted({prompt_set(p["id"]) for r in runs for p in r["prompts"]})
        if len(sets) < 2:
            continue
        vanilla = next((r for r in runs if r["method"] == "vanilla"), None)
        lines += ["| run | " + " | ".join(f"{s} tok/s | {s} speedup" for s in sets) + " |",
                  "| --- |" + " --- | --- |" * len(sets)]
        for run in runs:
            cells = []
            for s in sets:
                rate = set_rate(run, s)
                base = None if vanilla is None else set_rate(vanilla, s)
                cells += [f"{rate:.1f}", "-" if not base else f"{rate / base:.2f}x"]
            lines.append(f"| {run['label']} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def set_rate(run: dict, name: str) -> float:
    """Tokens/s of one prompt set within a run: its tokens over its seconds (per-prompt medians)."""
    prompts = [p for p in run["prompts"] if prompt_set(p["id"]) == name]
    return sum(len(p["token_ids"]) for p in prompts) / sum(p["seconds"] for p in prompts)


def prediction_section(out: Path) -> list[str]:
    """The trees' expected speedup (from the profile and the acceptance statistics) against the bench."""
    lines = []
    for path in sorted(out.glob("bench-*.json")):
        report = json.loads(path.read_text())
        runs = {r["method"]: r for r in report["runs"] if not r.get("failed") and r["method"] in TREE_METHODS}
        rows = []
        for method, run in runs.items():
            tree = next(iter(sorted(out.glob(f"{method}-tree-*.json"))), None)
            data = _load(tree) if tree else None
            if not data or "expected_speedup" not in data or run.get("speedup_vs_vanilla") is None:
                continue
            predicted, measured = data["expected_speedup"], run["speedup_vs_vanilla"]
            error = measured / predicted - 1
            rows.append(f"| {method} | {predicted:.2f}x | {measured:.2f}x | {100 * error:+.0f} % | "
                        f"{'within' if abs(error) <= PREDICTION_TOLERANCE else 'outside'} "
                        f"{100 * PREDICTION_TOLERANCE:.0f} % |")
        if rows:
            lines += [f"### predicted vs measured, {path.stem}", "", "| tree | predicted | measured | error | |",
                      "| --- | --- | --- | --- | --- |", *rows, ""]
        vanilla = next((r for r in report["runs"] if r["method"] == "vanilla" and not r.get("failed")), None)
        if vanilla and all(p["steps"] for p in vanilla["prompts"]):
            step = sum(p["seconds"] for p in vanilla["prompts"]) / sum(p["steps"] for p in vanilla["prompts"])
            lines += [f"{path.stem}: vanilla's own step (prefill included) {1e3 * step:.2f} ms", ""]
    return lines


def batch_section(out: Path) -> list[str]:
    from tools.bench.batch import format_batch_table

    return [line for path in sorted(out.glob("batch-*.json"))
            for line in (f"### {path.stem}", "", "```", format_batch_table(json.loads(path.read_text())), "```", "")]


def roofline_section(out: Path) -> list[str]:
    data = _load(out / "roofline-vs-measured.json")
    if not data:
        return []
    points = data["points"]
    return [f"Roofline ({data['dtype']}) against the measured profile: measured / modelled "
            + ", ".join(f"T={p['tokens']} {p['ratio']:.1f}x" for p in points if p["tokens"] in (1, 16, 64)), ""]


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
    sections = [("Step latency", profile_section), ("Benchmarks (speedup and identical outputs against vanilla "
                                                    "on the same backend and dtype, same run)", bench_section),
                ("Predicted against measured", prediction_section), ("Batched decoding", batch_section),
                ("Roofline", roofline_section)]
    for title, section in sections:
        body = section(out)
        if body:
            lines += ["", f"## {title}", "", *body]
    lines += ["## Commands", ""] + [f"- {r.name}: `{r.command}`" for r in results]
    return write_atomic(out / "report.md", "\n".join(lines) + "\n")
