"""One generation as a server runs it: the request an engine takes, its preparation (encode + budget
check, before it is queued), and the events it produces.

    GenerationRequest --prepare(batch)--> Job(prompt ids, budget, stop, decoding)     or ApiError 400
    Job --submit to the worker's BatchGenerator--> JobProgress: Text... then Done       on the worker thread

Everything here is plain picklable data, so Ray can carry a request to a replica and its events back.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import jinja2

from runtime.batch import BatchGenerator, BatchRequest
from runtime.prompting import check_budget, encode_prompt
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


def prepare(batch: BatchGenerator, request: GenerationRequest) -> Job:
    """Encode the prompt and check the budget against the context (ApiError 400 with the numbers).
    Reads only the tokenizer and the backend's limits, so it may run beside a generating worker."""
    param = "prompt" if isinstance(request.prompt, str) or not isinstance(request.prompt[0], dict) else "messages"
    info = batch.backend.info
    try:
        if isinstance(request.prompt, str):
            # /v1/completions continues raw text: no chat template (a str given to a generator would get one).
            prompt_ids = batch.tokenizer(request.prompt).input_ids
            if not prompt_ids:
                raise ValueError("prompt encodes to no tokens")
        else:
            prompt_ids = encode_prompt(batch.tokenizer, request.prompt, info.vocab_size)
    except jinja2.TemplateError as exc:   # e.g. a template that insists on alternating roles
        raise ApiError(400, f"the model's chat template refused these messages: {exc}", param) from None
    except ValueError as exc:
        raise ApiError(400, str(exc), param) from None
    draft = batch.max_draft_tokens
    max_tokens = request.max_tokens
    if max_tokens is None:   # OpenAI's default: as many tokens as the context leaves (at least 1)
        max_tokens = max(1, info.max_context - len(prompt_ids) - draft)
    try:
        check_budget(len(prompt_ids), max_tokens, draft, info.max_context)
    except ValueError as exc:   # says the numbers: prompt + max_tokens + draft vs the context
        raise ApiError(400, str(exc).replace("max_new_tokens", "max_tokens"), "max_tokens",
                       "context_length_exceeded") from None
    return Job(prompt_ids, max_tokens, request.stop, request.decoding)


class StopTrimmer:
    """OpenAI leaves the stop string out of the text; a generator returns text through it. Holds
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


class JobProgress:
    """A job running in the worker's BatchGenerator: after each step, `update` emits its new text and,
    once it has finished, Done."""

    def __init__(self, batch: BatchGenerator, job: Job, emit: Callable[[Event], None]) -> None:
        self.job, self.emit = job, emit
        d = job.decoding
        self.request: BatchRequest = batch.submit(job.prompt_ids, max_new_tokens=job.max_tokens, stop=job.stop,
                                                  temperature=d.temperature, top_p=d.top_p, top_k=d.top_k, seed=d.seed)
        self._trimmer = StopTrimmer(job.stop)

    def update(self) -> bool:
        """Emit what the last step produced; True once the job has ended (Done, or cancelled: nothing)."""
        request = self.request
        if self.job.cancelled.is_set():
            request.cancel()
            return request.done
        if out := self._trimmer.add(request.take_text()):
            self.emit(Text(out))
        if not request.done:
            return False
        rest, _ = self._trimmer.finish()
        if rest:
            self.emit(Text(rest))
        result = request.result
        stats = result.stats
        self.emit(Done(len(self.job.prompt_ids), len(result.token_ids), request.finish_reason or "stop", stats.steps,
                       stats.accepted_tokens, stats.seconds, result.seed))
        return True
