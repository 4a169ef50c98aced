"""Parity of an engine dir's runners on recorded real step inputs, through Polygraphy (`python -m export check`).

    feeds [{input name: array}]        the manifest's inputs, one dict per step; recorded from the real
                                       decode loop by runtime/step_recorder.py (the top-floor CLI joins them)
      -> save_feeds / load_feeds       Polygraphy's --load-inputs JSON (polygraphy.json.save_json of the
                                       list), so `polygraphy run model.onnx --onnxrt --load-inputs F` replays them
      -> runners                       torch step (StepRunner: the reference), onnxruntime (OnnxrtRunner +
                                       SessionFromOnnx over the graph the runtime loads), tensorrt (TrtRunner
                                       over engine.plan, when tensorrt imports, the dir has one and a GPU is
                                       here; engine.json checked first, export/trt/key.py)
      -> Comparator.run                each runner on its own, so one that fails is reported, not fatal
      -> Comparator.compare_accuracy   every runner against the reference, elementwise atol/rtol per output
      -> ParityReport                  per step and output: max abs / rel error; argmax agreement of the
                                       logits rows; every mismatch of every runner at once

Library only: it imports nothing from runtime/ (export/ stands below it).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata

from export.manifest import Manifest, ManifestError, TensorSpec
from export.step_model import StepModel

REFERENCE = "torch"


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


# --- the recorded inputs ---------------------------------------------------------------------------------

Feed = Mapping[str, np.ndarray]


def save_feeds(feeds: Sequence[Feed], path: str | Path) -> Path:
    """Write the feeds as Polygraphy's --load-inputs JSON (a list of feed dicts)."""
    from polygraphy.json import save_json
    from polygraphy.logger import G_LOGGER

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        save_json([OrderedDict(feed) for feed in feeds], str(path), description="recorded step inputs")
    return path


def load_feeds(path: str | Path) -> list[OrderedDict]:
    from polygraphy.json import load_json
    from polygraphy.logger import G_LOGGER

    if not Path(path).is_file():
        raise FileNotFoundError(f"step inputs {path} do not exist; record them with `python -m export check ENGINE_DIR`")
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        feeds = load_json(str(path), description="recorded step inputs")
    if not isinstance(feeds, list) or not all(isinstance(f, dict) for f in feeds):
        raise ValueError(f"{path} is not Polygraphy input data (a JSON list of feed dicts); record it with "
                         f"`python -m export check ENGINE_DIR`")
    return [OrderedDict(f) for f in feeds]


def check_feeds(feeds: Sequence[Feed], manifest: Manifest) -> None:
    """Every feed holds exactly the manifest's inputs, in its dtypes, at a shape some profile covers."""
    if not feeds:
        raise ValueError("no step inputs to compare on")
    problems = []
    for i, feed in enumerate(feeds):
        if list(feed) != manifest.input_names:
            problems.append(f"step {i}: inputs {list(feed)[:4]}... are not the manifest's {manifest.input_names[:4]}...")
            continue
        problems += [f"step {i}: {spec.name} is {feed[spec.name].dtype}, the manifest says {spec.dtype}"
                     for spec in manifest.inputs if feed[spec.name].dtype != np.dtype(spec.dtype)]
        try:
            manifest.check_step_shape(*feed_shape(feed))
        except ManifestError as exc:
            problems.append(f"step {i}: {exc}")
    if problems:
        raise ValueError(f"step inputs do not fit {manifest.dir}: " + "; ".join(problems))


def feed_shape(feed: Feed) -> tuple[int, int]:
    """(T, S): tree nodes and committed cache entries of a step."""
    return int(feed["input_ids"].shape[0]), int(feed["past_key.0"].shape[0])


def feed_label(feed: Feed) -> str:
    """'chain T=46 S=0' (a prefill: every node sees all before it) or 'tree T=10 S=57'."""
    t, s = feed_shape(feed)
    chain = np.array_equal(feed["tree_mask"] == 0, np.tril(np.ones((t, t), dtype=bool)))
    return f"{'chain' if chain else 'tree'} T={t} S={s}"


# --- runners ---------------------------------------------------------------------------------------------

def _metadata(specs: Sequence[TensorSpec]) -> TensorMetadata:
    meta = TensorMetadata()
    for spec in specs:
        meta.add(spec.name, np.dtype(spec.dtype), [d if isinstance(d, int) else None for d in spec.shape])
    return meta


def step_model_from_engine(manifest: Manifest) -> StepModel:
    """The torch step an engine dir was exported from: its model source dir (checked against the
    recorded fingerprint) with the method's trained tensors (checked against the recorded hash), fp32."""
    from export.checkpoint import load_checkpoint, model_fingerprint
    from export.methods import METHODS

    model, method = manifest.model, manifest.method
    source = Path(model.source_dir)
    if not (source / "config.json").is_file() or model_fingerprint(source) != model.fingerprint:
        raise ManifestError(f"{manifest.dir} was exported from {source} (fingerprint {model.fingerprint}), which is "
                            f"missing or holds another checkpoint now: re-export the engine from the model you have")
    hf_model, _ = load_checkpoint(source)
    extras = None
    if METHODS[method.name].trained:
        if method.checkpoint is None:
            raise ManifestError(f"{manifest.dir} is a {method.name} engine without its checkpoint record; re-export it")
        extras = METHODS[method.name].load_extras(method.checkpoint.file, model.fingerprint, model.hidden_size)
        if extras.weights_sha256 != method.weights_sha256:
            raise ManifestError(f"{method.checkpoint.file} no longer holds the {method.name} tensors baked into "
                                f"{manifest.dir}: re-export the engine (`make engine`)")
    step = StepModel(hf_model, None if extras is None else extras.embeddings,
                     None if extras is None else extras.transfer_maps)
    return step.eval()


class StepRunner(BaseRunner):
    """Polygraphy runner around the torch step (export/step_model.StepModel): the reference. Takes
    the manifest's inputs and returns its outputs in the manifest's dtypes; runs in the model's dtype."""

    def __init__(self, step: StepModel, manifest: Manifest, name: str = REFERENCE) -> None:
        super().__init__(name=name, prefix="torch-step")
        self.step = step
        self.step_mask_inputs = manifest.model.sliding_mask_inputs
        self._inputs, self._outputs = manifest.inputs, manifest.outputs

    def get_input_metadata_impl(self):
        return _metadata(self._inputs)

    @torch.inference_mode()
    def infer_impl(self, feed_dict: Feed) -> OrderedDict:
        dtype = next(self.step.parameters()).dtype
        n = self.step.num_layers

        def tensor(name: str, cast: bool = True) -> torch.Tensor:
            t = torch.from_numpy(np.ascontiguousarray(feed_dict[name]))
            return t.to(dtype) if cast else t

        start = time.perf_counter()
        sliding = [tensor(name) for name in self.step_mask_inputs]     # sliding-window families only
        outputs = self.step(tensor("input_ids", False), tensor("position_ids", False), tensor("tree_mask"),
                            [tensor(f"past_key.{i}") for i in range(n)], [tensor(f"past_value.{i}") for i in range(n)],
                            None, *sliding)
        self.inference_time = time.perf_counter() - start
        return OrderedDict((spec.name, out.numpy().astype(spec.dtype, copy=False))
                           for spec, out in zip(self._outputs, outputs))


def ort_runner(manifest: Manifest, provider: str = "CPUExecutionProvider", level: str = "extended"):
    """Polygraphy's onnxruntime runner over the graph the runtime loads (runtime/backends/ort_backend.py):
    the saved optimised graph with optimisations off, else the plain export optimised in memory.
    Returns (runner, description)."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    from export.ort_optimize import graph_optimization_level, usable_optimized_model

    saved = usable_optimized_model(manifest, provider, level)
    path, level_used = (saved, "disable") if saved is not None else (manifest.onnx_path, level)
    session = SessionFromOnnx(str(path), providers=[provider],
                              graph_optimization_level=graph_optimization_level(level_used))
    how = "saved optimised graph" if saved is not None else f"plain export, optimised '{level}' in memory"
    return OnnxrtRunner(session, name="onnxruntime"), f"{path.name} ({how}, {provider})"


def trt_runner(manifest: Manifest, device: str = "cuda"):
    """(runner, description) for the TensorRT engine in the dir (export/trt/: engine.plan + engine.json),
    or (None, why it is skipped). An engine built for another GPU or TensorRT raises EngineMismatchError
    (with the fix) before anything is deserialized."""
    from export.trt.host import import_tensorrt
    from export.trt.key import PLAN_NAME, EngineRecord, check_engine, present_facts

    plan = manifest.dir / PLAN_NAME
    missing = []
    try:
        trt = import_tensorrt()
    except ImportError as exc:
        trt = None
        missing.append(str(exc))
    if not plan.is_file():
        missing.append(f"{manifest.dir} has no {PLAN_NAME} (built by `make engine GPU=<gpu>` on that GPU)")
    elif not torch.cuda.is_available():
        missing.append(f"torch sees no CUDA GPU here to run {PLAN_NAME} on")
    if missing:
        return None, "; ".join(missing)
    record = EngineRecord.load(manifest.dir)
    check_engine(record, manifest, present_facts(device, trt.__version__))
    profiles = record.key.profiles
    return profiled_trt_runner(plan, profiles), f"{PLAN_NAME} (TensorRT {trt.__version__}, profiles " \
                                                 f"{', '.join(p.name for p in profiles)})"


def profiled_trt_runner(plan: Path, profiles):
    """Polygraphy's TrtRunner over `plan`, selecting per feed the engine's first optimization profile
    that covers its T and S (export/trt/profiles.select_profile: engine order = manifest order)."""
    from polygraphy.backend.trt import EngineFromPath, TrtRunner

    from export.trt.profiles import select_profile

    class ProfiledTrtRunner(TrtRunner):
        def infer_impl(self, feed_dict, *args, **kwargs):
            self.set_profile(select_profile(profiles, *feed_shape(feed_dict)))
            return TrtRunner.infer_impl.__wrapped__(self, feed_dict, *args, **kwargs)

    return ProfiledTrtRunner(EngineFromPath(str(plan)), name="tensorrt")


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


def engine_runners(manifest: Manifest, names: Sequence[str] | None = None
                   ) -> tuple[list[tuple[object, str]], list[tuple[str, str]]]:
    """The runners of an engine dir other than the reference: [(runner, what it runs)], [(name, why skipped)].
    `names` picks some of onnxruntime, tensorrt (default: every one that is available)."""
    builders: dict[str, Callable[[], tuple[object, str]]] = {"onnxruntime": lambda: ort_runner(manifest),
                                                             "tensorrt": lambda: trt_runner(manifest)}
    unknown = sorted(set(names or ()) - set(builders))
    if unknown:
        raise ValueError(f"unknown runner(s) {unknown}; choose from {', '.join(builders)}")
    runners, skipped = [], []
    for name in names or builders:
        runner, what = builders[name]()
        if runner is None:
            skipped.append((name, what))
        else:
            runners.append((runner, what))
    return runners, skipped


def default_parity_dir(engine_dir: str | Path) -> Path:
    """Where `python -m export check` writes inputs.json and report.json: artifacts/parity/<model>/<target>/
    <method> for an engine dir under artifacts/engines, else <engine dir>-parity beside it (never inside
    the engine dir, which a re-export replaces whole)."""
    from export.paths import ARTIFACTS_DIR

    engine_dir = Path(engine_dir).resolve()
    engines = (ARTIFACTS_DIR / "engines").resolve()
    if engine_dir.is_relative_to(engines):
        return ARTIFACTS_DIR / "parity" / engine_dir.relative_to(engines)
    return engine_dir.with_name(engine_dir.name + "-parity")
