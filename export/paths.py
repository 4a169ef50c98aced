"""Where artifacts live. The one home of the default model location."""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# Override with PPDEPLOY_ARTIFACTS to keep models and engines outside the checkout.
ARTIFACTS_DIR = Path(os.environ.get("PPDEPLOY_ARTIFACTS", REPO_ROOT / "artifacts"))
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
DEFAULT_MODEL_DIR = ARTIFACTS_DIR / "models" / DEFAULT_MODEL_NAME


def packaged_file(package: str, file: str, error: type[Exception], install: str) -> Path:
    """A data file shipped inside an installed wheel (its code is not imported). `error` is raised,
    naming `install` as the fix, when the package or the file is missing."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError as exc:
        raise error(f"package {package} is not installed: {install}") from exc
    path = Path(dist.locate_file(file))
    if not path.is_file():
        raise error(f"{package} is installed but {path} is missing: reinstall it ({install})")
    return path
