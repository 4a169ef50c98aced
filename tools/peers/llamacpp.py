"""The `llamacpp` peer for the bench: llama.cpp greedy decoding of the same model, on the same prompt
token ids, token budget, stop token and thread count as our engine.

One generation is llama.cpp's plain decode loop, with no Python sampling or cache tricks around it:

    clear the KV cache -> llama_decode(prompt ids, in n_batch chunks)
    loop: token = greedy sampler (argmax of the last logits) -> stop at our EOS or the budget
          -> llama_decode([token])

so a generation of n tokens costs n forward passes, the prefill included. The GGUF files (f32, q8_0,
q4_1) come from tools/peers/llamacpp_gguf.py. Before timing anything the bench checks that llama.cpp's own
tokenizer turns each prompt text into exactly our ids (TokenizationMismatch otherwise).

Optional: needs llama-cpp-python, built once from its source package by `make peers`.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

from tools.bench.runs import PromptRun
from tools.peers.llamacpp_gguf import ensure_gguf, require_llama_cpp

# Largest prompt chunk one llama_decode call takes (llama.cpp's default n_batch).
MAX_BATCH = 512


class TokenizationMismatch(ValueError):
    """llama.cpp's tokenizer and ours disagree on a prompt: the peer would not decode the same input."""


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def wait_policy() -> str:
    """How llama.cpp's OpenMP threads wait between parallel regions. They share the process's libgomp with
    torch (loaded first, so OMP_WAIT_POLICY counts only when exported before the process starts). The
    default spins a while: llama.cpp's ordinary setting, and the faster one (16 tokens of the f32 GGUF on
    2 threads beside one other process: 0.21 s spinning, 0.49 s PASSIVE). Spinning collapses when other
    processes hold the cores (55 s for those 16 tokens at nice 10): bench on a quiet machine."""
    return os.environ.get("OMP_WAIT_POLICY", "libgomp default (spin, then sleep)")


def onnxruntime_threads() -> int:
    """The intra-op thread count of our onnxruntime sessions. OrtOptions leaves it unset, so onnxruntime
    picks one thread per physical core (hyperthread siblings count once); the peer is given the same
    number explicitly (llama-cpp-python's own default is half the logical CPUs). A test checks this
    against the worker threads a real onnxruntime session starts."""
    cpus = sorted(os.sched_getaffinity(0))
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(),
                       (topology / "core_id").read_text().strip()))
        except OSError:  # no sysfs topology (some containers): every CPU is a core
            return len(cpus)
    return max(1, len(cores))


# A GGUF of another model tokenizes differently from the first ids on; the same model's GGUF can still
# merge a run of whitespace differently deep inside a prompt (measured: 5 of the first 20 HumanEval
# prompts, first difference at ids 79-142, "    " + digit). The peer decodes our ids either way.
EARLY_IDS = 32


def check_tokenization(tokenize: Callable[[str], Sequence[int]], texts: Sequence[str], ours: Sequence[Sequence[int]],
                       names: Sequence[str] | None = None, early: int = EARLY_IDS) -> list[str]:
    """Compare llama.cpp's tokenization of each prompt with our ids (the peer is always fed our ids, so
    this checks that the GGUF is of the same model). Raise TokenizationMismatch, listing every
    difference, when a prompt differs within its first `early` ids or half the prompts or more differ;
    return the later differences otherwise (empty when all agree).
    tokenize: text -> llama.cpp's ids (special tokens parsed, no BOS added: the chat template has its own)."""
    names = list(names) if names is not None else [str(i) for i in range(len(texts))]
    problems, first_at = [], []
    for name, text, want in zip(names, texts, ours):
        have = list(tokenize(text))
        if have != list(want):
            at = next((i for i, (a, b) in enumerate(zip(have, want)) if a != b), min(len(have), len(want)))
            first_at.append(at)
            problems.append(f"prompt {name}: first difference at position {at}: llama.cpp {have[at:at + 5]} "
                            f"vs ours {list(want[at:at + 5])} ({len(have)} vs {len(want)} ids)")
    if problems and (min(first_at) < early or 2 * len(problems) >= len(texts)):
        raise TokenizationMismatch("llama.cpp tokenizes the prompts differently from our tokenizer, so it would "
                                   "not decode the same input (is the GGUF of another model?):\n  "
                                   + "\n  ".join(problems))
    return problems


class PeerGeneration(NamedTuple):
    tokens: list[int]
    seconds: float              # the whole generation, prefill included
    first_token_seconds: float  # until the first new token was sampled (the prefill)


class LlamaCppPeer:
    """One llama.cpp model and context: greedy generation from token ids. Single-threaded, like a Generator."""

    def __init__(self, gguf_path: str | Path, threads: int, max_context: int, eos_token_ids: Iterable[int]) -> None:
        llama_cpp = require_llama_cpp()
        self._lib = llama_cpp
        self.gguf_path = Path(gguf_path)
        self.threads = threads
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        batch = min(MAX_BATCH, max_context)
        self.llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=max_context, n_batch=batch, n_ubatch=batch,
                                   n_threads=threads, n_threads_batch=threads, verbose=False)
        self._batch = batch
        self._sampler = llama_cpp.llama_sampler_init_greedy()  # freed by close()

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int) -> PeerGeneration:
        """prompt ids -> new token ids and their timing: greedy, ends after one of our EOS ids or max_new_tokens."""
        if len(prompt_ids) + max_new_tokens > self.llm.n_ctx():
            raise ValueError(f"prompt ({len(prompt_ids)}) + {max_new_tokens} new tokens exceed the llama.cpp "
                             f"context of {self.llm.n_ctx()}")
        lib, ctx = self._lib, self.llm.ctx
        lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
        tokens: list[int] = []
        first_token_seconds = 0.0
        start = time.perf_counter()
        for i in range(0, len(prompt_ids), self._batch):
            self._decode(prompt_ids[i:i + self._batch])
        while True:
            token = int(lib.llama_sampler_sample(self._sampler, ctx, -1))  # argmax of the last logits
            tokens.append(token)
            if len(tokens) == 1:
                first_token_seconds = time.perf_counter() - start
            if token in self.eos_token_ids or len(tokens) >= max_new_tokens:
                break
            self._decode([token])
        return PeerGeneration(tokens, time.perf_counter() - start, first_token_seconds)

    def _decode(self, ids: Sequence[int]) -> None:
        lib = self._lib
        array = (lib.llama_token * len(ids))(*ids)
        status = lib.llama_decode(self.llm.ctx, lib.llama_batch_get_one(array, len(ids)))
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status} on {len(ids)} tokens ({self.gguf_path.name})")

    def close(self) -> None:
        if self._sampler is not None:
            self._lib.llama_sampler_free(self._sampler)
            self._sampler = None
            self.llm.close()


class BenchRunner:
    """llama.cpp greedy on one GGUF type of the model, with our thread count, context and EOS ids (what
    the bench runs in the peer's process: tools/peers/process.py)."""

    def __init__(self, peer: LlamaCppPeer, max_new_tokens: int) -> None:
        self.peer, self.max_new_tokens = peer, max_new_tokens

    def check_prompts(self, texts: list[str], encoded: list[list[int]], names: list[str]) -> list[str]:
        """check_tokenization on llama.cpp's own tokenizer: the later differences (raises on early ones)."""
        return check_tokenization(self.peer.tokenize, texts, encoded, names)

    def gguf_path(self) -> str:
        return str(self.peer.gguf_path)

    def __call__(self, prompt_ids: list[int]) -> PromptRun:
        out = self.peer.generate(prompt_ids, self.max_new_tokens)
        # one token per forward, the prefill's included
        return PromptRun(out.tokens, len(out.tokens), out.seconds, first_token_seconds=out.first_token_seconds)


def bench_runner(model_dir: str, gguf_type: str, threads: int, max_context: int, eos_token_ids: Iterable[int],
                 max_new_tokens: int) -> BenchRunner:
    """The GGUF of `gguf_type` (converted once, tools/peers/llamacpp_gguf.py) loaded in llama.cpp."""
    path = ensure_gguf(model_dir, gguf_type, threads)
    return BenchRunner(LlamaCppPeer(path, threads, max_context, eos_token_ids), max_new_tokens)
