"""How quiet the machine was while a latency profile or baseline was measured, and the refusal to keep
one measured on a busy machine.

    load_before / load_after   busy share of the cores just before the timed work and just after it,
                               sampled over one second while we are idle (so: other processes' work);
                               the 1-minute load average where /proc/stat is missing
    spread                     relative spread of the repeats, (p90 - p10) / median, of each timed series
                               (one step size, one method's tokens/s): the median over the series, and
                               the worst one

Why: the committed CPU profile once said T=1 44 ms where the same command alone measures 24 ms, because
it was taken on shared cores. A tree searched on such a curve, or a baseline compared with one, is wrong
in ways nothing downstream can see; the record says how the numbers were taken, and a busy machine's
numbers are not written unless forced (and then say so).

Ground floor: stdlib and numpy only.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

# The limits, in one place. Measured on the 2-core CPU machine (135M model, onnxruntime), alone: the
# latency baseline's series spread 8% in the median (worst 17%: T=1 steps of 18 ms jitter by 1-3 ms),
# tokens/s repeats 2-3%, the load average rose from 0.2 to 0.5 per core by our own work. With other work on
# the cores (load 2.5 per core) a torch step took 0.84 s instead of 0.05 s: spreads of 100% and more.
MAX_SPREAD = 0.20          # median over the series of (p90 - p10) / median
MAX_LOAD_BEFORE = 0.5      # busy share of the cores before timing: others' work (ours had not started)
MAX_LOAD_AFTER = 0.5       # ... and just after it (ours has stopped): others' work that may have overlapped


class BusyMachineError(ValueError):
    """A measurement taken on a busy machine that would be kept (a profile, a baseline)."""


def relative_spread(samples: Sequence[float]) -> float:
    """(p90 - p10) / median of the samples (0 for fewer than two)."""
    values = np.asarray(samples, dtype=np.float64)
    if values.size < 2:
        return 0.0
    p10, median, p90 = np.percentile(values, [10, 50, 90])
    return float((p90 - p10) / median) if median > 0 else float("inf")


SAMPLE_SECONDS = 1.0


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all cores from /proc/stat, None where there is none."""
    try:
        fields = [int(v) for v in open("/proc/stat").readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)   # idle + iowait
    return sum(fields) - idle, sum(fields)


def load_per_core() -> float:
    """How busy the cores are now, 0..1 per core: the busy share of CPU time over a one-second sample
    (called while we are idle, so it is other processes' work; the 1-minute load average would still
    carry our own previous measurement). Falls back to the load average per core, or 0."""
    first = _cpu_times()
    if first is not None:
        time.sleep(SAMPLE_SECONDS)
        second = _cpu_times()
        if second is not None and second[1] > first[1]:
            return (second[0] - first[0]) / (second[1] - first[1])
    try:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:
        return 0.0


def refuse_busy_start(what: str, force: bool, command: str) -> None:
    """Before a long measurement whose result would be kept: refuse at once when other processes already
    load the machine (the same check the record makes afterwards), unless forced."""
    load = load_per_core()
    if load > MAX_LOAD_BEFORE and not force:
        raise BusyMachineError(
            f"not measuring {what}: the machine is busy (cores {load:.0%} busy > {MAX_LOAD_BEFORE:.0%}: "
            f"other processes are running). Stop the other work (`uptime`, `top`) and run `{command}` again; to "
            f"measure anyway (recorded as forced), add --force")


@dataclass(frozen=True)
class Quietness:
    load_before: float      # busy share of the cores before the timed work (load_per_core)
    load_after: float       # ... and just after it
    cores: int
    spread: float           # median over the series of their relative spreads
    worst_spread: float     # the largest series spread
    series: int             # how many timed series
    forced: bool = False    # kept although busy (--force)

    @classmethod
    def measure(cls, load_before: float, series: Iterable[Sequence[float]]) -> "Quietness":
        """The record of a measurement: `load_before` taken before it (load_per_core()), the load now,
        and the spread of each series of repeats."""
        spreads = [relative_spread(s) for s in series]
        return cls(round(load_before, 3), round(load_per_core(), 3), os.cpu_count() or 1,
                   round(float(np.median(spreads)), 4) if spreads else 0.0, round(max(spreads, default=0.0), 4),
                   len(spreads))

    @property
    def busy_reasons(self) -> list[str]:
        reasons = []
        if self.load_before > MAX_LOAD_BEFORE:
            reasons.append(f"cores {self.load_before:.0%} busy before timing > {MAX_LOAD_BEFORE:.0%} "
                           f"(other processes were running)")
        if self.load_after > MAX_LOAD_AFTER:
            reasons.append(f"cores {self.load_after:.0%} busy just after timing > {MAX_LOAD_AFTER:.0%} "
                           f"(other processes were running)")
        if self.spread > MAX_SPREAD:
            reasons.append(f"repeats spread {self.spread:.1%} (median over {self.series} series, worst "
                           f"{self.worst_spread:.1%}) > {MAX_SPREAD:.0%}")
        return reasons

    @property
    def quiet(self) -> bool:
        return not self.busy_reasons

    def summary(self) -> str:
        state = "quiet" if self.quiet else "BUSY" + (" (kept with --force)" if self.forced else "")
        return (f"{state}: cores {self.load_before:.0%} -> {self.load_after:.0%} busy ({self.cores} cores), "
                f"repeats spread {self.spread:.1%} (worst {self.worst_spread:.1%})")

    def refuse_if_busy(self, what: str, force: bool, command: str) -> "Quietness":
        """This record to keep with `what`; a busy one raises BusyMachineError unless forced (then the
        record says forced)."""
        if self.quiet:
            return self
        if force:
            return Quietness(**{**asdict(self), "forced": True})
        raise BusyMachineError(
            f"not writing {what}: the machine was busy ({'; '.join(self.busy_reasons)}). Its numbers would be "
            f"the load's, not the device's. Stop the other work (`uptime`, `top`) and run `{command}` again; to "
            f"keep a busy measurement anyway (it is recorded as forced), add --force")

    def to_json(self) -> dict:
        return {**asdict(self), "quiet": self.quiet}

    @classmethod
    def from_json(cls, data: dict) -> "Quietness":
        return cls(float(data["load_before"]), float(data["load_after"]), int(data["cores"]), float(data["spread"]),
                   float(data["worst_spread"]), int(data["series"]), bool(data.get("forced", False)))
