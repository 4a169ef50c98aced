"""The runtime core: what a request passes through. runtime.Generator decodes one sequence;
runtime.BatchGenerator decodes many together, each exactly as it would be alone."""

from runtime.batch import BatchGenerator, BatchRequest
from runtime.generator import DEFAULT_MAX_CONTEXT, DEFAULT_MAX_NEW_TOKENS, GenerationStats, Generator, Result

__all__ = ["DEFAULT_MAX_CONTEXT", "DEFAULT_MAX_NEW_TOKENS", "BatchGenerator", "BatchRequest", "GenerationStats",
           "Generator", "Result"]
