"""Peak resident memory of each method: `python -m tools memory`.

Peak RSS is a property of a whole process (the kernel keeps one high-water mark), so every method
runs alone in a fresh child process (`python -m tools bench --methods M ...`, the same prompts,
backend and budget) that reports its own high-water mark, VmHWM of /proc/self/status, as it exits.
(Not the child's rusage: Linux's ru_maxrss of a forked child starts at the parent's size.)
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class MemoryRow:
    method: str
    peak_rss_mib: float
    ratio_vs_vanilla: float | None


# Runs a module as `python -m` would, then writes the process's peak RSS (kB) to the file named in argv[1].
_REPORT_PEAK = """
import runpy, sys
report, module = sys.argv[1], sys.argv[2]
sys.argv = [module] + sys.argv[3:]
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
finally:
    peak = next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    open(report, "w").write(peak)
"""


def peak_rss_of(module: str, args: Sequence[str]) -> float:
    """Run `python -m module *args` to completion (output discarded); its peak resident memory in MiB."""
    with tempfile.TemporaryDirectory(prefix="ppdeploy-rss-") as tmp:
        report, log_path = Path(tmp) / "peak", Path(tmp) / "stderr"
        with log_path.open("wb") as log:  # a file, not a pipe: a chatty child never blocks on it
            done = subprocess.run([sys.executable, "-c", _REPORT_PEAK, str(report), module, *args],
                                  stdout=subprocess.DEVNULL, stderr=log)
        if done.returncode != 0:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"python -m {module} {' '.join(args)} failed ({done.returncode}):\n{tail}")
        return int(report.read_text()) / 1024


def measure_methods(methods: Sequence[str], bench_args: Sequence[str]) -> list[MemoryRow]:
    """Peak RSS of `python -m tools bench --methods M <bench_args>` for each method, alone."""
    peaks = {m: peak_rss_of("tools", ["bench", "--methods", m, "--repeats", "1", *bench_args]) for m in methods}
    base = peaks.get("vanilla")
    return [MemoryRow(m, p, None if base is None else p / base) for m, p in peaks.items()]


def format_memory(rows: Sequence[MemoryRow]) -> str:
    lines = [f"{'method':<12}{'peak RSS (MiB)':>16}{'vs vanilla':>12}"]
    for r in rows:
        ratio = "-" if r.ratio_vs_vanilla is None else f"{r.ratio_vs_vanilla:.3f}x"
        lines.append(f"{r.method:<12}{r.peak_rss_mib:>16.1f}{ratio:>12}")
    return "\n".join(lines)
