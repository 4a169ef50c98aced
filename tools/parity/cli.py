"""python -m tools check ENGINE_DIR: parity of an engine dir's runners on real step inputs recorded with the
real model (recorder.py), compared through Polygraphy's Comparator (compare.py)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from tools.parity.recorder import RecordConfig
from trees.config_args import add_config_command, option


@dataclass(frozen=True)
class CheckFlags:
    tolerances: str | None = option(None, "ATOL:RTOL for every output, or OUTPUT=ATOL:RTOL,... (default: per graph "
                                          "dtype, tools/parity/compare.py DEFAULT_TOLERANCES)")
    runners: str | None = option(None, "comma list of onnxruntime, tensorrt compared with the torch step (default: "
                                       "every one available)")
    inputs: str | None = option(None, "compare on this Polygraphy input JSON instead of recording new inputs")
    max_new_tokens: int = option(RecordConfig.max_new_tokens, "tokens each method decodes while recording")
    out: str | None = option(None, "folder for inputs.json and report.json (default: beside the engine dir, "
                                   "artifacts/parity/... for artifacts/engines/...)")


@dataclass(frozen=True, kw_only=True)
class CheckCommand(CheckFlags):
    engine_dir: str     # positional (added in main)


def cmd_check(cfg: CheckCommand) -> int:
    """Parity of an engine dir's runners (torch step, onnxruntime, TensorRT when present) on real step inputs
    recorded with the real model, through Polygraphy's Comparator; exits 1 listing every mismatch."""
    from transformers import AutoTokenizer

    from export.manifest import Manifest
    from tools.parity.compare import default_parity_dir, parse_tolerances, run_parity
    from tools.parity.feeds import check_feeds, load_feeds, save_feeds
    from tools.parity.runners import StepRunner, engine_runners, step_model_from_engine
    from tools.parity.recorder import record_step_feeds
    from trees._json import write_json

    manifest = Manifest.load(cfg.engine_dir)
    tolerances = parse_tolerances(cfg.tolerances, manifest.dtype)
    runners, skipped = engine_runners(manifest, cfg.runners.split(",") if cfg.runners else None)
    step = step_model_from_engine(manifest)
    out = Path(cfg.out) if cfg.out else default_parity_dir(manifest.dir)
    if cfg.inputs:
        feeds, labels = load_feeds(cfg.inputs), None
    else:
        tokenizer = AutoTokenizer.from_pretrained(manifest.dir)
        recorded = record_step_feeds(manifest, step, tokenizer, RecordConfig(max_new_tokens=cfg.max_new_tokens))
        feeds, labels = [r.feed for r in recorded], [r.label for r in recorded]
        print(f"recorded {len(feeds)} steps -> {save_feeds(feeds, out / 'inputs.json')} (Polygraphy --load-inputs)")
    check_feeds(feeds, manifest)
    report = run_parity(StepRunner(step, manifest), runners, feeds, tolerances, labels, skipped)
    print(f"parity of {manifest.dir} ({manifest.method.name}, {manifest.dtype}):")
    print(report.format())
    print(f"report: {write_json(out / 'report.json', report.to_json())}")
    return 0 if report.ok else 1


def add_check_command(sub: argparse._SubParsersAction) -> None:
    """`check ENGINE_DIR` with CheckFlags' flags, on a `python -m tools` parser."""
    check = add_config_command(sub, "check", CheckFlags, cmd_check)
    check.add_argument("engine_dir", help="engine dir (manifest.json + model.onnx; engine.plan for TensorRT)")
    check.set_defaults(config_class=CheckCommand)
