"""python -m train: command-line entry of the training package.

    python -m train ppd [options]     train PPD prompt tokens (defaults: PPDTrainConfig)
    python -m train ht [options]      train HT transfer maps (defaults: HTTrainConfig)
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from export.checkpoint import CheckpointError
from export.ht import TransferMapError
from export.ppd import PromptTokenError
from train.common import TrainResult, format_command
from train.ht import HTTrainConfig, train_ht
from train.ppd import PPDTrainConfig, train_ppd
from train.sharegpt import DatasetError
from trees.config_args import add_config_arguments


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
    ppd = sub.add_parser("ppd", help=cmd_ppd.__doc__, description=cmd_ppd.__doc__)
    add_config_arguments(ppd, PPDTrainConfig)
    ppd.set_defaults(func=cmd_ppd, config_class=PPDTrainConfig)
    ht = sub.add_parser("ht", help=cmd_ht.__doc__, description=cmd_ht.__doc__)
    add_config_arguments(ht, HTTrainConfig)
    ht.set_defaults(func=cmd_ht, config_class=HTTrainConfig)
    return parser


def config_from_args(args: argparse.Namespace) -> PPDTrainConfig | HTTrainConfig:
    cls = args.config_class
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names})


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        return args.func(args, argv)
    except (CheckpointError, DatasetError, PromptTokenError, TransferMapError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
