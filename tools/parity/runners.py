"""The runners parity compares, as Polygraphy runners: the torch step (StepRunner, the reference),
onnxruntime over the graph the runtime loads, and TensorRT over engine.plan when tensorrt imports, the
dir has one and a GPU is here (engine.json checked first)."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata

from export.manifest import Manifest, ManifestError, TensorSpec
from export.step_model import StepModel
from tools.parity.feeds import Feed, feed_shape

REFERENCE = "torch"   # the runner every other is compared with: the torch step


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
                            tensor("past_mask"), *sliding)
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
