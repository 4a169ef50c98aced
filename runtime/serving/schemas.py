"""The OpenAI request bodies as pydantic models, validated in full before anything is queued, and
the OpenAI error shape `{"error": {"message", "type", "param", "code"}}`.

Validation is strict (no "5" for 5, no 5.0 for an int) and closed (an unknown field is a 400 naming
it, so a client asking for something this server does not do, e.g. `logprobs` or `n: 2`, hears so
instead of getting a silently different answer). Every error message names the field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, ValidationError

from runtime.decoding import DecodingOptions

# Requests are bounded so that one client cannot exhaust the server's memory: the body size is
# checked while it is read (413), the message count and stop strings here (400).
MAX_BODY_BYTES = 1 << 20
MAX_MESSAGES = 256
MAX_STOP_STRINGS = 4              # OpenAI's limit
MAX_STOP_CHARS = 256
DEFAULT_TEMPERATURE = 1.0         # OpenAI's documented default (the Generator's own default is greedy)


class ApiError(Exception):
    """An error that leaves as an OpenAI error body with an HTTP status (or as an SSE error event)."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             413: "invalid_request_error", 429: "rate_limit_error", 503: "server_error", 500: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(status, message, param, code, headers)   # picklable: Ray carries it between processes
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.TYPES.get(self.status, "server_error"), self.param, self.code)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# --- field validators for OpenAI's union-typed fields (one clear message each) -----------------------

def _text_content(value: Any) -> str:
    """A message's content: a string, or a list of {"type": "text", "text": ...} parts (joined by newlines)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) and len(p) == 2
            for p in value):
        return "\n".join(p["text"] for p in value)
    raise ValueError("content must be a string or a list of {\"type\": \"text\", \"text\": ...} parts "
                     f"(images and other parts are not supported), got {type(value).__name__}")


def _prompt(value: Any) -> str | list[int]:
    """/v1/completions' prompt: one string, or one list of token ids (batches are not supported)."""
    if isinstance(value, str) and value:
        return value
    if (isinstance(value, list) and value
            and all(isinstance(t, int) and not isinstance(t, bool) for t in value)):
        return value
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str) and value[0]:
        return value[0]
    raise ValueError("prompt must be a non-empty string or a non-empty list of token ids "
                     "(one prompt per request)")


def _stop(value: Any) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value
    if value is None:
        return ()
    if not (isinstance(stops, list) and all(isinstance(s, str) for s in stops)):
        raise ValueError("stop must be a string or a list of strings")
    if len(stops) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in stops):
        raise ValueError(f"stop takes at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} characters")
    return tuple(s for s in stops if s)


Content = Annotated[str, PlainValidator(_text_content)]
PromptField = Annotated[str | list[int], PlainValidator(_prompt)]
StopField = Annotated[tuple[str, ...], PlainValidator(_stop)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Content

    def as_dict(self) -> dict[str, str]:
        # "developer" is OpenAI's newer name for the system turn; chat templates know "system".
        return {"role": "system" if self.role == "developer" else self.role, "content": self.content}


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """The fields both routes share."""

    model: str
    max_tokens: int | None = Field(None, ge=1)   # None: as many as the context leaves
    temperature: float = Field(DEFAULT_TEMPERATURE, ge=0, le=2, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    top_k: int = Field(0, ge=0)                  # an extension (vLLM has it too); 0 = off
    seed: int | None = Field(None, ge=-(1 << 63), lt=1 << 64)
    stop: StopField = ()
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1                             # one choice per request
    user: str | None = None                       # accepted and ignored (an end-user id for abuse tracking)

    def decoding(self) -> DecodingOptions:
        return DecodingOptions(self.temperature, self.top_p, self.top_k, self.seed)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1)   # the newer name of max_tokens

    @property
    def budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Sampling):
    prompt: PromptField

    @property
    def budget(self) -> int | None:
        return self.max_tokens


def parse_request(cls: type[_Sampling], body: bytes) -> _Sampling:
    """The validated request, or ApiError(400) naming the first bad field."""
    try:
        request = cls.model_validate_json(body)
    except ValidationError as exc:
        raise _bad_request(exc) from None
    if request.stream_options is not None and not request.stream:
        raise ApiError(400, "stream_options is only allowed when stream is true", "stream_options")
    if isinstance(request, ChatRequest) and request.max_tokens and request.max_completion_tokens:
        raise ApiError(400, "pass max_tokens or max_completion_tokens, not both", "max_completion_tokens")
    return request


def _bad_request(exc: ValidationError) -> ApiError:
    error = exc.errors(include_url=False)[0]
    if error["type"] == "json_invalid":
        return ApiError(400, f"malformed JSON body: {error['msg']}", None, "invalid_json")
    if error["type"] == "model_type" and not error["loc"]:
        return ApiError(400, "the request body must be a JSON object", None, "invalid_json")
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"]).lstrip(".") or None
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unsupported field (this server does not implement it)"
    elif error["type"] == "missing":
        message = "required field is missing"
    return ApiError(400, f"{param}: {message}" if param else message, param, error["type"])
