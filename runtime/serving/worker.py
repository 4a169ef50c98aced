"""The in-process engine: one worker thread per replica, each owning a BatchGenerator (it owns one KV
cache of `max_batch` sequences and is driven by one thread), all fed from one bounded queue.

    request handler (event loop)                       worker thread (owns one BatchGenerator)
    open(): prepare() in a thread -> 400               loads it (engine not ready until all have)
            queue.put_nowait(job)  -> 429 when full    loop: take jobs while its batch has room (wait for
                                                             one when it is empty); one step of the batch;
    async for event in handle  <---- call_soon_threadsafe(emit) ----  each job's new Text..., Done | Failed
    handle.cancel() (client gone) -> job.cancelled   checked after every step: its sequence is dropped and
                                                     its cache cells freed before the next

Admission is all-or-nothing at open(): a request is either queued (and then runs) or refused with 429
and `Retry-After`; the queue holds at most `queue_size` waiting jobs, beside up to `max_batch` running
in each worker's batch.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from runtime.batch import BatchGenerator
from runtime.serving.jobs import Done, Event, Failed, GenerationRequest, Job, JobProgress, prepare
from runtime.serving.schemas import ApiError

log = logging.getLogger(__name__)

# transformers' from_pretrained patches process-wide state while it loads (meta-device init): two
# Generators loading at once in one process fail ("Cannot copy out of meta tensor"), so loads queue.
_LOAD_LOCK = threading.Lock()

# Requests that may wait for a worker beyond the running ones (a few short generations' worth).
DEFAULT_QUEUE_SIZE = 8
# Seconds a refused client is told to wait (429 Retry-After): about one short generation on this CPU.
RETRY_AFTER_S = 1


@dataclass(frozen=True)
class EngineStatus:
    """What /health and /metrics report about an engine."""

    ready: bool
    error: str | None       # why loading failed, if it did
    queued: int             # jobs waiting for a place in a worker's batch
    busy: int               # workers generating now
    cancelled: int          # generations stopped because their client went away
    batched: int = 0        # generations in the workers' batches now


# The event that ends a cancelled job's iteration (nginx's "client closed request": nobody reads it).
CLIENT_GONE = Failed(499, "the client closed the request")


class JobHandle:
    """The waiting side of one queued job: an async iterator of its events (Text..., Done | Failed),
    used on the event loop that opened it."""

    def __init__(self, job: Job, prompt_tokens: int) -> None:
        self.job, self.prompt_tokens = job, prompt_tokens
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._ended = False

    def emit(self, event: Event) -> None:
        """Hand an event to the waiting side (called from the worker thread)."""
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:   # the event loop is gone (server shutting down): nobody is listening
            self.job.cancelled.set()

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Event]:
        while True:
            event = await self._events.get()
            if isinstance(event, (Done, Failed)):
                self._ended = True
            yield event
            if self._ended:
                return

    def cancel(self) -> None:
        """Stop the generation after its current step (or skip it if it has not started), and end the
        iteration with CLIENT_GONE. Idempotent; nothing happens once the job has ended."""
        if not self._ended and not self.job.cancelled.is_set():
            self.job.cancelled.set()
            self._events.put_nowait(CLIENT_GONE)


class LocalEngine:
    """`replicas` BatchGenerators made by `factory`, each on its own worker thread, behind one queue."""

    def __init__(self, factory: Callable[[], BatchGenerator], replicas: int = 1,
                 queue_size: int = DEFAULT_QUEUE_SIZE) -> None:
        if replicas < 1 or queue_size < 1:
            raise ValueError(f"replicas and queue_size must be >= 1, got {replicas} and {queue_size}")
        self._jobs: queue.Queue[tuple[Job, JobHandle] | None] = queue.Queue(maxsize=queue_size)
        self._batches: list[BatchGenerator] = []
        self._settled = threading.Event()   # every worker has loaded its generator, or one has failed
        self._lock = threading.Lock()
        self._busy = self._cancelled = self._batched = 0
        self._error: str | None = None
        self._threads = [threading.Thread(target=self._work, args=(factory,), name=f"generator-{i}", daemon=True)
                         for i in range(replicas)]
        for thread in self._threads:
            thread.start()

    # --- the request side (event loop) ------------------------------------------------------------
    async def open(self, request: GenerationRequest) -> JobHandle:
        """Validate against the model (400) and queue (429 when full, 503 while loading)."""
        if not self.status().ready:
            raise ApiError(503, self._error or "the model is still loading; retry shortly", code="loading")
        # Tokenising a long prompt takes a while: keep the event loop free meanwhile.
        job = await asyncio.to_thread(prepare, self._batches[0], request)
        handle = JobHandle(job, len(job.prompt_ids))
        try:
            self._jobs.put_nowait((job, handle))
        except queue.Full:
            raise ApiError(429, f"the server is busy: {self._jobs.maxsize} requests are already waiting; retry "
                           f"after {RETRY_AFTER_S}s", code="overloaded",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        return handle

    def status(self) -> EngineStatus:
        with self._lock:
            ready = len(self._batches) == len(self._threads) and self._error is None
            return EngineStatus(ready, self._error, self._jobs.qsize(), self._busy, self._cancelled, self._batched)

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until every worker has loaded its generator (RuntimeError if one failed)."""
        if not self._settled.wait(timeout):
            raise TimeoutError(f"the model did not load within {timeout}s")
        if self._error:
            raise RuntimeError(self._error)

    def close(self) -> None:
        """Let the workers finish their queued jobs and exit (one sentinel each, queued behind them)."""
        for _ in self._threads:
            self._jobs.put(None)

    # --- the worker side (one thread per replica) -------------------------------------------------
    def _work(self, factory: Callable[[], BatchGenerator]) -> None:
        try:
            with _LOAD_LOCK:
                batch = factory()
        except Exception as exc:   # reported by /health and every request (503), and logged in full
            log.exception("loading the generator failed")
            with self._lock:
                self._error = f"loading the model failed: {type(exc).__name__}: {exc}"
            self._settled.set()
            return
        with self._lock:
            self._batches.append(batch)
            if len(self._batches) == len(self._threads):
                self._settled.set()
        running: list[tuple[JobProgress, JobHandle]] = []
        stopping = False
        while running or not stopping:
            stopping = self._take_jobs(batch, running, stopping)
            if not running:
                continue
            with self._lock:
                self._busy, self._batched = self._busy + 1, self._batched + len(running)
            try:
                batch.step()
                ended = [(progress, handle) for progress, handle in running if progress.update()]
            except Exception as exc:   # the step fails its jobs; the worker lives on for the next ones
                log.exception("generation failed")
                for progress, handle in running:
                    progress.request.cancel()
                    handle.emit(Failed(500, f"generation failed: {type(exc).__name__}: {exc}"))
                batch.drop_cancelled()   # their sequences closed, their cache cells freed
                ended = list(running)
            with self._lock:
                self._busy, self._batched = self._busy - 1, self._batched - len(running)
                self._cancelled += sum(progress.job.cancelled.is_set() for progress, _ in ended)
            running[:] = [item for item in running if item not in ended]

    def _take_jobs(self, batch: BatchGenerator, running: list, stopping: bool) -> bool:
        """Move queued jobs into the batch while it has room, waiting for one when it is empty; True once
        the shutdown sentinel was taken."""
        while not stopping and len(running) < batch.max_batch:
            try:
                item = self._jobs.get(block=not running)
            except queue.Empty:
                break
            if item is None:
                return True
            job, handle = item
            if job.cancelled.is_set():   # its client left while it waited
                with self._lock:
                    self._cancelled += 1
                continue
            try:
                running.append((JobProgress(batch, job, handle.emit), handle))
            except ValueError as exc:    # prepare() checked it; a race with another limit answers 400
                handle.emit(Failed(400, str(exc)))
        return stopping
