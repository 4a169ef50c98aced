"""A bench run's figures: per run the median tokens/s of the whole generation and of the decode phase,
mean accepted tokens per step with its bootstrap interval, speedups against the first vanilla, token
agreement with the vanilla of the run's precision, and the table printed from the report."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np

from tools.bench.labels import RunLabel, speed_baseline, token_baseline
from tools.bench.prompts import PromptItem
from tools.bench.runs import PromptRun
from trees.atomic import write_atomic


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


def failed_summary(run: RunLabel, reason: str) -> dict:
    """The report entry of a run whose peer died: why, and no figures."""
    return {"label": run.label, "method": run.method, "variant": run.variant, "failed": reason,
            "tokens_per_s": None, "mean_accepted": None, "speedup_vs_vanilla": None, "matches_vanilla": None,
            "prompts": []}


def add_comparisons(report: dict) -> None:
    """Per run: speedup_vs_vanilla against the first vanilla listed; matches_vanilla (prompts with identical
    tokens) against matches_vanilla_of, the vanilla of the run's own precision when it ran, else the first
    vanilla (tools/bench/labels.py). All None without a vanilla in the run."""
    by_label = {r["label"]: r for r in report["runs"]}
    labels = [RunLabel(r["label"], r["method"], r["variant"]) for r in report["runs"] if not r.get("failed")]
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
    n = max((len(r["prompts"]) for r in report["runs"]), default=0)
    d = report.get("decoding") or {}
    mode = "greedy" if not d.get("temperature") else (f"sampling (temperature {d['temperature']}, top-p {d['top_p']}, "
                                                     f"top-k {d['top_k']}, seed {d['seed']})")
    threads = f", llama.cpp on {report['llamacpp']['threads']} threads" if "llamacpp" in report else ""
    speed_base = next((r.get("label", "vanilla") for r in report["runs"] if r["method"] == "vanilla"), "vanilla")
    form = f" ({report['prompt_format']})" if "prompt_format" in report else ""
    lines = [f"{report['prompts']} x {n} prompts{form}, {report['max_new_tokens']} new tokens, backend {report['backend']}, "
             f"{report['device']}{threads}, {mode}, median of {report['repeats']} repeats; speedup vs {speed_base}",
             f"{'run':<20}{'tokens/s':>10}{'accepted/step':>15}{'speedup':>9}{'decode tok/s':>14}{'speedup':>9}"
             f"{'1st token':>11}{'same tokens as':>26}"]
    for r in report["runs"]:  # reports written before labels (gpu_check reads old ones) have method only
        if r.get("failed"):
            lines.append(f"{r['label']:<20}failed: {r['failed']}")
            continue
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
