"""The CUDA stream and graph work of a backend that runs an engine on a stream of its own (TensorRT),
behind one small interface so the CPU tests can run the same code against a stand-in that models it.

    engine_stream()    the engine's stream handle, ordered after the caller's work (the caller's stream
                       has written the inputs: the engine stream waits for it)
    engine_done()      the caller's stream waits for the engine stream (the readout and the next
                       commits read its outputs): without it they would read outputs not yet written
    capture(run)       a replayable CUDA graph of `run` (the engine's execution at one static shape:
                       its addresses and shapes never change), or `run` itself where there are no graphs

CudaStreams is the real thing (torch.cuda); NoStreams is the CPU's (the stand-in TensorRT's tests pass
their own model of a stream, tests/export/fake_tensorrt.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch


class Streams(Protocol):
    def engine_stream(self) -> int:
        ...

    def engine_done(self) -> None:
        ...

    def capture(self, run: Callable[[], None]) -> Callable[[], None]:
        ...


class NoStreams:
    """The CPU: no streams (handle 0), nothing to order, no graphs."""

    def engine_stream(self) -> int:
        return 0

    def engine_done(self) -> None:
        pass

    def capture(self, run: Callable[[], None]) -> Callable[[], None]:
        return run


class CudaStreams:
    """A CUDA stream of the backend's own, ordered after and before the caller's current stream."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def engine_stream(self) -> int:
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        return self.stream.cuda_stream

    def engine_done(self) -> None:
        torch.cuda.current_stream(self.device).wait_stream(self.stream)

    def capture(self, run: Callable[[], None]) -> Callable[[], None]:
        """Run once to warm up (TensorRT sets up on its first enqueue), then capture a replay of it."""
        run()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream):
            run()
        return graph.replay
