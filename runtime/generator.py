"""runtime.Generator: the decode loop (prefill, propose, step, verify, commit) over any backend."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoConfig, PreTrainedTokenizerBase

from export.checkpoint import check_model_dir
from export.manifest import DEFAULT_MAX_CONTEXT
from export.methods import method_spec
from export.paths import DEFAULT_MODEL_DIR
from export.quantize import DEFAULT_VARIANT, check_variant, engine_variant
from runtime.backends import DEFAULT_BACKEND, DEFAULT_DTYPE, Backend
from runtime.detokenize import IncrementalDetokenizer, first_stop
from runtime.draft import Draft
from runtime.loading import backend_spec, load_engine, load_pretrained, open_backend
from runtime.methods import build_method, engine_method
from runtime.proposers import Proposer
from runtime.readout import StepReadout, read_step, torch_threads
from runtime.decoding import DecodingOptions
from runtime.verify import Verifier, make_verifier, walk

DEFAULT_MAX_NEW_TOKENS = 128
DEFAULT_METHOD = "vanilla"
DEFAULT_DEVICE = "cpu"

Prompt = str | Sequence[dict[str, str]] | Sequence[int]


@dataclass
class GenerationStats:
    steps: int = 0                    # forward passes, prefill included
    new_tokens: int = 0
    accepted_tokens: int = 0          # tokens produced by the steps, bonus included, before truncation
    seconds: float = 0.0              # wall time of the whole generation (prefill included)
    first_token_seconds: float = 0.0  # wall time until the first new token (the prefill, its step included)
    forward_seconds: float = 0.0      # time inside backend.step + the readout (synchronised)

    @property
    def mean_accepted(self) -> float:
        """Mean tokens produced per forward pass (bonus token included; vanilla = 1.0)."""
        return self.accepted_tokens / self.steps if self.steps else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0

    @property
    def other_seconds(self) -> float:
        return self.seconds - self.forward_seconds


@dataclass(frozen=True)
class DecodeStep:
    """One forward pass of the decode loop, as the loop saw it."""

    tokens: list[int]         # the tokens it produced (accepted candidates + the bonus)
    draft: Draft
    readout: StepReadout
    path: list[int]           # accepted candidate nodes, root first (prefill: the whole prompt)


@dataclass
class Result:
    token_ids: list[int]              # new tokens only (EOS included if generated)
    text: str
    stats: GenerationStats = field(default_factory=GenerationStats)
    seed: int | None = None           # sampling: the seed used (a random one when none was given)


class Generator:
    """Decodes one sequence at a time: a Generator owns its backend's KV cache, so it is
    single-threaded. A second thread calling it while a generation runs gets a RuntimeError (run one
    Generator per worker thread instead). It is a context manager: leaving the `with` block (or
    `close()`) releases the backend's session and cache at once."""

    def __init__(self, backend: Backend, tokenizer: PreTrainedTokenizerBase, proposer: Proposer,
                 eos_token_ids: Sequence[int]) -> None:
        self.backend = backend
        self.tokenizer = tokenizer
        self.proposer = proposer
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self._busy = threading.Lock()

    @classmethod
    def from_pretrained(cls, model_dir: str | Path | None = None, method: str = DEFAULT_METHOD, backend: str = DEFAULT_BACKEND,
                        device: str = DEFAULT_DEVICE, max_context: int = DEFAULT_MAX_CONTEXT, dtype: str = DEFAULT_DTYPE,
                        variant: str = DEFAULT_VARIANT, **method_options) -> "Generator":
        """Load a Llama checkpoint dir (default: the SmolLM2 model made by `make model`); `dtype` (fp32,
        fp16, bf16) is the torch backend's precision (fp16/bf16 for GPUs); `variant` (fp32, int8, int4)
        the onnxruntime engine's weight-only quantization (export/quantize.py), whose searched tree a
        tree method takes by default (else fp32's)."""
        backend_spec(backend)
        method_spec(method)
        check_variant(variant)
        if max_context < 2:
            raise ValueError(f"max_context must be at least 2, got {max_context}")
        model_dir = check_model_dir(DEFAULT_MODEL_DIR if model_dir is None else Path(model_dir))
        config = AutoConfig.from_pretrained(model_dir)
        built = build_method(method, model_dir, config.vocab_size, config.hidden_size, device=device, backend=backend,
                             variant=variant, **method_options)
        runner, tokenizer = load_pretrained(backend, model_dir, built, device=device, max_context=max_context,
                                            dtype=dtype, variant=variant)
        return cls(runner, tokenizer, built.proposer, eos_token_ids(tokenizer))

    @classmethod
    def from_engine(cls, engine_dir: str | Path, method: str | None = None, device: str = DEFAULT_DEVICE,
                    max_context: int | None = None, variant: str | None = None, **method_options) -> "Generator":
        """Load an exported engine dir (manifest.json + model.onnx + tokenizer) on onnxruntime, or, for a
        TensorRT engine dir (engine.json) on device="cuda", on TensorRT (runtime/loading.py). The method
        defaults to the one it was exported for; vanilla and ngram run on any engine. `variant` (fp32,
        int8, int4), when given, must be the one the dir holds (default: whichever it holds); a tree
        method takes the tree installed in the dir, else the one searched for the dir's variant (else
        fp32's)."""
        engine = load_engine(engine_dir, device, max_context, variant)
        # engine_method hands its options to build_method: `variant` picks the variant's searched tree.
        built = engine_method(engine.manifest, method, device=device, variant=engine_variant(engine.manifest),
                              **method_options)
        runner = open_backend(engine.graph, device)
        return cls(runner, engine.tokenizer, built.proposer, eos_token_ids(engine.tokenizer))

    # --- lifetime ----------------------------------------------------------------------------
    def close(self) -> None:
        """Release the backend (its session / engine context and KV cache); later calls are refused."""
        self.backend.close()

    def __enter__(self) -> "Generator":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- prompt handling -------------------------------------------------------------------
    def encode(self, prompt: Prompt) -> list[int]:
        """A string is one user turn through the checkpoint's chat template (the raw text for a model
        without one, e.g. a base model); a list of {"role", "content"} dicts is a chat; ints are token ids."""
        if isinstance(prompt, str):
            if not prompt.strip():
                raise ValueError("empty prompt: pass a non-empty string, chat messages or token ids")
            if self.tokenizer.chat_template is None:
                return self.tokenizer(prompt).input_ids
            prompt = [{"role": "user", "content": prompt}]
        if len(prompt) == 0:
            raise ValueError("empty prompt: pass a non-empty string, chat messages or token ids")
        if any(isinstance(m, dict) for m in prompt):
            messages = check_messages(prompt)
            if self.tokenizer.chat_template is None:
                raise ValueError("this model's tokenizer has no chat template (a base model): pass the prompt as a "
                                 "string (sent as raw text) or as token ids, not as chat messages")
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return self.tokenizer(text, add_special_tokens=False).input_ids
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            bad = next(t for t in prompt if not isinstance(t, int) or isinstance(t, bool))
            raise ValueError(f"a prompt list holds chat messages (dicts) or token ids (ints), not {type(bad).__name__} "
                             f"{bad!r}")
        ids = [int(t) for t in prompt]
        vocab = self.backend.info.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token ids out of range 0..{vocab - 1}: {bad[:5]}")
        return ids

    def check_budget(self, prompt_len: int, max_new_tokens: int) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        need = prompt_len + max_new_tokens + self.proposer.max_draft_tokens
        if need > self.backend.info.max_context:
            raise ValueError(
                f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) + draft "
                f"({self.proposer.max_draft_tokens}) = {need} exceeds max_context {self.backend.info.max_context}; "
                "shorten the prompt, lower max_new_tokens, or load with a larger max_context"
            )

    # --- the decode loop -------------------------------------------------------------------
    def run_step(self, draft: Draft, verifier: Verifier, stats: GenerationStats) -> StepReadout:
        """One forward pass over `draft` at the committed length, and its one readout (which
        synchronises the device, so the timing is the step's)."""
        start = time.perf_counter()
        output = self.backend.step(draft)
        with torch_threads(self.backend.info.readout_threads):
            readout = read_step(output, draft, verifier)
        stats.forward_seconds += time.perf_counter() - start
        stats.steps += 1
        return readout

    def decode_steps(self, prompt_ids: list[int], stats: GenerationStats,
                     verifier: Verifier | None = None) -> Iterator[DecodeStep]:
        """Prefill, then propose -> step -> verify -> commit -> observe, one DecodeStep per pass."""
        verifier = verifier or make_verifier(DecodingOptions())
        self.backend.reset()
        draft = self.proposer.prefill_draft(prompt_ids)
        readout = self.run_step(draft, verifier, stats)
        path = list(range(len(prompt_ids)))
        self.backend.commit(path)
        self.proposer.observe(draft, readout, path)
        history = list(prompt_ids) + [readout.chosen_after(path[-1])]
        yield DecodeStep(history[-1:], draft, readout, path)
        while True:
            draft = self.proposer.propose(history)
            readout = self.run_step(draft, verifier, stats)
            path, bonus = walk(draft, readout.chosen)
            self.backend.commit(path)
            self.proposer.observe(draft, readout, path)
            new_tokens = [int(draft.tokens[i]) for i in path[1:]] + [bonus]
            history.extend(new_tokens)
            yield DecodeStep(new_tokens, draft, readout, path)

    def _token_stream(self, prompt: Prompt, max_new_tokens: int, options: DecodingOptions,
                      stats: GenerationStats) -> Iterator[int]:
        """New tokens one by one, ending after EOS or the budget."""
        prompt_ids = self.encode(prompt)
        self.check_budget(len(prompt_ids), max_new_tokens)
        verifier = make_verifier(options)
        produced = 0
        for step in self.decode_steps(prompt_ids, stats, verifier):
            stats.accepted_tokens += len(step.tokens)
            for token in step.tokens:
                produced += 1
                yield token
                if token in self.eos_token_ids or produced >= max_new_tokens:
                    return

    def stream(self, prompt: Prompt, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
               stop: Sequence[str] | None = None, result: Result | None = None, *,
               temperature: float = DecodingOptions.temperature, top_p: float = DecodingOptions.top_p,
               top_k: int = DecodingOptions.top_k, seed: int | None = DecodingOptions.seed) -> Iterator[str]:
        """Yield text pieces as tokens are accepted. Generation ends at EOS, at the first stop string
        (text through the stop string is returned, nothing after it) or after max_new_tokens.
        temperature 0 (the default) is greedy; otherwise tokens are sampled exactly (for a given seed,
        every method emits the tokens plain sampling emits; no seed: a random one, reported in the
        result). Pass a `result` to have it filled with the token ids, full text, stats and seed."""
        options = DecodingOptions(temperature, top_p, top_k, seed).with_seed()   # refused before any work
        if not self._busy.acquire(blocking=False):
            raise RuntimeError("this Generator is already generating in another thread: a Generator owns one KV "
                               "cache and decodes one sequence at a time; use one Generator per thread")
        try:
            yield from self._stream_text(prompt, max_new_tokens, stop, options, result or Result([], ""))
        finally:
            self._busy.release()

    def _stream_text(self, prompt: Prompt, max_new_tokens: int, stop: Sequence[str] | None,
                     options: DecodingOptions, result: Result) -> Iterator[str]:
        stats, tokens = result.stats, result.token_ids
        result.seed = options.seed
        stops = [s for s in (stop or []) if s]
        longest_stop = max((len(s) for s in stops), default=0)
        detokenizer = IncrementalDetokenizer(self.tokenizer)
        text, emitted = "", 0     # text decoded so far; how much of it was yielded
        start = time.perf_counter()
        try:
            for token in self._token_stream(prompt, max_new_tokens, options, stats):
                tokens.append(token)
                if len(tokens) == 1:
                    stats.first_token_seconds = time.perf_counter() - start
                searched = max(0, len(text) - longest_stop + 1)   # a stop string must end in the new text
                text += detokenizer.add(token)
                cut = first_stop(text, stops, searched)
                if cut is not None:
                    text = text[:cut]
                    break
                if len(text) > emitted:
                    yield text[emitted:]
                    emitted = len(text)
            else:  # EOS or budget: release what was held back as partial UTF-8
                searched = max(0, len(text) - longest_stop + 1)
                text += detokenizer.flush()
                cut = first_stop(text, stops, searched)
                text = text if cut is None else text[:cut]
        finally:
            stats.new_tokens = len(tokens)
            stats.seconds = time.perf_counter() - start
        result.text = text
        if len(text) > emitted:
            yield text[emitted:]

    def generate(self, prompt: Prompt, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 stop: Sequence[str] | None = None, *, temperature: float = DecodingOptions.temperature,
                 top_p: float = DecodingOptions.top_p, top_k: int = DecodingOptions.top_k,
                 seed: int | None = DecodingOptions.seed) -> Result:
        result = Result([], "")
        for _ in self.stream(prompt, max_new_tokens, stop, result, temperature=temperature, top_p=top_p,
                             top_k=top_k, seed=seed):
            pass
        return result


def check_messages(messages: Sequence[object]) -> list[dict[str, str]]:
    """Chat messages as the template takes them, each a dict with a string `role` and a string
    `content`; anything else is refused naming the message and what it lacks (a template would fail
    later with an error about its own internals)."""
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"chat message {i} is a {type(message).__name__}, not a dict: pass every message as "
                             '{"role": ..., "content": ...}')
        missing = [key for key in ("role", "content") if key not in message]
        if missing:
            raise ValueError(f"chat message {i} has no {' and no '.join(repr(k) for k in missing)}: every message "
                             'needs a "role" (e.g. "user") and a "content" string')
        wrong = [key for key in ("role", "content") if not isinstance(message[key], str)]
        if wrong:
            raise ValueError(f"chat message {i}: {', '.join(repr(k) for k in wrong)} must be a string, got "
                             + ", ".join(type(message[k]).__name__ for k in wrong))
        checked.append(dict(message))
    return checked


def eos_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    return sorted(ids)
