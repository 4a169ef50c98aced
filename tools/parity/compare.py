"""Parity of an engine dir's runners on recorded real step inputs, through Polygraphy (`python -m tools check`).

    feeds [{input name: array}]        the manifest's inputs, one dict per step; recorded from the real
                                       decode loop by tools/parity/recorder.py
      -> save_feeds / load_feeds       Polygraphy's --load-inputs JSON (tools/parity/feeds.py), so
                                       `polygraphy run model.onnx --onnxrt --load-inputs F` replays them
      -> runners                       (tools/parity/runners.py) torch step (StepRunner: the reference), onnxruntime (OnnxrtRunner +
                                       SessionFromOnnx over the graph the runtime loads), tensorrt (TrtRunner
                                       over engine.plan, when tensorrt imports, the dir has one and a GPU is
                                       here; engine.json checked first, export/trt/key.py)
      -> Comparator.run                each runner on its own, so one that fails is reported, not fatal
      -> Comparator.compare_accuracy   every runner against the reference, elementwise atol/rtol per output
      -> ParityReport                  per step and output: max abs / rel error; argmax agreement of the
                                       logits rows; every mismatch of every runner at once
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tools.parity.feeds import Feed, feed_label


# --- tolerances ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tolerance:
    """An element mismatches when |diff| > atol AND |diff| / |reference| > rtol (Polygraphy's
    elementwise check): large values are held to rtol, values near zero to atol."""
    atol: float
    rtol: float

    def __post_init__(self) -> None:
        if not (self.atol >= 0 and self.rtol >= 0):
            raise ValueError(f"tolerances must be >= 0, got atol={self.atol}, rtol={self.rtol}")

    def __str__(self) -> str:
        return f"{self.atol:g}/{self.rtol:g}"


# Per graph dtype: output -> tolerance, "" for the others. The reference is always the fp32 torch step.
# fp32: onnxruntime's fused kernels (SimplifiedLayerNorm, MatMul+Add, attention) reorder sums; on the real
# model's recorded steps the worst measured is 1e-4 abs on logits (|logits| ~ 20), 3e-5 on keys/values:
# 1e-3 keeps a 10x margin and still catches a real bug (a wrong mask, position or weight moves logits by
# 0.1..10). fp16: the graph's weights and activations are rounded to fp16 (ulp 0.016 at 20): measured worst
# 0.094 on the real model's logits and 0.031 on keys/values (0.13 / 0.03 on the tiny test model); the
# defaults leave a 2-3x margin.
DEFAULT_TOLERANCES = {"float32": {"": Tolerance(1e-3, 1e-3)},
                      "float16": {"": Tolerance(0.1, 0.02), "logits": Tolerance(0.3, 0.02)}}


def parse_tolerances(text: str | None, dtype: str) -> dict[str, Tolerance]:
    """--tolerances: "ATOL:RTOL" for every output, or "OUTPUT=ATOL:RTOL,..." per output (the others keep
    the dtype's defaults). Returns {output name or "" (the others): Tolerance}."""
    if dtype not in DEFAULT_TOLERANCES:
        raise ValueError(f"no default tolerances for graph dtype {dtype!r}; pass --tolerances ATOL:RTOL")
    every: Tolerance | None = None
    named: dict[str, Tolerance] = {}
    for part in (p.strip() for p in (text or "").split(",")):
        if not part:
            continue
        name, _, pair = part.rpartition("=")
        atol, sep, rtol = pair.partition(":")
        try:
            if not sep:
                raise ValueError
            tolerance = Tolerance(float(atol), float(rtol))
        except ValueError as exc:
            raise ValueError(f"--tolerances takes ATOL:RTOL or OUTPUT=ATOL:RTOL,... (e.g. 'logits=2e-3:1e-3'), "
                             f"got {part!r}") from exc
        if name.strip():
            named[name.strip()] = tolerance
        else:
            every = tolerance
    # A bare pair replaces the dtype's defaults (all of them); named outputs override either.
    return {**(DEFAULT_TOLERANCES[dtype] if every is None else {"": every}), **named}


def tolerance_for(tolerances: Mapping[str, Tolerance], output: str) -> Tolerance:
    return tolerances.get(output, tolerances[""])


# --- the comparison --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OutputParity:
    step: int
    label: str
    runner: str
    output: str
    max_abs: float
    max_rel: float        # over the elements beyond atol: the number rtol is checked against (0 when none)
    tolerance: Tolerance
    passed: bool          # Polygraphy's elementwise verdict


@dataclass(frozen=True)
class ArgmaxParity:
    """Argmax of each logits row against the reference's. A row that differs is a tie when the
    reference's own logits of the two tokens are within the logits tolerance (an argmax flip the
    tolerance allows); any other difference fails."""
    step: int
    label: str
    runner: str
    rows: int
    agree: int
    ties: tuple[int, ...] = ()
    differ: tuple[tuple[int, int, int, float], ...] = ()   # (row, reference token, runner token, reference gap)

    @property
    def passed(self) -> bool:
        return not self.differ


@dataclass(frozen=True)
class ParityReport:
    reference: str
    compared: tuple[tuple[str, str], ...]       # (runner, what it ran)
    skipped: tuple[tuple[str, str], ...]        # (runner, why)
    errors: tuple[tuple[str, str], ...]         # (runner, what went wrong)
    labels: tuple[str, ...]
    outputs: tuple[OutputParity, ...]
    argmax: tuple[ArgmaxParity, ...]

    @property
    def mismatches(self) -> list[str]:
        """Every failure, one line each: runner errors, outputs beyond tolerance, argmax differences."""
        lines = [f"{runner}: failed to run: {error}" for runner, error in self.errors]
        if not self.compared:
            lines.append(f"nothing to compare with the {self.reference} reference: no other runner could run")
        lines += [f"step {o.step} ({o.label}) {o.runner} {o.output}: max abs {o.max_abs:.3g}, max rel {o.max_rel:.3g} "
                  f"beyond tolerance atol/rtol {o.tolerance}" for o in self.outputs if not o.passed]
        lines += [f"step {a.step} ({a.label}) {a.runner} logits argmax differs in {len(a.differ)}/{a.rows} rows: "
                  + ", ".join(f"row {r}: {want} vs {got} (reference gap {gap:.3g})" for r, want, got, gap in a.differ[:5])
                  for a in self.argmax if not a.passed]
        return lines

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def format(self) -> str:
        lines = [f"reference: {self.reference}; compared: "
                 + ("; ".join(f"{name} ({what})" for name, what in self.compared) or "none")]
        lines += [f"skipped {name}: {why}" for name, why in self.skipped]
        lines.append(f"{'step':<24}{'runner':<13}{'output':<12}{'max abs':>10}{'max rel':>10}{'atol/rtol':>16}"
                     f"{'argmax':>12}  ok")
        argmax = {(a.step, a.runner): a for a in self.argmax}
        for o in self.outputs:
            a = argmax.get((o.step, o.runner)) if o.output == "logits" else None
            agree = "" if a is None else f"{a.agree}/{a.rows}" + (f"+{len(a.ties)}t" if a.ties else "")
            ok = o.passed and (a is None or a.passed)
            lines.append(f"{o.label:<24}{o.runner:<13}{o.output:<12}{o.max_abs:>10.2e}{o.max_rel:>10.2e}"
                         f"{str(o.tolerance):>16}{agree:>12}  {'ok' if ok else 'MISMATCH'}")
        mismatches = self.mismatches
        lines.append(f"PASS: {len(self.outputs)} comparisons on {len(self.labels)} steps" if not mismatches else
                     f"FAIL: {len(mismatches)} mismatch(es):\n" + "\n".join(f"  {m}" for m in mismatches))
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"reference": self.reference, "compared": [list(c) for c in self.compared],
                "skipped": [list(s) for s in self.skipped], "errors": [list(e) for e in self.errors],
                "steps": list(self.labels), "ok": self.ok, "mismatches": self.mismatches,
                "outputs": [{**asdict(o), "tolerance": asdict(o.tolerance)} for o in self.outputs],
                "argmax": [{**asdict(a), "passed": a.passed} for a in self.argmax]}


def run_parity(reference, runners: Sequence[tuple[object, str]], feeds: Sequence[Feed],
               tolerances: Mapping[str, Tolerance], labels: Sequence[str] | None = None,
               skipped: Sequence[tuple[str, str]] = ()) -> ParityReport:
    """Run the reference and every (runner, description) on the feeds with Polygraphy's Comparator, and
    compare each runner's outputs with the reference's (compare_accuracy, elementwise per output)."""
    from polygraphy.comparator import Comparator, RunResults, SimpleCompareFunc
    from polygraphy.exception import PolygraphyException
    from polygraphy.logger import G_LOGGER

    labels = tuple(labels) if labels is not None else tuple(feed_label(f) for f in feeds)
    results, errors, compared = RunResults(), [], []
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):   # our report says it all, once
        for runner, description in [(reference, "reference"), *runners]:
            try:
                run = Comparator.run([runner], data_loader=list(feeds))
            except (PolygraphyException, RuntimeError, ValueError, OSError) as exc:
                if runner is reference:
                    raise
                errors.append((runner.name, f"{type(exc).__name__}: {exc}"))
                continue
            results.append(run[0])
            if runner is not reference:
                compared.append((runner.name, description))
        outputs, argmax = [], []
        if compared:
            atol = {name: t.atol for name, t in tolerances.items()}
            rtol = {name: t.rtol for name, t in tolerances.items()}
            func = SimpleCompareFunc(atol=atol, rtol=rtol, check_error_stat="elemwise")
            # (runner, reference): Polygraphy's relative error divides by the second one's values
            accuracy = Comparator.compare_accuracy(results, comparisons=[(i, 0) for i in range(1, len(results))],
                                                   compare_func=func)[0]
            ref_name, ref_iterations = results[0]
            for name, iterations in list(results)[1:]:
                per_step = accuracy[(name, ref_name)]
                for step, (verdicts, got, want) in enumerate(zip(per_step, iterations, ref_iterations)):
                    for output, verdict in verdicts.items():
                        tol = tolerance_for(tolerances, output)
                        outputs.append(OutputParity(step, labels[step], name, output, float(verdict.max_absdiff),
                                                    _rel_beyond_atol(got[output], want[output], tol),
                                                    tol, bool(verdict)))
                    argmax.append(_argmax_parity(step, labels[step], name, got["logits"], want["logits"],
                                                 tolerance_for(tolerances, "logits")))
    return ParityReport(reference.name, tuple(compared), tuple(skipped), tuple(errors), labels, tuple(outputs),
                        tuple(argmax))


def _rel_beyond_atol(got: np.ndarray, want: np.ndarray, tol: Tolerance) -> float:
    if got.shape != want.shape:
        return float("inf")
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    beyond = diff > tol.atol
    if not beyond.any():
        return 0.0
    return float(np.max(diff[beyond] / np.maximum(np.abs(want[beyond].astype(np.float64)), np.finfo(np.float64).tiny)))


def _argmax_parity(step: int, label: str, runner: str, got: np.ndarray, want: np.ndarray, tol: Tolerance) -> ArgmaxParity:
    got_ids, want_ids = got.argmax(-1), want.argmax(-1)
    ties, differ = [], []
    for row in np.flatnonzero(got_ids != want_ids):
        ref = want[row].astype(np.float64)
        top, other = ref[want_ids[row]], ref[got_ids[row]]
        gap = float(top - other)
        if gap <= tol.atol + tol.rtol * abs(top):
            ties.append(int(row))
        else:
            differ.append((int(row), int(want_ids[row]), int(got_ids[row]), gap))
    return ArgmaxParity(step, label, runner, int(want_ids.shape[0]), int((got_ids == want_ids).sum()), tuple(ties),
                        tuple(differ))


def default_parity_dir(engine_dir: str | Path) -> Path:
    """Where `python -m tools check` writes inputs.json and report.json: artifacts/parity/<model>/<target>/
    <method> for an engine dir under artifacts/engines, else <engine dir>-parity beside it (never inside
    the engine dir, which a re-export replaces whole)."""
    from export.paths import ARTIFACTS_DIR

    engine_dir = Path(engine_dir).resolve()
    engines = (ARTIFACTS_DIR / "engines").resolve()
    if engine_dir.is_relative_to(engines):
        return ARTIFACTS_DIR / "parity" / engine_dir.relative_to(engines)
    return engine_dir.with_name(engine_dir.name + "-parity")
