"""Runtime: the Generator, its backends, proposers and the benchmark harness."""

from runtime.generator import DEFAULT_MAX_CONTEXT, DEFAULT_MAX_NEW_TOKENS, GenerationStats, Generator, Result

__all__ = ["DEFAULT_MAX_CONTEXT", "DEFAULT_MAX_NEW_TOKENS", "GenerationStats", "Generator", "Result"]
