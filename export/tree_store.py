"""Where the tree search's files live, which one is used, and when a searched tree is current.

Two places hold latency profiles and tree files (trees/devices.py names them):

    committed   next to the method's checkpoint (checkpoints/<model>/): tracked, written only when a
                command is asked to (`build --update-committed`, `profile`, or an explicit --out)
    generated   artifacts/trees/<checkpoint dir name>/: what `make tree` searched or measured on this
                machine (ignored by git)

Readers look in the generated dir first, then the committed one (`search_dirs`); a measured profile
wins over a modelled (roofline) one wherever it lies. A tree records the sha256 of its search inputs
(`inputs_sha256`: method, checkpoint identity, the profile's and statistics' content, the search
config); a build whose inputs hash equals a tree's does nothing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from export.paths import ARTIFACTS_DIR

GENERATED_ROOT = ARTIFACTS_DIR / "trees"   # tests point it at a temp dir
INPUTS_FIELD = "inputs_sha256"             # a top-level key of a tree file (its metadata)


def generated_dir(checkpoint_dir: str | Path) -> Path:
    """This machine's profiles and trees for the checkpoints in `checkpoint_dir`."""
    return GENERATED_ROOT / Path(checkpoint_dir).resolve().name


def search_dirs(checkpoint_dir: str | Path) -> tuple[Path, Path]:
    """(generated, committed): the order readers look for a profile or tree."""
    return generated_dir(checkpoint_dir), Path(checkpoint_dir)


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def json_content_sha256(path: str | Path) -> str:
    """sha256 of a JSON file's content (parsed, keys sorted: indentation and key order do not count)."""
    return hashlib.sha256(_canonical(json.loads(Path(path).read_text()))).hexdigest()


def search_inputs_sha256(method: str, model_fingerprint: str, checkpoint_sha256: str, files: Mapping[str, Path],
                         config: Mapping[str, Any], revision: int) -> str:
    """One hash of everything a tree search reads: `files` (role -> JSON file: profile, statistics,
    n-gram statistics) by content, the search config, and `revision` (bumped when the search's code
    changes its result)."""
    record = {"method": method, "model_fingerprint": model_fingerprint, "checkpoint_sha256": checkpoint_sha256,
              "files": {role: json_content_sha256(path) for role, path in files.items()}, "config": dict(config),
              "revision": revision}
    return hashlib.sha256(_canonical(record)).hexdigest()


def recorded_inputs_sha256(tree_path: str | Path) -> str | None:
    """The inputs hash a tree file records; None when it has none (written before the field) or
    cannot be read (then it is not current either)."""
    try:
        recorded = json.loads(Path(tree_path).read_text()).get(INPUTS_FIELD)
    except (OSError, ValueError, AttributeError):
        return None
    return recorded if isinstance(recorded, str) else None


def tree_pictures(tree_path: str | Path) -> list[Path]:
    """The PNGs `build` writes beside a tree file."""
    stem = Path(tree_path).with_suffix("")
    return [Path(f"{stem}-{suffix}.png") for suffix in ("latency", "search", "trees")]
