"""Where artifacts live. The one home of the default model location."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# Override with PPDEPLOY_ARTIFACTS to keep models and engines outside the checkout.
ARTIFACTS_DIR = Path(os.environ.get("PPDEPLOY_ARTIFACTS", REPO_ROOT / "artifacts"))
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
DEFAULT_MODEL_DIR = ARTIFACTS_DIR / "models" / DEFAULT_MODEL_NAME
