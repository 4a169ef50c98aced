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
from runtime.detokenize import TextAssembler
from runtime.draft import Draft
from runtime.loading import StaticSteps, backend_spec, device_step_sizes, load_engine, load_pretrained, open_backend
from runtime.methods import build_method, engine_method
from runtime.prompting import Prompt, check_budget, encode_prompt
from runtime.proposers import Proposer
from runtime.proposers.base import prefill_drafts
from runtime.readout import StepReadout, read_step, torch_threads
from runtime.decoding import DecodingOptions
from runtime.verify import Verifier, make_verifier, walk

DEFAULT_MAX_NEW_TOKENS = 128
DEFAULT_METHOD = "vanilla"
DEFAULT_DEVICE = "cpu"



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
                        variant: str = DEFAULT_VARIANT, static_steps: StaticSteps = None,
                        **method_options) -> "Generator":
        """Load a checkpoint dir of a supported family (default: the SmolLM2 model made by `make model`);
        `dtype` (fp32, fp16, bf16) is the torch backend's precision (fp16/bf16 for GPUs); `variant` (fp32,
        int8, int4) the onnxruntime engine's weight-only quantization (export/quantize.py), whose searched
        tree a tree method takes by default (else fp32's); `static_steps`: every step padded to a few static
        shapes over the whole cache (default: on CUDA, where each is captured as a CUDA graph)."""
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
                                            dtype=dtype, variant=variant, static_steps=static_steps)
        return cls(runner, tokenizer, built.proposer, eos_token_ids(tokenizer))

    @classmethod
    def from_engine(cls, engine_dir: str | Path, method: str | None = None, device: str = DEFAULT_DEVICE,
                    max_context: int | None = None, variant: str | None = None, static_steps: StaticSteps = None,
                    **method_options) -> "Generator":
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
        runner = open_backend(engine.graph, device,
                              step_sizes=device_step_sizes(device, built.proposer.max_draft_tokens, 1, static_steps))
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
        return encode_prompt(self.tokenizer, prompt, self.backend.info.vocab_size)

    def check_budget(self, prompt_len: int, max_new_tokens: int) -> None:
        check_budget(prompt_len, max_new_tokens, self.proposer.max_draft_tokens, self.backend.info.max_context)

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
        # One prefill step, or chunks that fit an engine of static steps (runtime/backends/base.py ModelInfo).
        for draft, last in prefill_drafts(prompt_ids, self.proposer, self.backend.info.max_step_tokens):
            readout = self.run_step(draft, verifier, stats)
            path = list(range(draft.layout.first_verified + 1))   # the chunk's prompt nodes
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
        text = TextAssembler(self.tokenizer, stop)
        start = time.perf_counter()
        try:
            for token in self._token_stream(prompt, max_new_tokens, options, stats):
                tokens.append(token)
                if len(tokens) == 1:
                    stats.first_token_seconds = time.perf_counter() - start
                piece = text.add(token)
                result.text = text.text
                if piece:
                    yield piece
                if text.stopped:
                    return
            piece = text.finish()   # EOS or budget: release what was held back as partial UTF-8
            result.text = text.text
            if piece:
                yield piece
        finally:
            stats.new_tokens = len(tokens)
            stats.seconds = time.perf_counter() - start

    def generate(self, prompt: Prompt, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 stop: Sequence[str] | None = None, *, temperature: float = DecodingOptions.temperature,
                 top_p: float = DecodingOptions.top_p, top_k: int = DecodingOptions.top_k,
                 seed: int | None = DecodingOptions.seed) -> Result:
        result = Result([], "")
        for _ in self.stream(prompt, max_new_tokens, stop, result, temperature=temperature, top_p=top_p,
                             top_k=top_k, seed=seed):
            pass
        return result


def eos_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    return sorted(ids)
