"""The I/O contract of an exported step: `manifest.json` beside `model.onnx`.

The exporter writes it; the TensorRT builder and the runtime read only it (never the checkpoint).

    engine dir/
        manifest.json        this contract (written last, atomically)
        model.onnx           the step graph, weights in external data
        model.onnx.data
        tokenizer files      so an engine dir is self-contained
        model.ort-cpu.onnx   (optional) ORT-optimised graph, see export/ort_optimize.py

A quantized variant's dir (export/quantize.py) has the same layout: its model.onnx is the quantized
graph and `quantization` records how it was made (absent = fp32).

Symbolic axes: T = tree nodes of one step, S = cache cells bound (committed entries of the sequences in
the step; a `past_mask` [T, S] says which each node sees). An engine serves up to `max_batch` sequences
per step, each of up to `max_context` entries with trees of up to `max_tree` nodes. Two shape profiles:
`decode` (T in 1..max_batch * max_tree, the packed trees of the decode loop) and `prefill` (T up to
max_context - max_tree, a prompt as one chain, or chunks of prompts beside trees); both take S in
0..max_batch * max_context - max_tree.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from trees._json import read_json_file
from trees.atomic import write_atomic

MANIFEST_NAME = "manifest.json"
ONNX_NAME = "model.onnx"
FORMAT_NAME = "ppdeploy-step"
# Bump when the graph contract changes (names, axes, semantics): older exports become stale.
# 2: method.weights_sha256 (was extra_embeddings_sha256), ht graphs
# 3: model families: model.family, model.rope, and for sliding-window families the graph inputs
#    sliding_tree_mask / sliding_past_mask (model.sliding_mask_inputs) with model.sliding_window and
#    model.sliding_layers, what a runtime builds those masks from (export/masks.py)
FORMAT_VERSION = 4   # 3: model families (sliding-window masks); 4: past_mask input, max_batch
DEFAULT_MAX_CONTEXT = 2048
SHAPE_FREE_KEY = "shape_free_attention"   # the exporter record of a shape-free graph
DEFAULT_MAX_TREE = 64
DEFAULT_MAX_BATCH = 16   # sequences an engine's profiles and a backend's buffers allow per step
TREE_AXIS, CACHE_AXIS = "T", "S"
PROFILES = ("decode", "prefill")


class ManifestError(ValueError):
    """An engine dir whose manifest, ONNX file or shapes cannot be used, with the reason and the fix."""


class ShapeError(ManifestError):
    """A step shape (tree size T, cache length S) outside the engine's profiles."""


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str                    # numpy dtype name: "int64", "float32", "float16"
    shape: tuple[int | str, ...]  # ints are static, strings are the symbolic axes T / S


@dataclass(frozen=True)
class AxisRange:
    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 0 <= self.min <= self.opt <= self.max:
            raise ManifestError(f"axis range needs 0 <= min <= opt <= max, got {self}")

    def __contains__(self, value: int) -> bool:
        return self.min <= value <= self.max


@dataclass(frozen=True)
class FileRecord:
    file: str                     # relative to the engine dir
    sha256: str
    size: int


@dataclass(frozen=True)
class ModelRecord:
    name: str
    source_dir: str               # the checkpoint dir it was exported from (informational)
    fingerprint: str              # export.checkpoint.model_fingerprint of that dir
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    family: str                   # export/families.py: llama, qwen2, qwen3, mistral, gemma3, phi3
    sliding_window: int | None = None          # window of the sliding layers (None: no layer slides)
    sliding_layers: tuple[int, ...] = ()       # which layers use sliding_tree_mask / sliding_past_mask
    # The graph's sliding-window mask inputs, built by export.masks.sliding_window_masks from the tree
    # mask, the nodes' and the committed entries' positions and `sliding_window`; () = none.
    sliding_mask_inputs: tuple[str, ...] = ()
    rope: dict = field(default_factory=dict)   # per layer type: rope_type, theta, rotary_dim (informational)

    @classmethod
    def from_json(cls, data: dict) -> "ModelRecord":
        return cls(**{**data, "sliding_layers": tuple(data.get("sliding_layers", ())),
                      "sliding_mask_inputs": tuple(data.get("sliding_mask_inputs", ()))})


@dataclass(frozen=True)
class MethodRecord:
    name: str                                       # "vanilla" | "ppd" | "ht"
    options: dict = field(default_factory=dict)     # what runtime.methods.build_method takes (ppd: N, k; ht: k, layer)
    num_extra_tokens: int = 0                       # ids vocab_size .. vocab_size + E - 1 are method slots
    weights_sha256: str | None = None               # of the trained tensors in the graph (ppd: [E, H] rows,
                                                    # ht: transfer maps; the staleness key)
    checkpoint: FileRecord | None = None            # the method checkpoint they came from (sha256 of the file)


@dataclass(frozen=True)
class Manifest:
    """The contract of one exported step graph. `Manifest.load(dir)` checks it against the files."""

    dir: Path
    onnx: FileRecord
    external_data: tuple[FileRecord, ...]
    dtype: str                                      # float dtype of the graph: "float32" | "float16"
    opset: int
    ir_version: int
    max_context: int
    max_tree: int
    model: ModelRecord
    method: MethodRecord
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    profiles: dict[str, dict[str, AxisRange]]       # profile -> axis (T, S) -> range
    exporter: dict[str, str | int]                  # ppdeploy / torch / onnx versions, format_version
    validation: tuple[dict, ...] = ()               # per-case max abs differences measured at export
    ort_optimized: dict | None = None               # see export/ort_optimize.py
    quantization: dict | None = None                # weight-only variant (export/quantize.py); None = fp32
    max_batch: int = DEFAULT_MAX_BATCH              # sequences per step (packed: runtime/backends/packing.py)

    # --- derived views ---------------------------------------------------------------------
    @property
    def onnx_path(self) -> Path:
        return self.dir / self.onnx.file

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def max_prefill(self) -> int:
        return self.profiles["prefill"][TREE_AXIS].max

    @property
    def min_step_rows(self) -> int:
        """Fewest rows a step of this graph is run with (export/quantize.py QuantScheme.min_step_rows):
        a smaller draft is padded with auxiliary rows, so every node is computed by the same kernels."""
        return int((self.quantization or {}).get("min_step_rows", 1))

    @property
    def shape_free(self) -> bool:
        """The graph has no shape arithmetic (export/attention.py shape_free): every node can run on a GPU
        execution provider, as onnxruntime's CUDA graphs need."""
        return bool(self.exporter.get(SHAPE_FREE_KEY, False))

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """{tensor name: {axis index: symbol}} for every input and output."""
        return {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)} for t in self.inputs + self.outputs}

    def profile_shapes(self, profile: str) -> dict[str, tuple[list[int], list[int], list[int]]]:
        """Input name -> (min, opt, max) concrete shapes: what a TensorRT optimization profile takes."""
        return self.input_shapes(self.profiles[profile])

    def input_shapes(self, axes: dict[str, AxisRange]) -> dict[str, tuple[list[int], list[int], list[int]]]:
        """Input name -> (min, opt, max) concrete shapes for ranges of the symbolic axes (T, S)."""
        pick = lambda spec, which: [getattr(axes[d], which) if isinstance(d, str) else d for d in spec.shape]  # noqa: E731
        return {t.name: (pick(t, "min"), pick(t, "opt"), pick(t, "max")) for t in self.inputs}

    # --- checks the runtime and builders call ------------------------------------------------
    def check_tree_size(self, tree_size: int) -> None:
        """Refuse a decode tree with more nodes than the engine was built for (one sequence's: the decode
        profile holds max_batch of them)."""
        limit = self.max_tree
        if tree_size > limit:
            raise ShapeError(
                f"a tree of {tree_size} nodes is larger than this engine's max tree size {limit} "
                f"({self.dir / MANIFEST_NAME}); use a tree of at most {limit} nodes or re-export with "
                f"`python -m export onnx --max-tree {tree_size} ...`"
            )

    def check_step_shape(self, tree_size: int, cache_length: int) -> None:
        """Refuse a step (T new tokens over S cached) that no profile of the engine covers."""
        if tree_size < 1:
            raise ShapeError(f"a step needs at least one token, got T={tree_size}")
        if tree_size + cache_length > self.max_context * self.max_batch:
            raise ShapeError(
                f"T={tree_size} new tokens on S={cache_length} cached exceed this engine's {self.max_batch} sequences "
                f"of max_context {self.max_context}; re-export with a larger --max-context or --max-batch"
            )
        for axes in self.profiles.values():
            if tree_size in axes[TREE_AXIS] and cache_length in axes[CACHE_AXIS]:
                return
        ranges = "; ".join(f"{name}: T {a[TREE_AXIS].min}..{a[TREE_AXIS].max}, S {a[CACHE_AXIS].min}..{a[CACHE_AXIS].max}"
                           for name, a in self.profiles.items())
        raise ShapeError(f"no profile of {self.dir} covers T={tree_size}, S={cache_length} ({ranges}); "
                         "re-export with a larger --max-tree / --max-context")

    # --- (de)serialisation -----------------------------------------------------------------
    def to_json(self) -> dict:
        data = asdict(self)
        del data["dir"]
        data = {"format": FORMAT_NAME, **data}
        data["profile_shapes"] = {p: self.profile_shapes(p) for p in self.profiles}  # for readers; derived
        data["dynamic_axes"] = self.dynamic_axes()
        return data

    def write(self) -> Path:
        path = self.dir / MANIFEST_NAME
        write_atomic(path, json.dumps(self.to_json(), indent=2) + "\n")
        return path

    @classmethod
    def from_json(cls, data: dict, directory: Path) -> "Manifest":
        if data.get("format") != FORMAT_NAME:
            raise ManifestError(f"{directory / MANIFEST_NAME} is not a ppdeploy step manifest (format={data.get('format')!r})")
        version = data.get("exporter", {}).get("format_version")
        if version != FORMAT_VERSION:
            raise ManifestError(
                f"{directory} was exported with manifest format {version}, this ppdeploy reads format "
                f"{FORMAT_VERSION}: re-export it (`python -m export onnx ...` or `make engine`)"
            )
        try:
            method = dict(data["method"])
            if method.get("checkpoint") is not None:
                method["checkpoint"] = FileRecord(**method["checkpoint"])
            return cls(
                dir=directory,
                onnx=FileRecord(**data["onnx"]),
                external_data=tuple(FileRecord(**r) for r in data["external_data"]),
                dtype=data["dtype"],
                opset=int(data["opset"]),
                ir_version=int(data["ir_version"]),
                max_context=int(data["max_context"]),
                max_tree=int(data["max_tree"]),
                max_batch=int(data["max_batch"]),
                model=ModelRecord.from_json(data["model"]),
                method=MethodRecord(**method),
                inputs=tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in data["inputs"]),
                outputs=tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in data["outputs"]),
                profiles={p: {axis: AxisRange(**r) for axis, r in axes.items()} for p, axes in data["profiles"].items()},
                exporter=dict(data["exporter"]),
                validation=tuple(data.get("validation", ())),
                ort_optimized=data.get("ort_optimized"),
                quantization=data.get("quantization"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"{directory / MANIFEST_NAME} is malformed ({type(exc).__name__}: {exc}); re-export it") from exc

    @classmethod
    def load(cls, directory: str | Path, verify_files: bool = True) -> "Manifest":
        """Read `directory/manifest.json` and check it against the files beside it: the ONNX file and
        its external data exist with the recorded sha256, and the graph's inputs and outputs are the
        manifest's. `verify_files=False` skips the hashes (the graph check still runs)."""
        directory = Path(directory)
        path = directory / MANIFEST_NAME
        if not path.is_file():
            raise ManifestError(f"{directory} has no {MANIFEST_NAME}: export one with `python -m export onnx --out {directory} ...`")
        manifest = cls.from_json(read_json_file(path, ManifestError, "manifest", "re-export it"), directory)
        if verify_files:
            for record in (manifest.onnx, *manifest.external_data):
                check_file(directory, record)
        check_graph_io(manifest)
        return manifest


def check_file(directory: Path, record: FileRecord) -> None:
    path = directory / record.file
    fix = "the engine dir is stale or corrupt: re-export it (`make engine` or `python -m export onnx ...`)"
    if not path.is_file():
        raise ManifestError(f"{path} named in the manifest is missing; {fix}")
    if path.stat().st_size != record.size:
        raise ManifestError(f"{path} has {path.stat().st_size} bytes, the manifest says {record.size}; {fix}")
    if sha256_file(path) != record.sha256:
        raise ManifestError(f"{path} does not match the sha256 in the manifest; {fix}")


def graph_io(onnx_path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs of an ONNX graph, read without its external data."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except (OSError, DecodeError) as exc:
        raise ManifestError(f"{onnx_path} is not a readable ONNX model ({exc}); re-export it") from exc

    def spec(value) -> TensorSpec:
        tensor = value.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
        shape = tuple(d.dim_param if d.dim_param else d.dim_value for d in tensor.shape.dim)
        return TensorSpec(value.name, dtype, shape)

    return [spec(v) for v in model.graph.input], [spec(v) for v in model.graph.output]


def check_graph_io(manifest: Manifest) -> None:
    """The graph's inputs/outputs (names, dtypes, shapes with the symbolic axes) must be the manifest's."""
    inputs, outputs = graph_io(manifest.onnx_path)
    problems = []
    for kind, want, got in (("input", manifest.inputs, inputs), ("output", manifest.outputs, outputs)):
        if [t.name for t in want] != [t.name for t in got]:
            problems.append(f"{kind} names {[t.name for t in got]} != manifest {[t.name for t in want]}")
            continue
        problems += [f"{kind} {w.name}: graph {g.dtype}{list(g.shape)} != manifest {w.dtype}{list(w.shape)}"
                     for w, g in zip(want, got) if w != g]
    if problems:
        raise ManifestError(f"{manifest.onnx_path} does not match {manifest.dir / MANIFEST_NAME}: "
                            + "; ".join(problems) + "; re-export the engine dir")
