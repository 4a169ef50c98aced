"""Scale-out on Ray Serve: the deployments and the application (`python -m tools serve --ray` starts
it; needs `pip install '.[serve-ray]'`).

    HTTP -> Ray proxy -> Ingress (the same FastAPI app as the in-process server: validation, SSE,
                         metrics, auth)  --handle.options(stream=True).generate-->  GeneratorReplica x N
                                                                                    (max_ongoing_requests
                                                                                     = its max_batch)

Each generator replica is a LocalEngine with one worker thread and its BatchGenerator: it prepares the
request (encode + budget: 400s come back as the stream's first event), then streams the events. Ray queues requests
for busy replicas, up to `max_queued_requests`; past that the handle raises BackPressureError, which
the ingress answers with 429 + Retry-After. A client that goes away cancels the ingress request, which
cancels the replica's stream, which cancels the job.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ray import serve
from ray.exceptions import RayError
from ray.serve.exceptions import BackPressureError, RequestCancelledError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from runtime.serving.app import create_app
from runtime.serving.jobs import Done, Event, Failed, GenerationRequest
from runtime.serving.schemas import ApiError
from runtime.serving.spec import GeneratorSpec
from runtime.serving.worker import CLIENT_GONE, RETRY_AFTER_S, EngineStatus, LocalEngine

log = logging.getLogger(__name__)

APP_NAME = "ppdeploy"
# Streams are long-lived and cheap on the ingress: it must hold every running and queued request at
# once (the generators' own limits decide admission), so its cap is far above theirs.
INGRESS_MAX_ONGOING = 1024


@dataclass(frozen=True)
class Admitted:
    """The first event of a replica's stream once the request passed validation on the replica."""

    prompt_tokens: int


@serve.deployment(name="generator")
class GeneratorReplica:
    """One BatchGenerator on one worker thread: up to its max_batch requests at a time (the deployment's
    max_ongoing_requests, build_app), decoded together."""

    def __init__(self, spec: GeneratorSpec) -> None:
        self.engine = LocalEngine(spec.load, replicas=1, queue_size=spec.max_batch)
        self.engine.wait_ready()   # the replica is not healthy (gets no traffic) until the model has loaded

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Admitted | Event]:
        try:
            handle = await self.engine.open(request)
        except ApiError as exc:
            yield Failed(exc.status, exc.message, exc.param)
            return
        yield Admitted(handle.prompt_tokens)
        try:
            async for event in handle:
                yield event
        finally:   # also on cancellation by the caller: stop the generation after its current step
            handle.cancel()

    def check_health(self) -> None:
        status = self.engine.status()
        if not status.ready:
            raise RuntimeError(status.error or "generator not loaded")


class RayHandle:
    """The ingress side of one replica stream (the events after Admitted)."""

    def __init__(self, stream: DeploymentResponseGenerator, prompt_tokens: int, engine: "RayEngine") -> None:
        self.stream, self.prompt_tokens, self.engine = stream, prompt_tokens, engine
        self.ended = False

    def _end(self) -> None:
        if not self.ended:
            self.ended = True
            self.engine.running -= 1

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Event]:
        try:
            async for event in self.stream:
                if isinstance(event, (Done, Failed)):
                    self._end()
                yield event
                if self.ended:
                    return
        except RequestCancelledError:   # cancel() was called while we waited: the client left
            yield CLIENT_GONE
        except RayError as exc:         # the replica died mid-stream: an error response / event
            log.exception("generator replica failed")
            self._end()
            yield Failed(500, f"the generator replica failed: {type(exc).__name__}")

    def cancel(self) -> None:
        """Stop the replica's generation (Ray cancels its stream; the replica cancels the job)."""
        if not self.ended:
            self._end()
            self.engine.cancelled += 1
            self.stream.cancel()


class RayEngine:
    """The Engine of the ingress: requests go to the generator deployment through its handle."""

    def __init__(self, generator: DeploymentHandle) -> None:
        self.generator = generator.options(stream=True)
        self.waiting = self.running = self.cancelled = 0   # touched only on the ingress's event loop

    async def open(self, request: GenerationRequest) -> RayHandle:
        stream = self.generator.generate.remote(request)
        self.waiting += 1
        try:
            first = await stream.__anext__()
        except BackPressureError:
            raise ApiError(429, "the server is busy: every replica is generating and the queue is full; retry "
                           f"after {RETRY_AFTER_S}s", code="overloaded",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except asyncio.CancelledError:   # the client left while queued
            stream.cancel()
            raise
        finally:
            self.waiting -= 1
        if isinstance(first, Failed):
            raise ApiError(first.status, first.message, first.param)
        self.running += 1
        return RayHandle(stream, first.prompt_tokens, self)

    def status(self) -> EngineStatus:
        # Ray only routes to the app once its replicas are healthy (loaded).
        return EngineStatus(True, None, self.waiting, self.running, self.cancelled)


@serve.deployment(name="ingress", max_ongoing_requests=INGRESS_MAX_ONGOING, ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Ingress:
    def __init__(self, generator: DeploymentHandle, model_id: str, api_key: str | None, max_body_bytes: int) -> None:
        self.engine = RayEngine(generator)
        self.settings = (model_id, api_key, max_body_bytes)

    def __serve_build_asgi_app__(self):
        model_id, api_key, max_body_bytes = self.settings
        return create_app(self.engine, model_id, api_key=api_key, max_body_bytes=max_body_bytes)


def build_app(spec: GeneratorSpec, model_id: str, *, replicas: int, min_replicas: int | None, max_replicas: int | None,
              queue_size: int, replica_cpus: float, api_key: str | None, max_body_bytes: int) -> serve.Application:
    """The Ray Serve application: `replicas` generator replicas, or autoscaling between min and max."""
    if min_replicas is not None and max_replicas is not None:
        scaling = {"autoscaling_config": {"min_replicas": min_replicas, "max_replicas": max_replicas,
                                          "target_ongoing_requests": spec.max_batch}}
    else:
        scaling = {"num_replicas": replicas}
    generator = GeneratorReplica.options(max_ongoing_requests=spec.max_batch, max_queued_requests=queue_size,
                                         ray_actor_options={"num_cpus": replica_cpus}, **scaling).bind(spec)
    return Ingress.bind(generator, model_id, api_key, max_body_bytes)
