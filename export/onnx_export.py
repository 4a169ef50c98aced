"""Trace the step function into ONNX, write the manifest beside it, and validate it on every export.

    export_onnx(model_dir, out_dir, ...)
        load checkpoint -> StepModel (+ ppd rows / ht maps) -> trace (TorchScript exporter, fixed opset/IR)
        -> tidy graph (output shapes, tied-embedding dedup) -> save with external data -> onnx.checker
        -> validate against the torch step at untraced shapes (export/validate.py) -> manifest.json

The graph has exactly StepModel.forward's signature, with the per-layer cache as separate inputs
(past_key.{i}, past_value.{i}: [S, Hkv, D]) so a runtime can bind each layer's cells by pointer, and
the additive past_mask [T, S] saying which cells each node sees (its own sequence's: many sequences
share a step, runtime/backends/packing.py). A family with sliding-window layers has two more inputs
after it, the additive sliding_tree_mask [T, T] and sliding_past_mask [T, S] (export/masks.py builds
them); the manifest's model record names them and the window. Everything is written into a temp dir next to `out_dir`
and swapped in at the end: a reader never sees a half-written engine dir.

Exporter choice (measured here, torch 2.13): the TorchScript exporter (`dynamo=False`) traces this
model in ~1 s (tiny) / ~20 s (135M) with opset 17 and IR 8 and needs nothing beyond torch; the
dynamo exporter needs onnxscript and writes IR 10+. Opset 17 is read by onnxruntime >= 1.13 and
TensorRT >= 8.6.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from export.checkpoint import load_checkpoint, model_fingerprint
from export.families import manifest_fields
from export.manifest import (CACHE_AXIS, DEFAULT_MAX_BATCH, DEFAULT_MAX_CONTEXT, DEFAULT_MAX_TREE, FORMAT_VERSION,
                             ONNX_NAME, SHAPE_FREE_KEY, TREE_AXIS,
                             AxisRange, FileRecord, Manifest, MethodRecord,
                             ModelRecord, TensorSpec, sha256_file)
from export.masks import SLIDING_MASK_INPUTS, SLIDING_PAST_MASK, SLIDING_TREE_MASK
from export.methods import EXPORT_METHODS, METHODS, MethodExtras
from export.onnx_files import DATA_SUFFIX, check_replaceable, file_record, save_with_external_data, swap_in
from export.quantize import DEFAULT_VARIANT, ROW_EXACT_ATTENTION, check_variant
from export.step_model import StepModel

OPSET = 17
IR_VERSION = 8            # the IR that goes with opset 17; onnxruntime 1.31 reads <= 11
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
# Shapes the graph is traced at: deliberately none of the validation shapes (export/validate.py).
TRACE_TREE, TRACE_CACHE = 3, 5


@dataclass(frozen=True)
class ExportConfig:
    """One ONNX export. The CLI (`python -m export onnx`) maps its flags 1:1 onto these fields."""

    model_dir: Path
    out_dir: Path
    method: str = "vanilla"
    checkpoint: Path | None = None            # method checkpoint (ppd: prompt tokens, ht: transfer maps)
    dtype: str = "fp32"
    max_context: int = DEFAULT_MAX_CONTEXT
    max_tree: int = DEFAULT_MAX_TREE
    max_batch: int = DEFAULT_MAX_BATCH     # sequences per step the profiles allow (runtime.BatchGenerator)
    validate: bool = True
    variant: str = DEFAULT_VARIANT            # fp32, or a weight-only quantized variant (export/quantize.py)
    # Bitwise row-independent attention (StepModel row_exact). No CLI flag: a quantized variant whose
    # scheme needs it (export/quantize.py QuantScheme.row_exact) asks for it on its fp32 source export.
    row_exact: bool = False
    # Attention without shape arithmetic (StepModel shape_free): GPU exports, whose every node must run on
    # the GPU's execution provider (onnxruntime's CUDA graphs); `make engine` sets it for GPU targets.
    shape_free: bool = False

    def __post_init__(self) -> None:
        check_variant(self.variant)
        if self.row_exact and self.shape_free:
            raise ValueError("row-exact (quantized CPU graphs) and shape-free (GPU graphs) attention exclude "
                             "each other: drop --shape-free for a quantized variant")
        if self.variant != DEFAULT_VARIANT and self.dtype != "fp32":
            raise ValueError(f"--quantize {self.variant} quantizes the fp32 graph; drop --dtype {self.dtype}")
        if self.method not in EXPORT_METHODS:
            raise ValueError(f"unknown method {self.method!r} for export; choose one of {', '.join(EXPORT_METHODS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.max_batch < 1:
            raise ValueError(f"need max_batch >= 1, got {self.max_batch}")
        if self.max_tree < 1 or self.max_context < 2 * self.max_tree:
            raise ValueError(f"need max_tree >= 1 and max_context >= 2 * max_tree, got max_tree={self.max_tree}, "
                             f"max_context={self.max_context}")
        if not METHODS[self.method].trained and self.checkpoint is not None:
            raise ValueError(f"--method {self.method} takes no --checkpoint")


class StepGraph(nn.Module):
    """StepModel.forward with flat inputs: input_ids, position_ids, tree_mask, past_mask, [sliding_tree_mask,
    sliding_past_mask,] past_key.0..L-1, then past_value.0..L-1."""

    def __init__(self, step: StepModel) -> None:
        super().__init__()
        self.step = step

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, tree_mask: torch.Tensor,
                past_mask: torch.Tensor, *rest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = self.step.num_layers
        sliding, past = rest[: len(rest) - 2 * n], rest[len(rest) - 2 * n :]
        return self.step(input_ids, position_ids, tree_mask, list(past[:n]), list(past[n:]), past_mask, *sliding)


def mask_input_names(step: StepModel) -> tuple[str, ...]:
    """The sliding-window mask inputs of this model's graph: both, or none when no layer slides."""
    return SLIDING_MASK_INPUTS if step.family.has_sliding_layers else ()


def io_specs(step: StepModel, dtype: torch.dtype) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The graph contract. T = tree nodes of the step, S = committed cache length."""
    fdt = str(dtype).removeprefix("torch.")
    n, hkv, d = step.num_layers, step.num_kv_heads, step.head_dim
    t, s = TREE_AXIS, CACHE_AXIS
    sliding = {SLIDING_TREE_MASK: (t, t), SLIDING_PAST_MASK: (t, s)}    # additive, used on sliding layers
    inputs = (
        TensorSpec("input_ids", "int64", (t,)),
        TensorSpec("position_ids", "int64", (t,)),
        TensorSpec("tree_mask", fdt, (t, t)),                  # additive: 0 visible, finfo.min hidden
        TensorSpec("past_mask", fdt, (t, s)),                  # additive: which cache cells each node sees
        *(TensorSpec(name, fdt, sliding[name]) for name in mask_input_names(step)),
        *(TensorSpec(f"past_key.{i}", fdt, (s, hkv, d)) for i in range(n)),
        *(TensorSpec(f"past_value.{i}", fdt, (s, hkv, d)) for i in range(n)),
    )
    outputs = (
        TensorSpec("logits", fdt, (t, step.vocab_size)),
        TensorSpec("new_keys", fdt, (n, t, hkv, d)),
        TensorSpec("new_values", fdt, (n, t, hkv, d)),
    )
    return inputs, outputs


def shape_profiles(max_context: int, max_tree: int, max_batch: int = DEFAULT_MAX_BATCH) -> dict[str, dict[str, AxisRange]]:
    """decode: the loop's trees, of up to max_batch sequences packed; prefill: a prompt as one chain (or
    chunks beside others' trees). Both leave room for one tree; S counts every sequence's cells."""
    max_cache = max_context - max_tree
    max_cells = max_batch * max_context - max_tree
    return {
        "decode": {TREE_AXIS: AxisRange(1, min(16, max_tree), max_batch * max_tree),
                   CACHE_AXIS: AxisRange(0, min(256, max_cells), max_cells)},
        "prefill": {TREE_AXIS: AxisRange(1, min(128, max_cache), max_cache), CACHE_AXIS: AxisRange(0, 0, max_cells)},
    }


# --- tracing --------------------------------------------------------------------------------
def trace_inputs(step: StepModel, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    t, s = TRACE_TREE, TRACE_CACHE
    ids = torch.arange(1, t + 1)
    if step.num_extra_tokens:
        ids[-1] = step.vocab_size  # not needed for tracing (it records ops, not values); keeps the example honest
    past = [torch.zeros(s, step.num_kv_heads, step.head_dim, dtype=dtype) for _ in range(2 * step.num_layers)]
    sliding = [torch.zeros(t, t, dtype=dtype), torch.zeros(t, s, dtype=dtype)][: len(mask_input_names(step))]
    return (ids, torch.arange(s, s + t), torch.zeros(t, t, dtype=dtype), torch.zeros(t, s, dtype=dtype), *sliding, *past)


def trace_to_onnx(step: StepModel, dtype: torch.dtype, path: Path) -> None:
    inputs, outputs = io_specs(step, dtype)
    spec_axes = {spec.name: {i: a for i, a in enumerate(spec.shape) if isinstance(a, str)} for spec in inputs + outputs}
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        # Expected and harmless here: the TorchScript exporter's deprecation notice, and the tracer
        # noting that the number of method rows is a constant of the graph (it is).
        warnings.filterwarnings("ignore", "You are using the legacy TorchScript", DeprecationWarning)
        warnings.filterwarnings("ignore", "The feature will be removed", DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            StepGraph(step).eval(), trace_inputs(step, dtype), str(path),
            input_names=[spec.name for spec in inputs], output_names=[spec.name for spec in outputs],
            dynamic_axes=spec_axes, opset_version=OPSET, dynamo=False, do_constant_folding=True,
        )


# --- graph tidying --------------------------------------------------------------------------
def set_io_shapes(model: onnx.ModelProto, specs: Sequence[TensorSpec], values) -> None:
    """Write the contract's shapes onto graph inputs/outputs (the tracer names some static dims oddly)."""
    by_name = {spec.name: spec for spec in specs}
    for value in values:
        dims = value.type.tensor_type.shape.dim
        del dims[:]
        for axis in by_name[value.name].shape:
            dim = dims.add()
            if isinstance(axis, str):
                dim.dim_param = axis
            else:
                dim.dim_value = axis


def dedupe_tied_embedding(model: onnx.ModelProto, head_name: str) -> bool:
    """Tied checkpoints embed with the LM head's transpose; constant folding materialises that as a
    second [V, H] table (113 MB for SmolLM2-135M). Gather from the head's [H, V] columns instead:
    Gather(head, ids, axis=1) -> [H, T] -> Transpose -> [T, H]. Returns whether it rewrote anything."""
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    if head_name not in inits:
        return False
    head = numpy_helper.to_array(inits[head_name])
    rewritten = False
    nodes = list(graph.node)
    for node in nodes:
        if node.op_type != "Gather" or node.input[0] not in inits:
            continue
        table_init = inits[node.input[0]]
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if axis != 0 or list(table_init.dims) != list(head.shape[::-1]):
            continue
        if not np.array_equal(numpy_helper.to_array(table_init), head.T):
            continue
        gathered = node.output[0] + "/columns"
        transpose = helper.make_node("Transpose", [gathered], [node.output[0]], perm=[1, 0],
                                     name=(node.name or gathered) + "/transpose")
        node.input[0] = head_name
        node.output[0] = gathered
        del node.attribute[:]
        node.attribute.append(helper.make_attribute("axis", 1))
        graph.node.insert(list(graph.node).index(node) + 1, transpose)
        rewritten = True
    used = {name for node in graph.node for name in node.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    return rewritten


def tidy_graph(model: onnx.ModelProto, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
               metadata: dict[str, str]) -> onnx.ModelProto:
    set_io_shapes(model, inputs, model.graph.input)
    set_io_shapes(model, outputs, model.graph.output)
    dedupe_tied_embedding(model, "step.lm_head_t")
    model.ir_version = IR_VERSION
    del model.metadata_props[:]
    for key, value in metadata.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    return model


# --- the whole export -----------------------------------------------------------------------
def load_method_extras(config: ExportConfig) -> MethodExtras:
    """The trained tensors of --checkpoint for a trained method's graph (ppd: prompt-token rows,
    ht: transfer maps; export/methods.py), refused when trained for another model."""
    spec = METHODS[config.method]
    if not spec.trained:
        return MethodExtras()
    if config.checkpoint is None:
        raise ValueError(f"--method {config.method} needs --checkpoint FILE (its trained tensors, made by "
                         f"`{spec.train_command}`; the committed one is {spec.default_checkpoint})")
    from transformers import AutoConfig

    hidden_size = AutoConfig.from_pretrained(config.model_dir).hidden_size
    return spec.load_extras(config.checkpoint, model_fingerprint(config.model_dir), hidden_size)


def exporter_versions() -> dict[str, str | int]:
    return {"ppdeploy": importlib.metadata.version("ppdeploy"), "torch": torch.__version__,
            "onnx": onnx.__version__, "format_version": FORMAT_VERSION}


def export_onnx(config: ExportConfig, extras: MethodExtras | None = None, log=print) -> Manifest:
    """Export, check and validate the step graph of `config.model_dir` into `config.out_dir`.
    `extras` overrides the method rows (default: loaded from `config.checkpoint`)."""
    if config.variant != DEFAULT_VARIANT:
        raise ValueError(f"export_onnx writes the fp32 graph; the {config.variant} variant is made from it by "
                         f"export.engine.export_variant")
    extras = load_method_extras(config) if extras is None else extras
    if METHODS[config.method].trained != (extras.weights_sha256 is not None):
        raise ValueError(f"a {config.method} export needs its trained tensors" if METHODS[config.method].trained
                         else f"a {config.method} export takes no trained tensors")
    dtype = DTYPES[config.dtype]
    hf_model, tokenizer = load_checkpoint(config.model_dir, dtype=dtype)
    embeddings = None if extras.embeddings is None else extras.embeddings.to(dtype)
    maps = None if extras.transfer_maps is None else extras.transfer_maps.to(dtype)
    step = StepModel(hf_model, embeddings, maps, row_exact=config.row_exact, shape_free=config.shape_free).eval()
    del hf_model
    inputs, outputs = io_specs(step, dtype)
    out_dir = Path(config.out_dir)
    check_replaceable(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    work.chmod(0o755)  # mkdtemp makes it private; an engine dir is shared like any build output
    try:
        raw = work / "raw"
        raw.mkdir()
        log(f"tracing {config.model_dir} ({config.method}, {config.dtype}) with opset {OPSET}")
        trace_to_onnx(step, dtype, raw / ONNX_NAME)
        fingerprint = model_fingerprint(config.model_dir)
        model = tidy_graph(onnx.load(str(raw / ONNX_NAME)), inputs, outputs,
                           {"ppdeploy.method": config.method, "ppdeploy.model_fingerprint": fingerprint})
        shutil.rmtree(raw)
        onnx_path = work / ONNX_NAME
        save_with_external_data(model, onnx_path)
        del model
        onnx.checker.check_model(str(onnx_path), full_check=True)  # path-based: reads the external data too
        tokenizer.save_pretrained(work)
        manifest = describe_export(work, config, step, extras, fingerprint)
        if config.validate:
            from export.validate import validate_step_graph

            report = validate_step_graph(onnx_path, step, tokenizer, max_tree=config.max_tree)
            log(report.summary())
            manifest = dataclasses.replace(manifest, validation=tuple(report.to_json()))
        manifest.write()
        for path in work.iterdir():
            path.chmod(0o644)  # some writers create private files; an engine dir is a shared build output
        swap_in(work, out_dir)
    finally:
        if work.exists():
            shutil.rmtree(work)
    return Manifest.load(out_dir)


def describe_export(work: Path, config: ExportConfig, step: StepModel, extras: MethodExtras,
                    fingerprint: str) -> Manifest:
    """The manifest of the graph just written into `work` (validation results are added after)."""
    inputs, outputs = io_specs(step, DTYPES[config.dtype])
    model_dir = Path(config.model_dir).resolve()
    return Manifest(
        dir=work,
        onnx=file_record(work, ONNX_NAME),
        external_data=(file_record(work, ONNX_NAME + DATA_SUFFIX),),
        dtype=inputs[2].dtype, opset=OPSET, ir_version=IR_VERSION,
        max_context=config.max_context, max_tree=config.max_tree, max_batch=config.max_batch,
        model=ModelRecord(model_dir.name, str(model_dir), fingerprint, step.vocab_size, step.hidden_size,
                          step.num_layers, step.num_kv_heads, step.head_dim,
                          sliding_mask_inputs=mask_input_names(step), **manifest_fields(step.family)),
        method=MethodRecord(config.method, dict(extras.options), step.num_extra_tokens, extras.weights_sha256,
                            None if config.checkpoint is None else _checkpoint_record(Path(config.checkpoint))),
        inputs=inputs, outputs=outputs, profiles=shape_profiles(config.max_context, config.max_tree, config.max_batch),
        exporter={**exporter_versions(), **({"row_exact_attention": ROW_EXACT_ATTENTION} if config.row_exact else {}),
                  **({SHAPE_FREE_KEY: True} if config.shape_free else {})},
    )


def _checkpoint_record(path: Path) -> FileRecord:
    if not path.is_file():
        raise FileNotFoundError(f"method checkpoint {path} does not exist")
    return FileRecord(str(path.resolve()), sha256_file(path), path.stat().st_size)
