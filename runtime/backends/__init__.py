"""Backends run the step function. `torch` is the reference; others follow the same contract."""

from runtime.backends.base import Backend, ModelInfo, StepOutput

BACKENDS = ("torch",)

__all__ = ["BACKENDS", "Backend", "ModelInfo", "StepOutput"]
