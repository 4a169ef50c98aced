"""Admission and cancellation: a full queue is 429 with Retry-After, a client that goes away stops its
generation within a step and frees its place in the batch; /metrics counts it all."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest

from runtime.batch import BatchGenerator
from tests.runtime.serving.conftest import MODEL_ID, metric, serve, wait_until

CHAT = "/v1/chat/completions"


class Paced:
    """A BatchGenerator whose steps wait at a gate, then take `delay` seconds each: a worker the test can
    hold busy, and generations long enough to be cut off."""

    def __init__(self, inner: BatchGenerator, delay: float = 0.0) -> None:
        self.inner, self.delay = inner, delay
        self.gate = threading.Event()
        self.gate.set()
        self.pieces = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def step(self) -> bool:
        self.gate.wait(60)
        ran = self.inner.step()
        time.sleep(self.delay)
        self.pieces += ran
        return ran


@pytest.fixture(scope="module")
def paced(make_generator):
    """One request at a time (max_batch 1), so a second one waits in the queue of one."""
    holder = {}

    def factory():
        holder["gen"] = Paced(make_generator(max_batch=1))
        return holder["gen"]

    for served in serve(factory, queue_size=1):
        yield served, holder["gen"]


def body(max_tokens: int = 4, stream: bool = False) -> dict:
    return {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens,
            "temperature": 0, "stream": stream}


def test_full_queue_is_429_with_retry_after(paced):
    served, gen = paced
    gen.gate.clear()
    results = {}

    def ask(name):
        results[name] = served.request("POST", CHAT, body())

    first = threading.Thread(target=ask, args=("running",))
    first.start()
    assert wait_until(lambda: served.engine.status().busy == 1)
    second = threading.Thread(target=ask, args=("queued",))
    second.start()
    assert wait_until(lambda: served.engine.status().queued == 1)
    refused = served.request("POST", CHAT, body())
    assert refused.status == 429 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert metric(served, "ppdeploy_queue_depth") == 1
    assert metric(served, "ppdeploy_batch_size") == 1          # the running one decodes in the batch
    gen.gate.set()
    first.join(30), second.join(30)
    assert results["running"].status == results["queued"].status == 200
    assert metric(served, "ppdeploy_batch_size") == 0
    assert metric(served, 'ppdeploy_requests_total{route="/v1/chat/completions",status="429"}') >= 1


def open_stream(port: int, payload: dict) -> socket.socket:
    """Send a streaming request and read until the first token arrives; returns the open socket."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    data = json.dumps(payload).encode()
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                 % (CHAT.encode(), len(data), data))
    received = b""
    while received.count(b"data: ") < 2:   # the role chunk, then the first text
        received += sock.recv(65536)
    return sock


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_stops_its_generation(paced, stream):
    served, gen = paced
    gen.delay = 0.05              # 1000 tokens would take ~50 s
    try:
        cancelled = metric(served, "ppdeploy_cancelled_generations_total")
        if stream:
            sock = open_stream(served.server.port, body(1000, stream=True))
        else:
            sock = socket.create_connection(("127.0.0.1", served.server.port), timeout=30)
            data = json.dumps(body(1000)).encode()
            sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (CHAT.encode(), len(data), data))
            assert wait_until(lambda: gen.pieces > 0 and served.engine.status().busy == 1)
        sock.close()
        left = time.monotonic()
        # Free again within a step or two (0.05 s each), not after the 1000 tokens.
        assert wait_until(lambda: served.engine.status().busy == 0, timeout=5)
        assert time.monotonic() - left < 2
        assert metric(served, "ppdeploy_cancelled_generations_total") == cancelled + 1
    finally:
        gen.delay = 0.0
    started = time.monotonic()
    assert served.request("POST", CHAT, body()).status == 200
    assert time.monotonic() - started < 5


def test_metrics_count_requests_tokens_and_timings(served):
    client = served.client()
    for stream in (False, True):
        r = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=6, temperature=0, stream=stream)
        if stream:
            list(r)
    text = served.request("GET", "/metrics").body.decode()
    for name in ("ppdeploy_requests_total", "ppdeploy_generated_tokens_total", "ppdeploy_prompt_tokens_total",
                 "ppdeploy_decode_steps_total", "ppdeploy_mean_accepted_tokens_per_step", "ppdeploy_tokens_per_second",
                 "ppdeploy_queue_depth", "ppdeploy_busy_workers", "ppdeploy_batch_size",
                 "ppdeploy_cancelled_generations_total",
                 "ppdeploy_time_to_first_token_seconds_count", "ppdeploy_request_seconds_bucket"):
        assert name in text, name
    assert metric(served, 'ppdeploy_requests_total{route="/v1/chat/completions",status="200"}') >= 2
    assert metric(served, "ppdeploy_generated_tokens_total") >= 12
    assert metric(served, "ppdeploy_mean_accepted_tokens_per_step") >= 1.0
    assert metric(served, "ppdeploy_tokens_per_second") > 0
    assert metric(served, "ppdeploy_time_to_first_token_seconds_count") >= 2
    assert metric(served, "ppdeploy_ready") == 1


def test_an_error_after_the_stream_began_is_an_error_event(make_generator):
    class Breaks(Paced):
        def step(self) -> bool:
            if self.pieces >= 3:
                self.pieces = 0
                raise RuntimeError("the device fell over")
            return super().step()

    for served in serve(lambda: Breaks(make_generator())):
        conn = http.client.HTTPConnection("127.0.0.1", served.server.port, timeout=30)
        conn.request("POST", CHAT, json.dumps(body(8, stream=True)), {"Content-Type": "application/json"})
        response = conn.getresponse()
        events = [line[6:] for line in response.read().decode().splitlines() if line.startswith("data: ")]
        assert response.status == 200 and events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert "the device fell over" in error["message"] and error["type"] == "server_error"
        # The worker survives: the next request works (and fails the same way, cleanly, without streaming).
        reply = served.request("POST", CHAT, body(8))
        assert reply.status == 500 and "the device fell over" in reply.json()["error"]["message"]
