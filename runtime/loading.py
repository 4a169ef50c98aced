"""Loading: everything that happens before a backend runs its first step, apart from the backends
that run steps (Polygraphy's split of loaders and runners).

    load_engine(engine_dir, device, max_context, variant) -> LoadedEngine
        the deployment path (Generator.from_engine): the manifest checked against its graph, the
        engine variant, the runner the device takes (TensorRT for a TensorRT engine dir on CUDA,
        else onnxruntime) with its files checked (onnxruntime: the optimised graph when usable, else
        the plain export's hashes; TensorRT: engine.json's compatibility key against this machine,
        then the plan's sha256), the trees the dir installs, and the tokenizer
    open_backend(graph) -> Backend        the runner over a checked graph (opens its session / context)
    load_pretrained(backend, model_dir, method, ...) -> (Backend, tokenizer)
        from a checkpoint dir (Generator.from_pretrained): the torch step built from the checkpoint,
        or the engine dir export/ prepares (onnxruntime) or the TensorRT engine built on this GPU,
        each then opened as above

A backend never reads a manifest's files or an engine.json itself: it takes an EngineGraph.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import torch

from export.manifest import Manifest, ManifestError, check_file
from export.methods import TREE_METHODS
from export.ort_optimize import PROVIDERS, usable_optimized_model
from export.quantize import DEFAULT_VARIANT, check_engine_variant, check_variant
from export.trt.key import ENGINE_JSON, DeviceFacts, EngineMismatchError, EngineRecord, check_engine, \
    is_trt_engine_dir, present_facts, rebuild_command
from runtime.backends import DEFAULT_DTYPE, MANIFEST_TORCH_DTYPES, Backend, torch_dtype
from runtime.backends.base import ONNXRUNTIME, TENSORRT, EngineGraph
from runtime.backends.ort_backend import OrtOptions
from trees.devices import device_key

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from runtime.methods import Method



@dataclass(frozen=True)
class LoadedEngine:
    """An engine dir loaded for a device: its graph, its tokenizer and the trees it installs."""

    graph: EngineGraph
    tokenizer: "PreTrainedTokenizerBase"
    trees: dict[str, Path] = field(default_factory=dict)   # method -> <method>-tree.json in the dir

    @property
    def manifest(self) -> Manifest:
        return self.graph.manifest


def checked_max_context(manifest: Manifest, max_context: int | None) -> int:
    """The cache size a backend allocates: the engine's unless `max_context` asks for less."""
    if max_context is None:
        return manifest.max_context
    if max_context > manifest.max_context:
        raise ManifestError(f"max_context {max_context} exceeds the engine's {manifest.max_context} "
                            f"({manifest.dir}); re-export with --max-context {max_context}")
    return max_context


def onnxruntime_graph(manifest: Manifest, device: str | torch.device = "cpu", max_context: int | None = None,
                      optimization: str = OrtOptions.optimization) -> EngineGraph:
    """The graph onnxruntime runs on `device`: the saved optimised graph when it is current for the
    device's provider (export/ort_optimize.py), else the plain export, whose files are hashed here (a
    backend opening it optimises it in memory, never writes it)."""
    import onnxruntime as ort

    device = torch.device(device)
    provider = PROVIDERS.get(device.type)
    if provider is None or provider not in ort.get_available_providers():
        raise ValueError(f"device {device} needs onnxruntime's {provider or 'matching'} execution provider; "
                         f"this onnxruntime {ort.__version__} has {', '.join(ort.get_available_providers())}"
                         + (" (install onnxruntime-gpu for CUDA)" if device.type == "cuda" else ""))
    size = checked_max_context(manifest, max_context)
    optimized = usable_optimized_model(manifest, provider, optimization)
    if optimized is None:
        for record in (manifest.onnx, *manifest.external_data):
            check_file(manifest.dir, record)
    return EngineGraph(manifest, ONNXRUNTIME, optimized or manifest.onnx_path, size, provider=provider,
                       optimized=optimized is not None)


def tensorrt_graph(manifest: Manifest, device: str | torch.device = "cuda", max_context: int | None = None,
                   facts: DeviceFacts | None = None) -> EngineGraph:
    """A TensorRT engine dir's plan for this machine: engine.json's key is checked against the manifest
    and the device (`facts`, default: the CUDA device and the installed TensorRT) before any plan byte is
    read, then the plan's sha256; a mismatch names the command that rebuilds the engine here."""
    device = torch.device(device)
    if facts is None:
        if device.type != "cuda":
            raise ValueError(f"a TensorRT engine runs on a CUDA device, not {device}: pass device='cuda' "
                             f"(or load the engine dir's ONNX with onnxruntime: backend 'onnxruntime')")
        from export.trt.host import import_tensorrt

        facts = present_facts(str(device), import_tensorrt().__version__)
    size = checked_max_context(manifest, max_context)
    record = EngineRecord.load(manifest.dir)
    check_engine(record, manifest, facts)
    check_file(manifest.dir, record.plan)
    return EngineGraph(manifest, TENSORRT, manifest.dir / record.plan.file, size, record=record, facts=facts)


def engine_graph(manifest: Manifest, device: str | torch.device = "cpu", max_context: int | None = None) -> EngineGraph:
    """The runner an engine dir takes on `device`: TensorRT for a TensorRT engine dir (engine.json) on a
    CUDA device, else onnxruntime (the dir's ONNX)."""
    if is_trt_engine_dir(manifest.dir) and torch.device(device).type == "cuda":
        return tensorrt_graph(manifest, device, max_context)
    return onnxruntime_graph(manifest, device, max_context)


def installed_trees(manifest: Manifest) -> dict[str, Path]:
    """{method: tree file} of the tree methods whose tree `make engine` installed in the dir."""
    from export.engine import engine_tree_path

    paths = {name: engine_tree_path(manifest, name) for name in TREE_METHODS}
    return {name: path for name, path in paths.items() if path.is_file()}


def load_engine(engine_dir: str | Path, device: str = "cpu", max_context: int | None = None,
                variant: str | None = None) -> LoadedEngine:
    """An exported engine dir loaded for `device` (nothing opened yet: see open_backend). `variant`,
    when given, must be the one the dir holds."""
    from transformers import AutoTokenizer

    manifest = Manifest.load(engine_dir, verify_files=False)   # the graph's loader hashes the files it runs
    if variant is not None:
        check_engine_variant(manifest, variant)
    graph = engine_graph(manifest, device, max_context)
    return LoadedEngine(graph, AutoTokenizer.from_pretrained(manifest.dir), installed_trees(manifest))


# A loader's `static_steps`: None = the device's default, True / False, or the step sizes themselves.
StaticSteps = bool | Sequence[int] | None


def device_step_sizes(device: str | torch.device, tree: int, max_batch: int = 1,
                      static: StaticSteps = None) -> tuple[int, ...] | None:
    """The static step sizes a backend runs for drafts of up to `tree` nodes, or None for dynamic steps.
    `static` None: the device's default, static on CUDA (one kernel choice per size, CUDA graphs), dynamic
    on the CPU, where attention over every cell of the cache would cost; True: the sizes for the tree and
    max_batch (export/static_steps.py); a sequence: those sizes (the latency profiles time each T).
    Every static step binds all max_batch x max_context cells: size the cache for the deployment."""
    from export.static_steps import step_sizes

    if static is None:
        static = torch.device(device).type == "cuda"
    if isinstance(static, bool):
        return step_sizes(tree, max_batch) if static else None
    sizes = tuple(sorted({int(size) for size in static}))
    if not sizes or sizes[0] < 1:
        raise ValueError(f"static step sizes must be >= 1, got {list(static)}")
    return sizes


def open_backend(graph: EngineGraph, device: str | torch.device | None = None, *, max_batch: int = 1,
                 options: OrtOptions | None = None, tensorrt: ModuleType | None = None,
                 step_sizes: Sequence[int] | None = None) -> Backend:
    """The backend that runs `graph` on `device` (default: cuda for TensorRT, else cpu), its cache sized
    for `max_batch` sequences. `tensorrt`: a stand-in module for the tests (default: the real one).
    `step_sizes`: onnxruntime's static steps (device_step_sizes; TensorRT's are the engine's profiles)."""
    if graph.runner == TENSORRT:
        from runtime.backends.trt_backend import TrtBackend

        return TrtBackend(graph, "cuda" if device is None else device, tensorrt=tensorrt, max_batch=max_batch)
    from runtime.backends.ort_backend import OrtBackend

    return OrtBackend(graph, "cpu" if device is None else device, options or OrtOptions(), max_batch=max_batch,
                      step_sizes=step_sizes)


def open_engine(engine: Manifest | str | Path, device: str = "cpu", max_context: int | None = None) -> Backend:
    """An engine dir's backend in one call (the tools' way in: no tokenizer, no method)."""
    manifest = engine if isinstance(engine, Manifest) else Manifest.load(engine, verify_files=False)
    return open_backend(engine_graph(manifest, device, max_context), device)


# --- from a checkpoint dir ---------------------------------------------------------------------------

Loaded = tuple[Backend, "PreTrainedTokenizerBase"]


def refuse_variant(backend: str, variant: str) -> None:
    """The quantized variants are onnxruntime engines (MatMulNBits); other backends refuse them up front."""
    if check_variant(variant) != DEFAULT_VARIANT:
        raise ValueError(f"the {backend} backend has no {variant} variant: weight-only {variant} is an onnxruntime "
                         f"engine (backend='onnxruntime', variant={variant!r}; `make engine GPU=cpu QUANT={variant}`)")


def pretrained_torch(model_dir: Path, method: "Method", device: str, max_context: int, max_batch: int = 1,
                     threads: int | None = None, dtype: str = DEFAULT_DTYPE,
                     variant: str = DEFAULT_VARIANT, static_steps: StaticSteps = None) -> Loaded:
    from export.checkpoint import load_checkpoint
    from export.step_model import StepModel
    from runtime.backends.torch_backend import TorchBackend

    refuse_variant("torch", variant)
    if threads is not None:   # process-wide: torch has one intra-op pool
        torch.set_num_threads(threads)
    hf_model, tokenizer = load_checkpoint(model_dir, dtype=torch_dtype(dtype))
    step_model = StepModel(hf_model, method.extras.embeddings, method.extras.transfer_maps)
    del hf_model
    # On CUDA static steps captured as CUDA graphs (an eager step is bound by the host's kernel launches)
    return TorchBackend(step_model, max_context=max_context, device=device, max_batch=max_batch,
                        step_sizes=device_step_sizes(device, method.proposer.max_draft_tokens, max_batch,
                                                     static_steps)), tokenizer


def pretrained_onnxruntime(model_dir: Path, method: "Method", device: str, max_context: int, max_batch: int = 1,
                           threads: int | None = None, dtype: str = DEFAULT_DTYPE, variant: str = DEFAULT_VARIANT,
                           static_steps: StaticSteps = None) -> Loaded:
    from transformers import AutoTokenizer

    from export.engine import prepare_engine

    if dtype != DEFAULT_DTYPE:
        raise ValueError(f"the onnxruntime backend prepares {DEFAULT_DTYPE} engine dirs; for {dtype}, export one "
                         f"(`python -m export onnx --dtype {dtype} --out DIR`) and load it with "
                         f"Generator.from_engine(DIR)")
    manifest = prepare_engine(model_dir, method.spec.graph, method.extras, torch.device(device).type, max_context,
                              method.proposer.max_draft_tokens, variant, max_batch)
    check_engine_variant(manifest, variant)
    manifest.check_tree_size(method.proposer.max_draft_tokens)
    graph = onnxruntime_graph(manifest, device, max_context)
    return (open_backend(graph, device, max_batch=max_batch, options=OrtOptions(threads=threads),
                         step_sizes=device_step_sizes(device, method.proposer.max_draft_tokens, max_batch,
                                                      static_steps)),
            AutoTokenizer.from_pretrained(manifest.dir))


def pretrained_tensorrt(model_dir: Path, method: "Method", device: str, max_context: int, max_batch: int = 1,
                        threads: int | None = None, dtype: str = DEFAULT_DTYPE, variant: str = DEFAULT_VARIANT,
                        static_steps: StaticSteps = None) -> Loaded:
    """The TensorRT engine built on this GPU for the method's graph (`make engine GPU=...`, found by its
    engine.json key); its precision is the one it was built with (fp16 by default): `dtype` other
    than the default must name it."""
    from transformers import AutoTokenizer

    from export.trt.host import import_tensorrt

    refuse_variant("tensorrt", variant)
    if static_steps is False:
        raise ValueError("TensorRT engines run static steps only (export/trt/profiles.py): leave static_steps unset")
    facts = present_facts(device, import_tensorrt().__version__)
    manifest = find_trt_engine(model_dir, method.spec.graph, method.extras.weights_sha256, facts)
    if dtype != DEFAULT_DTYPE and torch_dtype(dtype) != MANIFEST_TORCH_DTYPES[manifest.dtype]:
        raise ValueError(f"the TensorRT engine in {manifest.dir} is {manifest.dtype}, not {dtype}: build one with "
                         f"`python -m export engine --target ... --dtype {dtype}`")
    manifest.check_tree_size(method.proposer.max_draft_tokens)
    graph = tensorrt_graph(manifest, device, max_context, facts)
    return open_backend(graph, device, max_batch=max_batch), AutoTokenizer.from_pretrained(manifest.dir)


def find_trt_engine(model_dir: str | Path, graph: str, weights_sha256: str | None, facts: DeviceFacts) -> Manifest:
    """The TensorRT engine dir serving `graph` (with those trained tensors) of `model_dir` on the device
    `facts` describes: artifacts/engines/<model>/<any target>/<graph>/ whose engine.json matches.
    Engines are never built here (that takes minutes): none matching -> the command that builds one."""
    from export.checkpoint import model_fingerprint
    from export.engine import engine_dir

    model_engines = engine_dir(model_dir, "*", graph).parent.parent
    fingerprint = model_fingerprint(model_dir)
    refused = []
    for path in sorted(model_engines.glob(f"*/{graph}/{ENGINE_JSON}")):
        try:
            manifest = Manifest.load(path.parent, verify_files=False)
            problems = EngineRecord.load(path.parent).key.mismatches(manifest, facts)
        except ManifestError as exc:
            refused.append(f"{path.parent}: {exc}")
            continue
        if manifest.model.fingerprint != fingerprint:
            problems.append(f"exported from model {manifest.model.fingerprint}, not {fingerprint}")
        if manifest.method.weights_sha256 != weights_sha256:
            problems.append("its trained tensors are not the method's checkpoint")
        if not problems:
            return manifest
        refused.append(f"{path.parent}: " + "; ".join(problems))
    found = f" (refused: {' | '.join(refused)})" if refused else f" (none under {model_engines})"
    raise EngineMismatchError(
        f"no TensorRT engine of the {graph} graph of {model_dir} for {facts.gpu_name} with TensorRT "
        f"{facts.tensorrt_version}{found}: build one on this machine with `{rebuild_command(facts)}` (or "
        f"`python -m export engine --target {device_key('cuda', facts.gpu_name)} --method {graph}`)")


@dataclass(frozen=True)
class BackendSpec:
    name: str
    load: Callable[..., Loaded]   # (model_dir, method, device, max_context, max_batch, dtype=..., variant=...)
    exported: bool                # runs an exported engine dir (Generator.from_engine)


BACKENDS: dict[str, BackendSpec] = {spec.name: spec for spec in (
    BackendSpec("torch", pretrained_torch, exported=False),
    BackendSpec(ONNXRUNTIME, pretrained_onnxruntime, exported=True),
    BackendSpec(TENSORRT, pretrained_tensorrt, exported=True),
)}


def backend_spec(name: str) -> BackendSpec:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return BACKENDS[name]


def load_pretrained(name: str, model_dir: str | Path, method: "Method", device: str = "cpu",
                    max_context: int | None = None, dtype: str = DEFAULT_DTYPE,
                    variant: str = DEFAULT_VARIANT, max_batch: int = 1, threads: int | None = None,
                    static_steps: StaticSteps = None) -> Loaded:
    """The backend `name` for `model_dir` running `method` (its trained tensors included), and the
    tokenizer; `variant` (fp32, int8, int4) is the onnxruntime engine's weight quantization; the cache
    holds `max_batch` sequences; `threads`: the backend's compute threads (None: its default);
    `static_steps`: steps padded to a few static shapes (None: on CUDA only; device_step_sizes)."""
    from export.manifest import DEFAULT_MAX_CONTEXT

    spec = backend_spec(name)
    torch_dtype(dtype)  # a bad name fails before any loading
    check_variant(variant)
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    return spec.load(Path(model_dir), method, device, DEFAULT_MAX_CONTEXT if max_context is None else max_context,
                     max_batch, threads, dtype=dtype, variant=variant, static_steps=static_steps)


__all__ = ["BACKENDS", "BackendSpec", "EngineGraph", "LoadedEngine", "backend_spec", "engine_graph", "find_trt_engine",
           "load_engine", "load_pretrained", "onnxruntime_graph", "open_backend", "open_engine", "tensorrt_graph"]
