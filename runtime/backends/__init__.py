"""The backend registry: name -> loader that turns (checkpoint dir, built method) into a ready
backend and its tokenizer. `torch` is the reference; `onnxruntime` runs the exported engine dir
that export/ prepares (artifacts/engines/<model>/<cpu|cuda>/<graph>/, re-exported when stale).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from runtime.backends.base import Backend, DeviceLayout, ModelInfo, StepOutput

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from export.manifest import Manifest
    from runtime.methods import Method

Loaded = tuple[Backend, "PreTrainedTokenizerBase"]
DEFAULT_BACKEND = "torch"   # the reference; `onnxruntime` is the faster CPU engine


def load_torch(model_dir: Path, method: "Method", device: str, max_context: int) -> Loaded:
    from export.checkpoint import load_checkpoint
    from export.step_model import StepModel
    from runtime.backends.torch_backend import TorchBackend

    hf_model, tokenizer = load_checkpoint(model_dir)
    step_model = StepModel(hf_model, method.extras.embeddings, method.extras.transfer_maps)
    del hf_model
    return TorchBackend(step_model, max_context=max_context, device=device), tokenizer


def load_onnxruntime(model_dir: Path, method: "Method", device: str, max_context: int) -> Loaded:
    import torch
    from transformers import AutoTokenizer

    from export.engine import prepare_engine
    from runtime.backends.ort_backend import OrtBackend

    manifest = prepare_engine(model_dir, method.spec.graph, method.extras, torch.device(device).type, max_context,
                              method.proposer.max_draft_tokens)
    manifest.check_tree_size(method.proposer.max_draft_tokens)
    return OrtBackend(manifest, device, max_context), AutoTokenizer.from_pretrained(manifest.dir)


@dataclass(frozen=True)
class BackendSpec:
    name: str
    load: Callable[[Path, "Method", str, int], Loaded]
    exported: bool          # runs an exported engine dir (Generator.from_engine)


BACKENDS: dict[str, BackendSpec] = {spec.name: spec for spec in (
    BackendSpec("torch", load_torch, exported=False),
    BackendSpec("onnxruntime", load_onnxruntime, exported=True),
)}


def backend_spec(name: str) -> BackendSpec:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return BACKENDS[name]


def make_backend(name: str, model_dir: str | Path, method: "Method", device: str = "cpu",
                 max_context: int | None = None) -> Loaded:
    """The backend `name` for `model_dir` running `method` (its trained tensors included), and the tokenizer."""
    from export.manifest import DEFAULT_MAX_CONTEXT

    spec = backend_spec(name)
    return spec.load(Path(model_dir), method, device, DEFAULT_MAX_CONTEXT if max_context is None else max_context)


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


__all__ = ["BACKENDS", "DEFAULT_BACKEND", "Backend", "BackendSpec", "DeviceLayout", "ModelInfo", "StepOutput", "backend_spec",
           "engine_method", "make_backend"]
