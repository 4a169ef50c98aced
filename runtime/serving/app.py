"""The OpenAI-compatible HTTP app over an engine (in-process worker threads, or Ray Serve replicas).

    POST /v1/chat/completions, /v1/completions   read the body (<= max_body_bytes, else 413) -> validate
                                                 (400) -> model (404) -> engine.open: prepare + queue
                                                 (400 / 429 / 503) -> JSON, or SSE ending in [DONE]
    GET /v1/models, /health (503 while loading), /metrics (Prometheus text)

Everything before engine.open is answered with an HTTP status; once a stream has begun, an error is
sent as an error event. A client that goes away cancels its generation: the handle is cancelled
when the stream is torn down (streaming) or when the disconnect arrives (non-streaming).
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import AsyncIterator
from typing import Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from runtime.serving.jobs import Done, Event, Failed, GenerationRequest, Text
from runtime.serving.metrics import CONTENT_TYPE, ServerMetrics
from runtime.serving.responses import DONE_EVENT, Shape, sse
from runtime.serving.schemas import (MAX_BODY_BYTES, ApiError, ChatRequest, CompletionRequest, error_body,
                                     parse_request)
from runtime.serving.worker import EngineStatus

GENERATION_ROUTES = ("/v1/chat/completions", "/v1/completions")
ROUTES = (*GENERATION_ROUTES, "/v1/models", "/health", "/metrics")


class Handle(Protocol):
    """One admitted generation: its events (Text..., then Done or Failed) and a way to stop it."""

    prompt_tokens: int

    def __aiter__(self) -> AsyncIterator[Event]: ...

    def cancel(self) -> None: ...


class Engine(Protocol):
    async def open(self, request: GenerationRequest) -> Handle:
        """Prepare and admit a generation, or raise ApiError (400 bad prompt / budget, 429, 503)."""
        ...

    def status(self) -> EngineStatus: ...


def create_app(engine: Engine, model_id: str, *, api_key: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The server app. `engine` runs the generations; `model_id` is the one model it answers to;
    with `api_key`, every route but /health needs `Authorization: Bearer <api_key>`."""
    app = FastAPI(title="ppdeploy", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = ServerMetrics(engine.status)
    app.state.metrics = metrics

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(HTTPException)   # unknown routes, wrong methods: OpenAI's shape too
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error"), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.get("/health")
    async def health() -> JSONResponse:
        status = engine.status()
        if not status.ready:
            raise ApiError(503, status.error or "the model is still loading", code="loading")
        return JSONResponse({"status": "ok", "model": model_id})

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [_model_card(model_id)]})

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> JSONResponse:
        if name != model_id:
            raise _unknown_model(name, model_id)
        return JSONResponse(_model_card(model_id))

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await _generate(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _generate(request, chat=False)

    async def _generate(request: Request, chat: bool) -> Response:
        arrived = time.perf_counter()
        body = await _read_body(request, max_body_bytes)
        req = parse_request(ChatRequest if chat else CompletionRequest, body)
        if req.model != model_id:
            raise _unknown_model(req.model, model_id)
        prompt = [m.as_dict() for m in req.messages] if chat else req.prompt
        handle = await engine.open(GenerationRequest(prompt, req.budget, req.stop, req.decoding()))
        shape = Shape(chat, model_id)
        if req.stream:
            return StreamingResponse(_stream(handle, shape, req.include_usage, metrics, arrived),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        text, done = await _collect(request, handle, metrics, arrived)
        return JSONResponse(shape.response(text, done))

    if api_key:
        app.add_middleware(_RequireKey, key=api_key)
    app.add_middleware(_CountRequests, metrics=metrics)   # added last = outermost: counts the 401s too
    return app


async def _collect(request: Request, handle: Handle, metrics: ServerMetrics, arrived: float) -> tuple[str, Done]:
    """The whole text and the Done event of a non-streamed generation (ApiError if it failed)."""
    watcher = asyncio.create_task(_cancel_on_disconnect(request, handle))
    pieces: list[str] = []
    try:
        async for event in handle:
            if isinstance(event, Text):
                if not pieces:
                    metrics.ttft.observe(time.perf_counter() - arrived)
                pieces.append(event.text)
            elif isinstance(event, Failed):   # also CLIENT_GONE: the response goes nowhere, but is counted
                raise ApiError(event.status, event.message, event.param)
            else:
                metrics.finished(event)
                metrics.latency.observe(time.perf_counter() - arrived)
                return "".join(pieces), event
    finally:
        watcher.cancel()
        handle.cancel()
    raise RuntimeError("a generation's events ended without Done or Failed")


async def _stream(handle: Handle, shape: Shape, include_usage: bool, metrics: ServerMetrics,
                  arrived: float) -> AsyncIterator[bytes]:
    """The SSE body. Starlette cancels it when the client disconnects; `finally` then stops the job."""
    first = True
    try:
        if shape.chat:
            yield sse(shape.chunk("", role=True))
        async for event in handle:
            if isinstance(event, Text):
                if first:
                    metrics.ttft.observe(time.perf_counter() - arrived)
                    first = False
                yield sse(shape.chunk(event.text))
            elif isinstance(event, Done):
                metrics.finished(event)
                yield sse(shape.chunk(None, event.finish_reason))
                if include_usage:
                    yield sse(shape.usage_chunk(event))
            else:
                yield sse(ApiError(event.status, event.message, event.param).body())
        metrics.latency.observe(time.perf_counter() - arrived)
        yield DONE_EVENT
    finally:
        handle.cancel()


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed `limit` bytes."""
    too_large = ApiError(413, f"request body exceeds {limit} bytes", code="request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


async def _cancel_on_disconnect(request: Request, handle: Handle) -> None:
    """Wait for the client to go away (the body has been read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    handle.cancel()


def _model_card(model_id: str) -> dict:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "ppdeploy"}


def _unknown_model(name: str, model_id: str) -> ApiError:
    return ApiError(404, f"model {name!r} does not exist: this server serves {model_id!r}", "model",
                    "model_not_found")


class _CountRequests:
    """Counts every response by route and status (pure ASGI: it must not buffer streams)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in ROUTES else "other"

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.request(route, message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)


class _RequireKey:
    """Every route but /health needs `Authorization: Bearer <key>` (compared in constant time)."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                body = error_body("missing or wrong API key: send `Authorization: Bearer <key>`",
                                  "invalid_request_error", None, "invalid_api_key")
                response = JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        await self.app(scope, receive, send)
