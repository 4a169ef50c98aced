"""HT's layer analysis in small (`python -m train ht-layers`): held-out accuracy per offset for
maps trained at several layers l, as a markdown table and a PNG.

Input: the training reports `python -m train ht --layer L --output F` writes beside F (F with
.json); every report must come from the same data and settings apart from the layer, which is
checked, so the table compares layers and nothing else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from trees.atomic import atomic_path

# Settings that must agree between the compared runs (report keys; `config` holds the rest).
SAME_SETTINGS = ("model_fingerprint", "num_maps", "train_samples", "val_samples", "val_positions")
SAME_CONFIG = ("lr", "epochs", "batch_samples", "decay", "seed", "data_seed", "max_context_tokens",
               "continuation_tokens", "weight_decay", "warmup_ratio")


@dataclass(frozen=True)
class LayerRun:
    layer: int
    num_layers: int
    top1: tuple[float, ...]     # per offset: pseudo state j predicts t+2+j
    top10: tuple[float, ...]
    val_loss: float
    trainable_parameters: int
    train_seconds: float
    train_samples: int
    source: Path


def load_runs(paths: list[Path]) -> list[LayerRun]:
    """The reports in `paths`, sorted by layer; refused if they differ in anything but the layer."""
    if len(paths) < 2:
        raise ValueError("compare at least two training reports (one per layer)")
    reports = []
    for path in paths:
        try:
            reports.append((Path(path), json.loads(Path(path).read_text())))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read training report {path} ({exc}): pass the .json that "
                             f"`python -m train ht --output F` wrote beside F") from exc
    first_path, first = reports[0]
    for path, report in reports:
        if "layer" not in report or "val_top1" not in report:
            raise ValueError(f"{path} is not an HT training report (no layer / val_top1)")
        config, first_config = report.get("config", {}), first.get("config", {})
        for key in SAME_SETTINGS:
            if report.get(key) != first.get(key):
                raise ValueError(f"{path} has {key}={report.get(key)!r} but {first_path} has {first.get(key)!r}: "
                                 f"compare runs that differ only in --layer")
        for key in SAME_CONFIG:
            if config.get(key) != first_config.get(key):
                raise ValueError(f"{path} was trained with {key}={config.get(key)!r} but {first_path} with "
                                 f"{first_config.get(key)!r}: compare runs that differ only in --layer")
    layers = [r["layer"] for _, r in reports]
    if len(set(layers)) != len(layers):
        raise ValueError(f"two reports for the same layer: {sorted(layers)}")
    runs = [LayerRun(r["layer"], r["num_layers"], tuple(r["val_top1"]), tuple(r["val_top10"]), r["val_loss"],
                     r["trainable_parameters"], r["train_seconds"], r["train_samples"], p) for p, r in reports]
    return sorted(runs, key=lambda run: run.layer)


def markdown_table(runs: list[LayerRun]) -> str:
    k = len(runs[0].top1)
    offsets = " / ".join(f"t+{j + 2}" for j in range(k))
    lines = [f"| layer l (of {runs[0].num_layers}) | top-1 {offsets} | top-10 {offsets} | val loss | train s |",
             "| --- | --- | --- | --- | --- |"]
    for run in runs:
        lines.append(f"| {run.layer} | {' / '.join(f'{a:.3f}' for a in run.top1)} | "
                     f"{' / '.join(f'{a:.3f}' for a in run.top10)} | {run.val_loss:.3f} | {run.train_seconds:.0f} |")
    return "\n".join(lines)


def plot_layers(runs: list[LayerRun], out: Path, title: str) -> Path:
    """Two panels (top-1, top-10): accuracy against layer l, one line per offset. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [run.layer for run in runs]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for ax, name, values in ((axes[0], "top-1", [run.top1 for run in runs]),
                             (axes[1], "top-10", [run.top10 for run in runs])):
        for j in range(len(values[0])):
            ax.plot(layers, [v[j] for v in values], marker="o", label=f"pseudo state {j}: t+{j + 2}")
        ax.set_xlabel(f"layer l the maps read (0-based, of {runs[0].num_layers})")
        ax.set_ylabel(f"held-out {name} accuracy")
        ax.set_xticks(layers)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    try:
        with atomic_path(out, suffix=".png") as tmp:  # savefig picks the format from the suffix
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    return out
