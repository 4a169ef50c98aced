"""Runner factories for the peer-process tests, importable by name in a spawned child: one that echoes,
one that dies of a real SIGSEGV on a chosen call (as llama.cpp's q4_1 decode did on an AMX Xeon), one
that dies while loading, one that raises an ordinary error."""

from __future__ import annotations

import os
import signal

from tools.bench.runs import PromptRun


class Echo:
    def __init__(self, crash_on_call: int | None = None) -> None:
        self.calls, self.crash_on_call = 0, crash_on_call

    def __call__(self, prompt_ids: list[int]) -> PromptRun:
        self.calls += 1
        if self.calls == self.crash_on_call:
            os.kill(os.getpid(), signal.SIGSEGV)
        return PromptRun(list(prompt_ids[:3]), 3, 0.01)

    def pid(self) -> int:
        return os.getpid()

    def refuse(self, what: str) -> None:
        raise ValueError(f"refused {what}")


def echo(crash_on_call: int | None = None) -> Echo:
    return Echo(crash_on_call)


def crash_while_loading() -> Echo:
    os.kill(os.getpid(), signal.SIGSEGV)
    raise AssertionError("unreachable")


def fail_while_loading() -> Echo:
    raise FileNotFoundError("no such model: build it with `make peers`")
