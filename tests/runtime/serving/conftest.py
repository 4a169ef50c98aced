"""Fixtures of the serving tests: the tiny model behind a real uvicorn server on 127.0.0.1 (a free
port, a background thread), the official openai client, and a raw HTTP helper for what a client
library would refuse to send."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import torch
import uvicorn

from runtime.batch import BatchGenerator
from runtime.generator import Generator
from runtime.serving.app import create_app
from runtime.serving.worker import LocalEngine

MODEL_ID = "tiny"
METHOD = "ngram"   # a parallel method: the server must give what a lone Generator gives


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1:<free port> in a daemon thread."""

    def __init__(self, app) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Served:
    """A running server and what it serves."""

    server: ServerThread
    engine: LocalEngine
    app: object

    @property
    def url(self) -> str:
        return self.server.url

    def client(self, api_key: str = "none", **kwargs):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, **kwargs)

    def request(self, method: str, path: str, body: bytes | str | dict | None = None,
                headers: dict[str, str] | None = None, timeout: float = 60) -> "Reply":
        return raw_request(self.server.port, method, path, body, headers, timeout)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


def raw_request(port: int, method: str, path: str, body: bytes | str | dict | None = None,
                headers: dict[str, str] | None = None, timeout: float = 60) -> Reply:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    if isinstance(body, dict):
        body = json.dumps(body)
    conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    reply = Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    conn.close()
    return reply


@pytest.fixture(scope="package", autouse=True)
def one_torch_thread():
    """The tiny model's steps are microseconds of math: with torch's default threads on a loaded
    2-core machine they spend ~50x longer synchronising (measured: 1.7 s vs 0.03 s for 32 tokens)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="package")
def make_generator(tiny_model_dir) -> Callable[..., BatchGenerator]:
    """What a server worker loads: a BatchGenerator of the served method (`max_batch` requests per step)."""
    return lambda max_batch=4: BatchGenerator.from_pretrained(tiny_model_dir, methods=(METHOD,), max_batch=max_batch)


@pytest.fixture(scope="package")
def reference(tiny_model_dir) -> Generator:
    """A lone Generator of the served configuration: what every server answer must equal, whichever
    other requests shared its batch."""
    return Generator.from_pretrained(tiny_model_dir, method=METHOD)


def serve(factory: Callable[[], BatchGenerator], replicas: int = 1, queue_size: int = 64,
          **app_options) -> Iterator[Served]:
    engine = LocalEngine(factory, replicas, queue_size)
    app = create_app(engine, MODEL_ID, **app_options)
    with ServerThread(app) as server:
        engine.wait_ready(120)
        yield Served(server, engine, app)
    engine.close()


@pytest.fixture(scope="package")
def served(make_generator) -> Iterator[Served]:
    yield from serve(make_generator)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def metric(served: Served, name: str) -> float:
    """One sample's value from /metrics (the first line starting with `name`)."""
    text = served.request("GET", "/metrics").body.decode()
    line = next(line for line in text.splitlines() if line.startswith(name))
    return float(line.rsplit(" ", 1)[1])
