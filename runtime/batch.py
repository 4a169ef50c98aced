"""runtime.BatchGenerator: many requests decoded together, each exactly as it would be decoded alone.

    submit(prompt, method=..., max_new_tokens, stop, temperature, top_p, top_k, seed) -> BatchRequest
    step()     one round of the scheduler:
                 1. drop the requests cancelled since the last round (their cache cells are freed)
                 2. admit waiting requests while fewer than max_batch run (each opens a cache sequence)
                 3. one forward pass over a draft per running request: the next chunk of a newcomer's
                    prompt (at most `prefill_chunk` prompt tokens per step for all newcomers together,
                    so admitting one stalls the others by about one step), or the request's own
                    method's tree (runtime/proposers: each request has its own proposer state)
                 4. per request: verify with its own decoding options (its own seed), commit the
                    accepted nodes, emit the new tokens as text, and retire it at EOS, its budget or a
                    stop string
    run()      steps until every submitted request is done

Requests join and leave between steps (continuous batching, as vLLM's scheduler). The backend packs
the drafts into one step where each node sees only its own sequence (runtime/backends/packing.py),
so a request's tokens do not depend on which others share its steps: greedy, every method emits
plain greedy decoding's tokens, and under sampling (keyed by seed and position, runtime/sampling.py)
plain sampling's, whatever the batch. One thread drives it; submit() and cancel() may come from others.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from export.manifest import DEFAULT_MAX_CONTEXT
from export.paths import DEFAULT_MODEL_DIR
from runtime.backends import DEFAULT_BACKEND, BatchBackend
from runtime.decoding import DecodingOptions
from runtime.detokenize import TextAssembler
from runtime.draft import Draft
from runtime.loading import StaticSteps
from runtime.generator import DEFAULT_MAX_NEW_TOKENS, Result, eos_token_ids
from runtime.methods import Method
from runtime.prompting import Prompt, check_budget, encode_prompt
from runtime.proposers import Proposer
from runtime.readout import read_step, torch_threads
from runtime.verify import Verifier, make_verifier, walk

DEFAULT_MAX_BATCH = 8
# Prompt tokens one step prefills for all newcomers together: a newcomer's prefill costs the running
# requests about one step of this many extra rows.
DEFAULT_PREFILL_CHUNK = 128

WAITING, RUNNING, DONE, CANCELLED = "waiting", "running", "done", "cancelled"


@dataclass(eq=False)
class BatchRequest:
    """One request's state: what it asked for, what it produced so far (`result`), and its text pieces
    not yet taken (`take_text`). `on_text` is called with each new piece on the scheduler's thread."""

    id: int
    prompt_ids: list[int]
    method: str
    options: DecodingOptions
    max_new_tokens: int
    stop: tuple[str, ...]
    result: Result
    on_text: Callable[[str], None] | None = None
    state: str = WAITING
    finish_reason: str | None = None       # "stop" (EOS or a stop string) or "length" (the budget)
    # --- the scheduler's (set on admission) ---
    slot: int | None = None
    proposer: Proposer | None = None
    verifier: Verifier | None = None
    history: list[int] = field(default_factory=list)
    prefilled: int = 0                     # prompt tokens committed
    text: TextAssembler | None = None
    pending: list[str] = field(default_factory=list)
    started: float = 0.0
    _cancel: threading.Event = field(default_factory=threading.Event)

    @property
    def done(self) -> bool:
        return self.state in (DONE, CANCELLED)

    def cancel(self) -> None:
        """Stop the request before the next step; its cache cells are freed then (thread-safe)."""
        self._cancel.set()

    def take_text(self) -> str:
        """The text produced since the last call."""
        pieces, self.pending = self.pending, []
        return "".join(pieces)


class BatchGenerator:
    """Decodes up to `max_batch` requests in each forward pass of one backend (a BatchBackend with a
    cache of at least max_batch sequences). `methods`: the built methods requests may ask for by name
    (their trained tensors must be the ones the backend's graph holds); the first is the default."""

    def __init__(self, backend: BatchBackend, tokenizer: PreTrainedTokenizerBase, methods: Mapping[str, Method],
                 eos_token_ids: Sequence[int], max_batch: int = DEFAULT_MAX_BATCH,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> None:
        if not methods:
            raise ValueError("a BatchGenerator needs at least one method")
        if max_batch < 1 or max_batch > backend.info.max_batch:
            raise ValueError(f"max_batch must be 1..{backend.info.max_batch} (the sequences the backend's cache "
                             f"was allocated for), got {max_batch}")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.backend, self.tokenizer, self.methods = backend, tokenizer, dict(methods)
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        self._waiting: deque[BatchRequest] = deque()
        self._running: list[BatchRequest] = []
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self.steps = 0

    # --- loading ---------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model_dir: str | Path | None = None, methods: Sequence[str] = ("vanilla",),
                        backend: str = DEFAULT_BACKEND, device: str = "cpu", max_context: int = DEFAULT_MAX_CONTEXT,
                        max_batch: int = DEFAULT_MAX_BATCH, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                        **load_options) -> "BatchGenerator":
        """A checkpoint dir (as Generator.from_pretrained) with every method in `methods` available; they
        must share one graph (vanilla and ngram on any; ppd and hybrid together). `load_options`: the
        backend's `dtype`, `variant`, `threads` (its compute threads) and `static_steps`, and the methods'
        options."""
        from runtime.batch_loading import load_batch_pretrained

        runner, tokenizer, built = load_batch_pretrained(
            DEFAULT_MODEL_DIR if model_dir is None else model_dir, methods, backend, device, max_context, max_batch,
            **load_options)
        return cls(runner, tokenizer, built, eos_token_ids(tokenizer), max_batch, prefill_chunk)

    @classmethod
    def from_engine(cls, engine_dir: str | Path, methods: Sequence[str] | None = None, device: str = "cpu",
                    max_context: int | None = None, max_batch: int = DEFAULT_MAX_BATCH,
                    prefill_chunk: int = DEFAULT_PREFILL_CHUNK, threads: int | None = None,
                    static_steps: StaticSteps = None) -> "BatchGenerator":
        """An exported engine dir (as Generator.from_engine): `methods` default to the one it was exported
        for and the untrained ones (vanilla, ngram) it also serves; `threads`: onnxruntime's intra-op
        threads (None: one per core)."""
        from runtime.batch_loading import load_batch_engine

        runner, tokenizer, built = load_batch_engine(engine_dir, methods, device, max_context, max_batch, threads,
                                                     static_steps)
        return cls(runner, tokenizer, built, eos_token_ids(tokenizer), max_batch, prefill_chunk)

    # --- requests --------------------------------------------------------------------------------------
    def submit(self, prompt: Prompt, method: str | None = None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
               stop: Sequence[str] | None = None, *, temperature: float = DecodingOptions.temperature,
               top_p: float = DecodingOptions.top_p, top_k: int = DecodingOptions.top_k,
               seed: int | None = DecodingOptions.seed, on_text: Callable[[str], None] | None = None) -> BatchRequest:
        """Queue a request; it joins the batch at the next step with a free place. Bad prompts, options,
        methods and budgets are refused here, before it is queued."""
        name = next(iter(self.methods)) if method is None else method
        if name not in self.methods:
            raise ValueError(f"method {name!r} is not loaded in this BatchGenerator; it has {', '.join(self.methods)}")
        options = DecodingOptions(temperature, top_p, top_k, seed).with_seed()
        info = self.backend.info
        prompt_ids = encode_prompt(self.tokenizer, prompt, info.vocab_size)
        check_budget(len(prompt_ids), max_new_tokens, self.methods[name].proposer.max_draft_tokens, info.max_context)
        request = BatchRequest(next(self._ids), prompt_ids, name, options, max_new_tokens, tuple(stop or ()),
                               Result([], "", seed=options.seed), on_text)
        with self._lock:
            self._waiting.append(request)
        return request

    @property
    def max_draft_tokens(self) -> int:
        """The largest draft any loaded method makes (what a budget check reserves beyond the text)."""
        return max(method.proposer.max_draft_tokens for method in self.methods.values())

    @property
    def running(self) -> int:
        """Requests in the batch now (the rest of `active` wait for a place)."""
        with self._lock:
            return len(self._running)

    @property
    def active(self) -> int:
        """Requests running or waiting."""
        with self._lock:
            return len(self._running) + len(self._waiting)

    def run(self) -> None:
        """Step until every submitted request is done."""
        while self.step():
            pass

    def stream(self, request: BatchRequest) -> Iterator[str]:
        """`request`'s text pieces as they come, stepping the whole batch meanwhile (one thread)."""
        while True:
            piece = request.take_text()
            if piece:
                yield piece
            if request.done:
                return
            self.step()

    # --- the scheduler ---------------------------------------------------------------------------------
    def step(self) -> bool:
        """One round (see the module's docstring). False when there was nothing to run."""
        self.drop_cancelled()
        self._admit()
        if not self._running:
            return False
        work, prompt_budget = [], self.prefill_chunk   # prompt tokens this step may prefill (newcomers in order)
        room = self.backend.info.max_step_tokens or float("inf")   # nodes one step holds (static steps)
        for request in self._running:
            draft, kind = self._draft(request, min(prompt_budget, room))
            if draft is None or draft.size > room:
                continue   # it waits for the next step
            if kind != "decode":
                prompt_budget -= draft.layout.first_verified + 1
            room -= draft.size
            work.append((request, draft, kind))
        if not work:
            raise ValueError(f"no running request's draft fits one step of at most {room} nodes: use a smaller tree "
                             "or an engine with larger steps")
        outputs = self.backend.step_batch([(request.slot, draft) for request, draft, _ in work])
        self.steps += 1
        accepted = []
        with torch_threads(self.backend.info.readout_threads):
            for (request, draft, kind), output in zip(work, outputs):
                accepted.append((request.slot, self._advance(request, draft, kind, output)))
        self.backend.commit_batch(accepted)
        for request in [r for r in self._running if r.finish_reason is not None]:
            self._retire(request, DONE)
        return True

    def drop_cancelled(self) -> None:
        """Forget the requests cancelled since the last step: their sequences closed, cells freed."""
        with self._lock:
            for request in [r for r in self._waiting if r._cancel.is_set()]:
                self._waiting.remove(request)
                request.state = CANCELLED
        for request in [r for r in self._running if r._cancel.is_set()]:
            self._retire(request, CANCELLED)

    def _admit(self) -> None:
        with self._lock:
            while self._waiting and len(self._running) < self.max_batch:
                request = self._waiting.popleft()
                request.slot = self.backend.open_sequence()
                request.proposer = self.methods[request.method].proposer.new_sequence()
                request.verifier = make_verifier(request.options)
                request.text = TextAssembler(self.tokenizer, request.stop)
                request.state, request.started = RUNNING, time.perf_counter()
                self._running.append(request)

    def _draft(self, request: BatchRequest, budget: float) -> tuple[Draft | None, str]:
        """The request's draft this step: ("chunk") a part of its prompt, ("prefill") the prompt's last
        part with what its method attaches to it, ("decode") its method's tree; None ("wait") when the
        step has no room for any of its prompt (`budget`: the prompt tokens and nodes left this step)."""
        remaining = len(request.prompt_ids) - request.prefilled
        if remaining == 0:
            # the tree for this many sequences per step (a tree file searched for batches: smaller as B grows)
            return request.proposer.propose(request.history, len(self._running)), "decode"
        budget = int(min(budget, remaining))
        if budget < 1:
            return None, "wait"
        rest = request.prompt_ids[request.prefilled:]
        if remaining <= budget:   # the rest, with what the method attaches (a step without room for it: wait)
            return request.proposer.prefill_draft(rest, len(self._running)), "prefill"
        return Draft.prefill(rest[:budget]), "chunk"

    def _advance(self, request: BatchRequest, draft: Draft, kind: str, output) -> list[int]:
        """Verify and emit one request's step; the nodes to commit."""
        stats = request.result.stats
        stats.steps += 1
        if kind == "chunk":
            request.prefilled += draft.size
            return list(range(draft.size))   # its choice is not read: the next chunk continues the prompt
        readout = read_step(output, draft, request.verifier)
        if kind == "prefill":
            n = len(request.prompt_ids) - request.prefilled
            path = list(range(n))
            request.prefilled += n
            request.history = list(request.prompt_ids)
            tokens = [readout.chosen_after(path[-1])]
        else:
            path, bonus = walk(draft, readout.chosen)
            tokens = [int(draft.tokens[i]) for i in path[1:]] + [bonus]
        request.proposer.observe(draft, readout, path)
        request.history.extend(tokens)
        stats.accepted_tokens += len(tokens)
        self._emit(request, tokens)
        return path

    def _emit(self, request: BatchRequest, tokens: list[int]) -> None:
        result = request.result
        for token in tokens:
            result.token_ids.append(token)
            if len(result.token_ids) == 1:
                result.stats.first_token_seconds = time.perf_counter() - request.started
            piece = request.text.add(token)
            if piece:
                self._deliver(request, piece)
            if request.text.stopped:
                request.finish_reason = "stop"
                break
            if token in self.eos_token_ids or len(result.token_ids) >= request.max_new_tokens:
                request.finish_reason = "stop" if token in self.eos_token_ids else "length"
                if piece := request.text.finish():
                    self._deliver(request, piece)
                break
        result.text = request.text.text

    def _deliver(self, request: BatchRequest, piece: str) -> None:
        request.pending.append(piece)
        if request.on_text is not None:
            request.on_text(piece)

    def _retire(self, request: BatchRequest, state: str) -> None:
        self.backend.close_sequence(request.slot)
        self._running.remove(request)
        stats = request.result.stats
        stats.new_tokens = len(request.result.token_ids)
        stats.seconds = time.perf_counter() - request.started
        request.state = state

    # --- lifetime ------------------------------------------------------------------------------------
    def close(self) -> None:
        """Release the backend (its session and cache); queued and running requests are dropped."""
        self.backend.close()

    def __enter__(self) -> "BatchGenerator":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
