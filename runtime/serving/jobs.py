"""One generation as a server runs it: the request an engine takes, its preparation (encode + budget
check, before it is queued), the events it produces, and the loop that runs it on a Generator.

    GenerationRequest --prepare(generator)--> Job(prompt ids, budget, stop, decoding)    or ApiError 400
    run_job(generator, job): Generator.stream -> Text... then Done | Failed              on the worker thread

Everything here is plain picklable data, so Ray can carry a request to a replica and its events back.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import jinja2

from runtime.generator import Generator, Result
from runtime.serving.schemas import ApiError
from runtime.decoding import DecodingOptions


@dataclass(frozen=True)
class GenerationRequest:
    """What an engine is asked: chat messages (through the chat template), raw text (completed as is)
    or token ids, with a budget (None: all the context leaves), stop strings and decoding options."""

    prompt: list[dict[str, str]] | str | list[int]
    max_tokens: int | None
    stop: tuple[str, ...]
    decoding: DecodingOptions


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Done:
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str           # "stop" (EOS or a stop string) | "length" (the budget)
    steps: int                   # forward passes, prefill included
    accepted_tokens: int         # tokens the steps produced, bonus included
    seconds: float
    seed: int | None             # sampling: the seed used (reproduces the call)


@dataclass(frozen=True)
class Failed:
    status: int
    message: str
    param: str | None = None


Event = Text | Done | Failed


@dataclass
class Job:
    """A prepared generation. `cancelled` is set by whoever waits for it (client gone); the worker
    checks it after every piece the Generator yields and stops there."""

    prompt_ids: list[int]
    max_tokens: int
    stop: tuple[str, ...]
    decoding: DecodingOptions
    cancelled: threading.Event = field(default_factory=threading.Event)


def prepare(generator: Generator, request: GenerationRequest) -> Job:
    """Encode the prompt and check the budget against the context (ApiError 400 with the numbers).
    Reads only the tokenizer and the backend's limits, so it may run beside a generating worker."""
    param = "prompt" if isinstance(request.prompt, str) or not isinstance(request.prompt[0], dict) else "messages"
    try:
        if isinstance(request.prompt, str):
            # /v1/completions continues raw text: no chat template (a str given to Generator would get one).
            prompt_ids = generator.tokenizer(request.prompt).input_ids
            if not prompt_ids:
                raise ValueError("prompt encodes to no tokens")
        else:
            prompt_ids = generator.encode(request.prompt)
    except jinja2.TemplateError as exc:   # e.g. a template that insists on alternating roles
        raise ApiError(400, f"the model's chat template refused these messages: {exc}", param) from None
    except ValueError as exc:
        raise ApiError(400, str(exc), param) from None
    max_tokens = request.max_tokens
    if max_tokens is None:   # OpenAI's default: as many tokens as the context leaves (at least 1)
        max_tokens = max(1, generator.backend.info.max_context - len(prompt_ids)
                         - generator.proposer.max_draft_tokens)
    try:
        generator.check_budget(len(prompt_ids), max_tokens)
    except ValueError as exc:   # says the numbers: prompt + max_tokens + draft vs the context
        raise ApiError(400, str(exc).replace("max_new_tokens", "max_tokens"), "max_tokens",
                       "context_length_exceeded") from None
    return Job(prompt_ids, max_tokens, request.stop, request.decoding)


class StopTrimmer:
    """OpenAI leaves the stop string out of the text; Generator.stream returns text through it. Holds
    back any tail that may still become a stop string, and drops the one that ends the text."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops, self.text, self.sent = stops, "", 0

    def _held(self) -> int:
        """Length of the longest tail of the text that is a prefix of (or is) a stop string."""
        return max((k for s in self.stops for k in range(min(len(s), len(self.text)), 0, -1)
                    if self.text.endswith(s[:k])), default=0)

    def add(self, piece: str) -> str:
        self.text += piece
        end = len(self.text) - self._held()
        out, self.sent = self.text[self.sent:max(end, self.sent)], max(end, self.sent)
        return out

    def finish(self) -> tuple[str, bool]:
        """The rest of the text without a final stop string, and whether one ended it."""
        matched = max((s for s in self.stops if self.text.endswith(s)), key=len, default="")
        end = len(self.text) - len(matched)
        return self.text[self.sent:end], bool(matched)


def run_job(generator: Generator, job: Job, emit: Callable[[Event], None]) -> bool:
    """Run one job on the calling thread, emitting Text pieces then Done (or Failed). Returns False
    when it was cancelled (nothing more is emitted then). Closing the stream stops the Generator
    between two steps and releases it."""
    result = Result([], "")
    trimmer = StopTrimmer(job.stop)
    pieces = generator.stream(job.prompt_ids, job.max_tokens, list(job.stop), result,
                              temperature=job.decoding.temperature, top_p=job.decoding.top_p,
                              top_k=job.decoding.top_k, seed=job.decoding.seed)
    start = time.perf_counter()
    try:
        for piece in pieces:
            if job.cancelled.is_set():
                return False
            if out := trimmer.add(piece):
                emit(Text(out))
    finally:
        pieces.close()
    if job.cancelled.is_set():
        return False
    rest, stopped = trimmer.finish()
    if rest:
        emit(Text(rest))
    tokens = result.token_ids
    ended = stopped or bool(tokens and tokens[-1] in generator.eos_token_ids) or len(tokens) < job.max_tokens
    stats = result.stats
    emit(Done(len(job.prompt_ids), len(tokens), "stop" if ended else "length", stats.steps,
              stats.accepted_tokens, time.perf_counter() - start, result.seed))
    return True
