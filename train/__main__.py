"""python -m train: command-line entry of the training package.

    python -m train ppd [options]     train PPD prompt tokens (defaults: PPDTrainConfig)
    python -m train ht [options]      train HT transfer maps (defaults: HTTrainConfig)
    python -m train ht-layers R1.json R2.json ... --out PNG
                                      HT accuracy per offset against the layer l (table + PNG)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from export.checkpoint import CheckpointError
from export.ht import TransferMapError
from export.ppd import PromptTokenError
from train.common import TrainResult, format_command
from train.ht import HTTrainConfig, train_ht
from train.ppd import PPDTrainConfig, train_ppd
from train.sharegpt import DatasetError
from trees.config_args import add_config_command, config_from_args, exit_code_of


def cmd_ppd(args: argparse.Namespace, argv: list[str]) -> int:
    """Train PPD prompt tokens for a model by self-distillation on ShareGPT."""
    config = config_from_args(args)
    return print_result(config, train_ppd(config, command=format_command(argv)), "prompt token", "prompt token")


def cmd_ht(args: argparse.Namespace, argv: list[str]) -> int:
    """Train HT transfer maps for a model by self-distillation on ShareGPT."""
    config = config_from_args(args)
    result = train_ht(config, command=format_command(argv))
    if result is not None:
        print(f"transfer maps read layer {result.report['layer']} of {result.report['num_layers']}")
    return print_result(config, result, "map", "pseudo state")


def cmd_ht_layers(args: argparse.Namespace, argv: list[str]) -> int:
    """Compare HT maps trained at several layers: held-out accuracy per offset, table and PNG."""
    from train.layer_report import load_runs, markdown_table, plot_layers

    runs = load_runs([Path(p) for p in args.reports])
    print(markdown_table(runs))
    title = f"HT transfer maps by layer: k={len(runs[0].top1)}, {runs[0].train_samples} training samples"
    print(f"wrote {plot_layers(runs, Path(args.out), title)}")
    return 0


def print_result(config, result: TrainResult | None, unit: str, slot: str) -> int:
    if result is None:
        print(f"self-distilled data ready under {config.data_dir}")
        return 0
    print(f"wrote {result.output} and {config.report_path}")
    print(f"trainable parameters: {result.trainable_parameters:,} "
          f"({100 * result.trainable_parameters / result.model_parameters:.4f}% of {result.model_parameters:,})")
    print(f"time: data {result.data_seconds:.0f} s, train {result.train_seconds:.0f} s, "
          f"eval {result.eval_seconds:.0f} s")
    print(f"held-out accuracy per {unit}:")
    for i, (t1, t10) in enumerate(zip(result.top1, result.top10)):
        print(f"  {slot} {i} (predicts t+{i + 2}): top-1 {t1:.3f}  top-10 {t10:.3f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    add_config_command(sub, "ppd", PPDTrainConfig, cmd_ppd)
    add_config_command(sub, "ht", HTTrainConfig, cmd_ht)
    layers = sub.add_parser("ht-layers", help=cmd_ht_layers.__doc__, description=cmd_ht_layers.__doc__)
    layers.add_argument("reports", nargs="+", help="training reports (.json beside each map checkpoint), one per layer")
    layers.add_argument("--out", required=True, help="PNG to write")
    layers.set_defaults(func=cmd_ht_layers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    errors = (CheckpointError, DatasetError, PromptTokenError, TransferMapError, ValueError)
    return exit_code_of(lambda: args.func(args, argv), errors)


if __name__ == "__main__":
    sys.exit(main())
