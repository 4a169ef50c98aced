"""The backend registry: name -> loader that turns (checkpoint dir, built method) into a ready
backend and its tokenizer. `torch` is the reference; `onnxruntime` runs the exported engine dir
that export/ prepares (artifacts/engines/<model>/<cpu|cuda>/<graph>/, re-exported when stale);
`tensorrt` runs the TensorRT engine `make engine GPU=<gpu>` built on this GPU (found by its engine.json
key, never built here). `variant` (export/quantize.py: fp32, int8, int4) picks a weight-only quantized
onnxruntime engine dir (<graph>-<variant>/); torch and tensorrt run fp32 weights (or their dtype) only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from export.quantize import DEFAULT_VARIANT, check_variant
from runtime.backends.base import MANIFEST_TORCH_DTYPES, Backend, DeviceLayout, ModelInfo, StepOutput

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from export.manifest import Manifest
    from runtime.methods import Method

Loaded = tuple[Backend, "PreTrainedTokenizerBase"]
DEFAULT_BACKEND = "torch"   # the reference; `onnxruntime` is the faster CPU engine
# Weight and activation precision of the torch backend (the reference is fp32; fp16 / bf16 for GPUs).
DTYPES = ("fp32", "fp16", "bf16")
DEFAULT_DTYPE = "fp32"


def torch_dtype(name: str):
    import torch

    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return table[name]


def refuse_variant(backend: str, variant: str) -> None:
    """The quantized variants are onnxruntime engines (MatMulNBits); other backends refuse them up front."""
    if check_variant(variant) != DEFAULT_VARIANT:
        raise ValueError(f"the {backend} backend has no {variant} variant: weight-only {variant} is an onnxruntime "
                         f"engine (backend='onnxruntime', variant={variant!r}; `make engine GPU=cpu QUANT={variant}`)")


def load_torch(model_dir: Path, method: "Method", device: str, max_context: int, dtype: str = DEFAULT_DTYPE,
               variant: str = DEFAULT_VARIANT) -> Loaded:
    from export.checkpoint import load_checkpoint
    from export.step_model import StepModel
    from runtime.backends.torch_backend import TorchBackend

    refuse_variant("torch", variant)
    hf_model, tokenizer = load_checkpoint(model_dir, dtype=torch_dtype(dtype))
    step_model = StepModel(hf_model, method.extras.embeddings, method.extras.transfer_maps)
    del hf_model
    return TorchBackend(step_model, max_context=max_context, device=device), tokenizer


def load_onnxruntime(model_dir: Path, method: "Method", device: str, max_context: int,
                     dtype: str = DEFAULT_DTYPE, variant: str = DEFAULT_VARIANT) -> Loaded:
    import torch
    from transformers import AutoTokenizer

    from export.engine import prepare_engine
    from export.quantize import check_engine_variant
    from runtime.backends.ort_backend import OrtBackend

    if dtype != DEFAULT_DTYPE:
        raise ValueError(f"the onnxruntime backend prepares {DEFAULT_DTYPE} engine dirs; for {dtype}, export one "
                         f"(`python -m export onnx --dtype {dtype} --out DIR`) and load it with "
                         f"Generator.from_engine(DIR)")

    manifest = prepare_engine(model_dir, method.spec.graph, method.extras, torch.device(device).type, max_context,
                              method.proposer.max_draft_tokens, variant)
    check_engine_variant(manifest, variant)
    manifest.check_tree_size(method.proposer.max_draft_tokens)
    return OrtBackend(manifest, device, max_context), AutoTokenizer.from_pretrained(manifest.dir)


def load_tensorrt(model_dir: Path, method: "Method", device: str, max_context: int,
                  dtype: str = DEFAULT_DTYPE, variant: str = DEFAULT_VARIANT) -> Loaded:
    """The TensorRT engine built on this GPU for the method's graph (`make engine GPU=...`, found by its
    engine.json key); its precision is the one it was built with (fp16 by default): `dtype` other
    than the default must name it."""
    refuse_variant("tensorrt", variant)
    from transformers import AutoTokenizer

    from export.trt.host import import_tensorrt
    from export.trt.key import present_facts
    from runtime.backends.trt_backend import TrtBackend, find_trt_engine

    facts = present_facts(device, import_tensorrt().__version__)
    manifest = find_trt_engine(model_dir, method.spec.graph, method.extras.weights_sha256, facts)
    if dtype != DEFAULT_DTYPE and torch_dtype(dtype) != MANIFEST_TORCH_DTYPES[manifest.dtype]:
        raise ValueError(f"the TensorRT engine in {manifest.dir} is {manifest.dtype}, not {dtype}: build one with "
                         f"`python -m export engine --target ... --dtype {dtype}`")
    manifest.check_tree_size(method.proposer.max_draft_tokens)
    return TrtBackend(manifest, device, max_context, facts=facts), AutoTokenizer.from_pretrained(manifest.dir)


def open_engine(manifest: "Manifest", device: str, max_context: int | None = None) -> Backend:
    """The backend that runs an engine dir: TensorRT for a TensorRT engine dir (engine.json) on a CUDA
    device, else onnxruntime (the dir's ONNX)."""
    import torch

    from export.trt.key import is_trt_engine_dir

    if is_trt_engine_dir(manifest.dir) and torch.device(device).type == "cuda":
        from runtime.backends.trt_backend import TrtBackend

        return TrtBackend(manifest, device, max_context)
    from runtime.backends.ort_backend import OrtBackend

    return OrtBackend(manifest, device, max_context)


@dataclass(frozen=True)
class BackendSpec:
    name: str
    load: Callable[..., Loaded]   # (model_dir, method, device, max_context, dtype=..., variant=...)
    exported: bool          # runs an exported engine dir (Generator.from_engine)


BACKENDS: dict[str, BackendSpec] = {spec.name: spec for spec in (
    BackendSpec("torch", load_torch, exported=False),
    BackendSpec("onnxruntime", load_onnxruntime, exported=True),
    BackendSpec("tensorrt", load_tensorrt, exported=True),
)}


def backend_spec(name: str) -> BackendSpec:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return BACKENDS[name]


def make_backend(name: str, model_dir: str | Path, method: "Method", device: str = "cpu",
                 max_context: int | None = None, dtype: str = DEFAULT_DTYPE,
                 variant: str = DEFAULT_VARIANT) -> Loaded:
    """The backend `name` for `model_dir` running `method` (its trained tensors included), and the
    tokenizer; `variant` (fp32, int8, int4) is the onnxruntime engine's weight quantization."""
    from export.manifest import DEFAULT_MAX_CONTEXT

    spec = backend_spec(name)
    torch_dtype(dtype)  # a bad name fails before any loading
    check_variant(variant)
    return spec.load(Path(model_dir), method, device, DEFAULT_MAX_CONTEXT if max_context is None else max_context,
                     dtype=dtype, variant=variant)


def engine_method(manifest: "Manifest", name: str | None = None, device: str = "cpu", **options) -> "Method":
    """Build the method an engine dir runs: by default the one it was exported for, with its options
    (ppd: N, k; ht: k, layer; and the checkpoint); `name` may pick another method its graph serves
    (vanilla or ngram on any engine, hybrid on a ppd engine). The method's tensors must be the ones
    in the graph."""
    from export.engine import engine_tree_path
    from export.methods import method_spec
    from runtime.methods import build_method

    record = manifest.method
    name = record.name if name is None else name
    spec = method_spec(name)
    own_graph = spec.graph == record.name
    if spec.trained and not own_graph:
        raise ValueError(f"method {name!r} needs its trained tensors in the graph, but {manifest.dir} is an "
                         f"{record.name!r} engine: export one with `python -m export onnx --method {spec.graph} ...`, "
                         f"or pick vanilla or ngram, which run on any engine")
    if own_graph and spec.trained:
        options = {**record.options, **({"checkpoint": record.checkpoint.file} if record.checkpoint else {}), **options}
    # The tree `make engine` installed for this device: the method's own, else its graph's.
    engine_tree = next((path for path in (engine_tree_path(manifest, name), engine_tree_path(manifest))
                        if path.is_file()), None)
    if own_graph and spec.tree_set and "tree" not in options and engine_tree is not None:
        options["tree"] = str(engine_tree)
    model = manifest.model
    # build_method reads model_dir only to check a trained checkpoint's model fingerprint (ppd, ht).
    method = build_method(name, model.source_dir, model.vocab_size, model.hidden_size, device=device,
                          backend="onnxruntime", **options)
    weights = method.extras.weights_sha256
    if weights is not None and (not own_graph or weights != record.weights_sha256):
        raise ValueError(f"method {name!r} brings trained tensors that are not the ones exported into "
                         f"{manifest.dir} (a {record.name!r} engine); export an engine with this checkpoint "
                         f"(`python -m export onnx --method {name} --checkpoint FILE ...`)")
    manifest.check_tree_size(method.proposer.max_draft_tokens)
    return method


__all__ = ["BACKENDS", "DEFAULT_BACKEND", "DEFAULT_DTYPE", "DTYPES", "Backend", "BackendSpec", "DeviceLayout", "ModelInfo", "StepOutput", "backend_spec",
           "engine_method", "make_backend", "open_engine"]
