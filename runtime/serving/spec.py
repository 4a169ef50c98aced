"""What a server loads, as plain data: a Ray replica receives it pickled and loads its own generator."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from export.checkpoint import check_model_dir
from export.manifest import DEFAULT_MAX_CONTEXT, Manifest
from export.paths import DEFAULT_MODEL_DIR
from runtime.batch import DEFAULT_MAX_BATCH, BatchGenerator
from runtime.generator import DEFAULT_DEVICE, DEFAULT_METHOD


@dataclass(frozen=True)
class GeneratorSpec:
    """A model dir + method + backend (BatchGenerator.from_pretrained), or an engine dir
    (BatchGenerator.from_engine: method None = the one it was exported for), decoding up to `max_batch`
    requests in each step."""

    model: str | None = None          # checkpoint dir (None: the default model)
    engine: str | None = None         # exported engine dir; takes precedence over model/backend
    method: str | None = None
    backend: str | None = None
    device: str = DEFAULT_DEVICE
    max_context: int = DEFAULT_MAX_CONTEXT
    options: dict = field(default_factory=dict)   # method options (e.g. ngram's max_ngram)
    max_batch: int = DEFAULT_MAX_BATCH
    threads: int | None = None        # compute threads of the backend (None: its default, every core)

    def load(self) -> BatchGenerator:
        if self.engine is not None:
            methods = None if self.method is None else (self.method,)
            return BatchGenerator.from_engine(self.engine, methods, self.device, self.max_context, self.max_batch,
                                              threads=self.threads)
        backend = {} if self.backend is None else {"backend": self.backend}
        return BatchGenerator.from_pretrained(self.model, (self.method or DEFAULT_METHOD,), device=self.device,
                                              max_context=self.max_context, max_batch=self.max_batch,
                                              threads=self.threads, **backend, **self.options)

    def model_id(self) -> str:
        """The name clients pass as `model`: the engine's model name, or the checkpoint dir's name.
        Checks the dir exists (a clear error before any server starts)."""
        if self.engine is not None:
            return Manifest.load(self.engine, verify_files=False).model.name
        return check_model_dir(Path(self.model) if self.model else DEFAULT_MODEL_DIR).name
