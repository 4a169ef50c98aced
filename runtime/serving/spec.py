"""What a server loads, as plain data: a Ray replica receives it pickled and loads its own Generator."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from export.checkpoint import check_model_dir
from export.manifest import DEFAULT_MAX_CONTEXT, Manifest
from export.paths import DEFAULT_MODEL_DIR
from runtime.generator import DEFAULT_DEVICE, Generator


@dataclass(frozen=True)
class GeneratorSpec:
    """A model dir + method + backend (Generator.from_pretrained), or an engine dir (Generator.from_engine:
    method None = the one it was exported for)."""

    model: str | None = None          # checkpoint dir (None: the default model)
    engine: str | None = None         # exported engine dir; takes precedence over model/backend
    method: str | None = None
    backend: str | None = None
    device: str = DEFAULT_DEVICE
    max_context: int = DEFAULT_MAX_CONTEXT
    options: dict = field(default_factory=dict)   # method options (e.g. ngram's max_ngram)

    def load(self) -> Generator:
        if self.engine is not None:
            return Generator.from_engine(self.engine, self.method, self.device, self.max_context, **self.options)
        kwargs = {k: v for k, v in (("method", self.method), ("backend", self.backend)) if v is not None}
        return Generator.from_pretrained(self.model, device=self.device, max_context=self.max_context,
                                         **kwargs, **self.options)

    def model_id(self) -> str:
        """The name clients pass as `model`: the engine's model name, or the checkpoint dir's name.
        Checks the dir exists (a clear error before any server starts)."""
        if self.engine is not None:
            return Manifest.load(self.engine, verify_files=False).model.name
        return check_model_dir(Path(self.model) if self.model else DEFAULT_MODEL_DIR).name
