"""python -m tools latency-test / latency-baseline: the latency regression test of the device present
against its committed baseline, and the recording of that baseline (tools/latency/regression.py).

    python -m tools latency-test --gpu cpu        (make latency-test GPU=cpu): exit 1 listing every
                                                    regression, 0 when none or when skipped (no baseline
                                                    for this device, backend and versions: says how to record one)
    python -m tools latency-baseline --gpu cpu    (make latency-baseline GPU=cpu): measure and write the
                                                    committed baseline; refused on a busy machine (--force)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from export.paths import DEFAULT_MODEL_DIR
from runtime.loading import BACKENDS
from trees.config_args import option


@dataclass(frozen=True)
class LatencyRun:
    gpu: str = option(help="the device present: 'cpu', or part of the GPU's name (e.g. h100)")
    backend: str | None = option(None, "backend measured (default: onnxruntime on the CPU, torch on a GPU)",
                                 choices=tuple(BACKENDS))
    device: str | None = option(None, "cpu or cuda (default: cpu for --gpu cpu, else cuda)")
    model: str = option(str(DEFAULT_MODEL_DIR), "checkpoint dir of a supported family")

    def backend_name(self) -> str:
        from tools.treesearch.files import run_device

        return self.backend or ("onnxruntime" if run_device(self.gpu, self.device) == "cpu" else "torch")


@dataclass(frozen=True)
class LatencyTestCommand(LatencyRun):
    baseline: str | None = option(None, "baseline JSON (default: regression-baseline-<device>-<backend>.json next to "
                                        "the method checkpoints)")
    attempts: int = option(2, "measurements at most: a timing regression is measured again and must repeat")
    out: str | None = option(None, "also write this run's measurement (baseline format) here")


@dataclass(frozen=True)
class LatencyBaselineCommand(LatencyRun):
    out: str | None = option(None, "baseline JSON (default: the committed one next to the method checkpoints)")
    force: bool = option(False, "write it even when the machine was busy (the record then says forced)")


def cmd_latency_test(cfg: LatencyTestCommand) -> int:
    """Step latency ratios (T=k/T=1), speedups over vanilla and accepted tokens per step on the device present
    against its committed baseline; exits 1 listing every regression (skipped, exit 0, without a baseline)."""
    from tools.latency.regression import run_latency_test

    outcome = run_latency_test(cfg.gpu, cfg.backend_name(), cfg.device, cfg.model, cfg.baseline, cfg.attempts)
    if outcome.skipped:
        print(f"latency test skipped: {outcome.skipped}")
        return 0
    comparison = outcome.comparison
    print(comparison.table)
    for note in comparison.notes:
        print(f"note: {note}")
    if cfg.out:
        print(f"wrote {outcome.measurements[-1].save(cfg.out)}")
    if comparison.ok:
        print(f"PASS: no regression against the baseline ({len(outcome.measurements)} measurement(s))")
        return 0
    print(f"FAIL: {len(comparison.regressions)} regression(s):\n" + "\n".join(f"  {r.message}"
                                                                             for r in comparison.regressions))
    return 1


def cmd_latency_baseline(cfg: LatencyBaselineCommand) -> int:
    """Measure the step latency curve and the vanilla/ppd/ht bench on the device present and write them as
    its latency baseline (refused when the machine was busy, unless --force)."""
    from tools.latency.baseline import default_baseline_path
    from tools.latency.regression import measure
    from trees.quiet import refuse_busy_start

    backend = cfg.backend_name()
    command = f"python -m tools latency-baseline --gpu {cfg.gpu} --backend {backend}"
    refuse_busy_start("the latency baseline", cfg.force, command)
    measured = measure(cfg.gpu, backend, cfg.device, cfg.model)
    measured = dataclasses.replace(measured, command=command,
                                   quiet=measured.quiet.refuse_if_busy("the latency baseline", cfg.force, command))
    out = Path(cfg.out) if cfg.out else default_baseline_path(measured.device_key, backend)
    measured.save(out)
    ratios = ", ".join(f"T={t}/T=1 {r:.2f}" for t, r in measured.ratios.items() if t != 1)
    speedups = ", ".join(f"{m} {s:.2f}x ({measured.bench[m].mean_accepted:.2f} tokens/step)"
                         for m, s in measured.speedups.items() if m != "vanilla")
    print(f"wrote {out}: {measured.device_name}, {backend}: T=1 {1e3 * measured.latency[1]:.1f} ms, {ratios}; "
          f"vanilla {measured.bench['vanilla'].tokens_per_s:.1f} tokens/s, {speedups}; machine "
          f"{measured.quiet.summary()}")
    return 0
