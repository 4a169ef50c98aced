"""The recorded step inputs ("feeds", one {input name: array} per step) on disk, in Polygraphy's
--load-inputs JSON (so `polygraphy run model.onnx --onnxrt --load-inputs F` replays them), and checked
against the engine's manifest before any runner sees them."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from export.manifest import Manifest, ManifestError

Feed = Mapping[str, np.ndarray]


def save_feeds(feeds: Sequence[Feed], path: str | Path) -> Path:
    """Write the feeds as Polygraphy's --load-inputs JSON (a list of feed dicts)."""
    from polygraphy.json import save_json
    from polygraphy.logger import G_LOGGER

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        save_json([OrderedDict(feed) for feed in feeds], str(path), description="recorded step inputs")
    return path


def load_feeds(path: str | Path) -> list[OrderedDict]:
    from polygraphy.json import load_json
    from polygraphy.logger import G_LOGGER

    if not Path(path).is_file():
        raise FileNotFoundError(f"step inputs {path} do not exist; record them with `python -m tools check ENGINE_DIR`")
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        feeds = load_json(str(path), description="recorded step inputs")
    if not isinstance(feeds, list) or not all(isinstance(f, dict) for f in feeds):
        raise ValueError(f"{path} is not Polygraphy input data (a JSON list of feed dicts); record it with "
                         f"`python -m tools check ENGINE_DIR`")
    return [OrderedDict(f) for f in feeds]


def check_feeds(feeds: Sequence[Feed], manifest: Manifest) -> None:
    """Every feed holds exactly the manifest's inputs, in its dtypes, at a shape some profile covers."""
    if not feeds:
        raise ValueError("no step inputs to compare on")
    problems = []
    for i, feed in enumerate(feeds):
        if list(feed) != manifest.input_names:
            problems.append(f"step {i}: inputs {list(feed)[:4]}... are not the manifest's {manifest.input_names[:4]}...")
            continue
        problems += [f"step {i}: {spec.name} is {feed[spec.name].dtype}, the manifest says {spec.dtype}"
                     for spec in manifest.inputs if feed[spec.name].dtype != np.dtype(spec.dtype)]
        try:
            manifest.check_step_shape(*feed_shape(feed))
        except ManifestError as exc:
            problems.append(f"step {i}: {exc}")
    if problems:
        raise ValueError(f"step inputs do not fit {manifest.dir}: " + "; ".join(problems))


def feed_shape(feed: Feed) -> tuple[int, int]:
    """(T, S): tree nodes and committed cache entries of a step."""
    return int(feed["input_ids"].shape[0]), int(feed["past_key.0"].shape[0])


def feed_label(feed: Feed) -> str:
    """'chain T=46 S=0' (a prefill: every node sees all before it) or 'tree T=10 S=57'."""
    t, s = feed_shape(feed)
    chain = np.array_equal(feed["tree_mask"] == 0, np.tril(np.ones((t, t), dtype=bool)))
    return f"{'chain' if chain else 'tree'} T={t} S={s}"
