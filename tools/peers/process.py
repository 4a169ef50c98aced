"""A bench peer in a process of its own: native code we do not control (llama.cpp, onnxruntime-genai,
transformers' generate) runs there, so a crash inside it (a segfault in llama_decode) ends that peer's
runs, reported as its failure, while the bench and every other run go on.

    parent (the bench)                           child (spawned: a fresh interpreter, no forked state)
    PeerProcess(label, factory, kwargs) ──────►  runner = factory(**kwargs)      (loads the model)
        ◄──── ("ready", None) | ("raised", exc)
    peer(prompt_ids) / peer.call(name, ...) ──►  getattr(runner, name)(*args)    (timed in the child)
        ◄──── ("returned", value) | ("raised", exc)
    EOF on the pipe, or the child gone  ──────►  PeerFailed naming the exit code or signal

The timings a runner returns are taken inside the child, around the generation only: the pipe's cost
is never in them. `factory` must be importable by name (a module-level function).
"""

from __future__ import annotations

import multiprocessing
import signal
import traceback
from collections.abc import Callable
from typing import Any

from tools.bench.runs import PeerFailed, PromptRun

# How long a peer may take to load its model before it counts as failed (a llama.cpp GGUF conversion
# of a 135M model takes ~30 s on 2 cores; a first onnxruntime-genai build a few minutes).
LOAD_TIMEOUT_S = 1800.0


def _serve(conn, factory: Callable[..., Any], kwargs: dict) -> None:
    """The child: build the runner, then answer calls until told to stop or the pipe closes."""
    try:
        runner = factory(**kwargs)
    except Exception as exc:  # noqa: BLE001 - any load error is reported to the parent, which raises it
        conn.send(("raised", _picklable(exc)))
        return
    conn.send(("ready", None))
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        name, args, call_kwargs = message
        try:
            conn.send(("returned", getattr(runner, name)(*args, **call_kwargs)))
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
            conn.send(("raised", _picklable(exc)))


def _picklable(exc: Exception) -> Exception:
    """`exc` if it survives pickling, else a RuntimeError with its type, message and traceback."""
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - any pickling failure falls back to text
        return RuntimeError(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")


def describe_exit(code: int | None) -> str:
    """'killed by SIGSEGV', 'exited with code 3', or 'still running'."""
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


class PeerProcess:
    """A runner living in a spawned child process; calling it runs one prompt there."""

    def __init__(self, label: str, factory: Callable[..., Any], kwargs: dict | None = None,
                 load_timeout_s: float = LOAD_TIMEOUT_S) -> None:
        self.label = label
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child, factory, kwargs or {}), daemon=True,
                                        name=f"peer-{label}")
        self._process.start()
        child.close()
        self.failure: str | None = None
        self._answer("loading", load_timeout_s)

    def __call__(self, prompt_ids: list[int]) -> PromptRun:
        return self.call("__call__", prompt_ids)

    def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """runner.name(*args, **kwargs) in the child; its exception is raised here, a crash is PeerFailed."""
        if self.failure is not None:
            raise PeerFailed(self.failure)
        try:
            self._conn.send((name, args, kwargs))
        except (BrokenPipeError, OSError):
            self._fail(f"while sending {name}")
        return self._answer(f"during {name}")

    def _answer(self, during: str, timeout_s: float | None = None) -> Any:
        try:
            if timeout_s is not None and not self._conn.poll(timeout_s):
                self._process.kill()
                self._fail(f"{during}: no answer within {timeout_s:.0f} s")
            kind, value = self._conn.recv()
        except (EOFError, ConnectionResetError, OSError):
            self._fail(during)
        if kind == "raised":
            raise value
        return value

    def _fail(self, during: str) -> None:
        self._process.join(timeout=10)
        self.failure = f"the {self.label} peer's process {describe_exit(self._process.exitcode)} {during}"
        self._conn.close()
        raise PeerFailed(self.failure)

    def close(self) -> None:
        """Ask the child to stop and wait for it (killed if it does not stop within 10 s)."""
        if self._process.is_alive():
            try:
                self._conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            self._process.join(timeout=10)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
        self._conn.close()

    def __enter__(self) -> "PeerProcess":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
