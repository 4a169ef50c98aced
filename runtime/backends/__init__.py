"""Backends run the step function. `torch` is the reference; others follow the same contract.

`make_backend` turns (backend name, checkpoint dir, built method) into a ready backend and its
tokenizer; for `onnxruntime` that means an exported engine dir under
artifacts/engines/<model>/<cpu|cuda>/<vanilla|ppd|ht>/, (re-)exported when missing or stale.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from runtime.backends.base import Backend, ModelInfo, StepOutput

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from export.manifest import Manifest
    from runtime.methods import Method

BACKENDS = ("torch", "onnxruntime")

__all__ = ["BACKENDS", "Backend", "ModelInfo", "StepOutput", "engine_method", "make_backend"]


def make_backend(name: str, model_dir: str | Path, method: "Method", device: str = "cpu",
                 max_context: int | None = None) -> tuple[Backend, "PreTrainedTokenizerBase"]:
    """The backend `name` for `model_dir` running `method` (its extra rows included), and the tokenizer."""
    from export.manifest import DEFAULT_MAX_CONTEXT

    max_context = DEFAULT_MAX_CONTEXT if max_context is None else max_context
    if name == "torch":
        from export.checkpoint import load_checkpoint
        from export.step_model import StepModel
        from runtime.backends.torch_backend import TorchBackend

        hf_model, tokenizer = load_checkpoint(model_dir)
        step_model = StepModel(hf_model, method.extra_embeddings, method.transfer_maps)
        del hf_model
        return TorchBackend(step_model, max_context=max_context, device=device), tokenizer
    if name == "onnxruntime":
        from transformers import AutoTokenizer

        from runtime.backends.ort_backend import OrtBackend, ensure_engine

        manifest = ensure_engine(model_dir, method, device, max_context)
        manifest.check_tree_size(method.proposer.max_draft_tokens)
        return OrtBackend(manifest, device, max_context), AutoTokenizer.from_pretrained(manifest.dir)
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


def engine_method(manifest: "Manifest", name: str | None = None, device: str = "cpu", **options) -> "Method":
    """Build the method an engine dir runs: by default the one it was exported for, with its options
    (ppd: N, k; ht: k, layer; and the checkpoint); `name` may pick another method that needs no
    trained tensors (vanilla or ngram on any engine). The method's tensors must be the ones in the graph."""
    from export.engine import TREE_METHODS, engine_tree_path
    from export.onnx_export import TRAINED_METHODS, MethodExtras
    from runtime.methods import build_method

    record = manifest.method
    name = record.name if name is None else name
    if name != record.name and name in TRAINED_METHODS:
        raise ValueError(f"method {name!r} needs its trained tensors in the graph, but {manifest.dir} is an "
                         f"{record.name!r} engine: export one with `python -m export onnx --method {name} ...`, "
                         f"or pick vanilla or ngram, which run on any engine")
    if name == record.name:
        options = {**record.options, **({"checkpoint": record.checkpoint.file} if record.checkpoint else {}), **options}
    engine_tree = engine_tree_path(manifest)
    if name == record.name and name in TREE_METHODS and "tree" not in options and engine_tree.is_file():
        options["tree"] = str(engine_tree)   # the tree `make engine` installed for this device
    model = manifest.model
    # build_method reads model_dir only to check a trained checkpoint's model fingerprint (ppd, ht).
    method = build_method(name, model.source_dir, model.vocab_size, model.hidden_size, device=device,
                          backend="onnxruntime", **options)
    weights = MethodExtras(method.extra_embeddings, transfer_maps=method.transfer_maps).weights_sha256
    if weights is not None and (name != record.name or weights != record.weights_sha256):
        raise ValueError(f"method {name!r} brings trained tensors that are not the ones exported into "
                         f"{manifest.dir} (a {record.name!r} engine); export an engine with this checkpoint "
                         f"(`python -m export onnx --method {name} --checkpoint FILE ...`)")
    manifest.check_tree_size(method.proposer.max_draft_tokens)
    return method
