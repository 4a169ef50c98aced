"""runtime.Generator: the decode loop (prefill, propose, step, verify, commit) over any backend."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from export.checkpoint import check_model_dir
from export.manifest import DEFAULT_MAX_CONTEXT, Manifest
from export.paths import DEFAULT_MODEL_DIR
from runtime.backends import BACKENDS, Backend, engine_method, make_backend
from runtime.draft import Draft
from runtime.methods import METHODS, build_method
from runtime.proposers import Proposer
from runtime.verify import verify_greedy

DEFAULT_MAX_NEW_TOKENS = 128

Prompt = str | Sequence[dict[str, str]] | Sequence[int]


@dataclass
class GenerationStats:
    steps: int = 0                    # forward passes, prefill included
    new_tokens: int = 0
    accepted_tokens: int = 0          # tokens produced by the steps, bonus included, before truncation
    seconds: float = 0.0              # wall time of the whole generation (prefill included)
    forward_seconds: float = 0.0      # time inside backend.step

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


@dataclass
class Result:
    token_ids: list[int]              # new tokens only (EOS included if generated)
    text: str
    stats: GenerationStats = field(default_factory=GenerationStats)


class Generator:
    def __init__(self, backend: Backend, tokenizer: PreTrainedTokenizerBase, proposer: Proposer,
                 eos_token_ids: Sequence[int]) -> None:
        self.backend = backend
        self.tokenizer = tokenizer
        self.proposer = proposer
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path | None = None, method: str = "vanilla", backend: str = "torch",
                        device: str = "cpu", max_context: int = DEFAULT_MAX_CONTEXT, **method_options) -> "Generator":
        """Load a Llama checkpoint dir (default: the SmolLM2 model made by `make model`)."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        if max_context < 2:
            raise ValueError(f"max_context must be at least 2, got {max_context}")
        model_dir = check_model_dir(DEFAULT_MODEL_DIR if model_dir is None else Path(model_dir))
        config = AutoConfig.from_pretrained(model_dir)
        spec = build_method(method, model_dir, config.vocab_size, config.hidden_size, **method_options)
        runner, tokenizer = make_backend(backend, model_dir, spec, device=device, max_context=max_context)
        return cls(runner, tokenizer, spec.proposer, eos_token_ids(tokenizer))

    @classmethod
    def from_engine(cls, engine_dir: str | Path, method: str | None = None, device: str = "cpu",
                    max_context: int | None = None, **method_options) -> "Generator":
        """Load an exported engine dir (manifest.json + model.onnx + tokenizer) on onnxruntime. The
        method defaults to the one it was exported for; vanilla and ngram run on any engine."""
        from runtime.backends.ort_backend import OrtBackend

        manifest = Manifest.load(engine_dir, verify_files=False)  # the backend hashes the graph it runs
        spec = engine_method(manifest, method, **method_options)
        runner = OrtBackend(manifest, device, max_context)
        tokenizer = AutoTokenizer.from_pretrained(manifest.dir)
        return cls(runner, tokenizer, spec.proposer, eos_token_ids(tokenizer))

    # --- prompt handling -------------------------------------------------------------------
    def encode(self, prompt: Prompt) -> list[int]:
        """A string is one user turn; a list of {"role", "content"} dicts is a chat; ints are token ids."""
        if isinstance(prompt, str):
            if not prompt.strip():
                raise ValueError("empty prompt: pass a non-empty string, chat messages or token ids")
            prompt = [{"role": "user", "content": prompt}]
        if len(prompt) == 0:
            raise ValueError("empty prompt: pass a non-empty string, chat messages or token ids")
        if all(isinstance(m, dict) for m in prompt):
            text = self.tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
            return self.tokenizer(text, add_special_tokens=False).input_ids
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
    def run_step(self, draft: Draft, stats: GenerationStats) -> torch.Tensor:
        """One forward pass over `draft` at the current cache length; returns the step output."""
        positions = self.backend.cache.length + draft.buffers.depth
        start = time.perf_counter()
        output = self.backend.step(draft.tokens, positions, draft.buffers.ancestor_mask)
        stats.forward_seconds += time.perf_counter() - start
        stats.steps += 1
        return output

    def decode_steps(self, prompt_ids: list[int], stats: GenerationStats) -> Iterator[list[int]]:
        """Yield the tokens each step produces: prefill, then propose -> step -> verify -> commit."""
        cache = self.backend.cache
        cache.reset()
        draft = self.proposer.prefill_draft(prompt_ids)
        output = self.run_step(draft, stats)
        last = len(prompt_ids) - 1
        root = int(output.logits[last].argmax())
        cache.commit(output.new_keys, output.new_values, list(range(len(prompt_ids))))
        self.proposer.observe(draft, output, last)
        history = list(prompt_ids) + [root]
        yield [root]
        while True:
            draft = self.proposer.propose(history)
            output = self.run_step(draft, stats)
            path, bonus = verify_greedy(draft, output.logits)
            cache.commit(output.new_keys, output.new_values, path)
            self.proposer.observe(draft, output, path[-1])
            new_tokens = [int(draft.tokens[i]) for i in path[1:]] + [bonus]
            history.extend(new_tokens)
            yield new_tokens

    def _token_stream(self, prompt: Prompt, max_new_tokens: int, stats: GenerationStats) -> Iterator[int]:
        """New tokens one by one, ending after EOS or the budget."""
        prompt_ids = self.encode(prompt)
        self.check_budget(len(prompt_ids), max_new_tokens)
        produced = 0
        for tokens in self.decode_steps(prompt_ids, stats):
            stats.accepted_tokens += len(tokens)
            for token in tokens:
                produced += 1
                yield token
                if token in self.eos_token_ids or produced >= max_new_tokens:
                    return

    def stream(self, prompt: Prompt, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
               stop: Sequence[str] | None = None, result: Result | None = None) -> Iterator[str]:
        """Yield text pieces as tokens are accepted. Generation ends at EOS, at the first stop string
        (text through the stop string is returned, nothing after it) or after max_new_tokens.
        Pass a `result` to have it filled with the token ids, full text and stats."""
        result = result if result is not None else Result([], "")
        stats, tokens = result.stats, result.token_ids
        stops = [s for s in (stop or []) if s]
        emitted = ""
        start = time.perf_counter()
        try:
            for token in self._token_stream(prompt, max_new_tokens, stats):
                tokens.append(token)
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                cut = _first_stop(text, stops, search_from=max(0, len(emitted) - max((len(s) for s in stops), default=0)))
                if cut is not None:
                    text = text[:cut]
                if not text.endswith("\ufffd") and len(text) > len(emitted):  # hold back partial UTF-8
                    yield text[len(emitted):]
                    emitted = text
                if cut is not None:
                    break
        finally:
            stats.new_tokens = len(tokens)
            stats.seconds = time.perf_counter() - start
        final = self.tokenizer.decode(tokens, skip_special_tokens=True)
        cut = _first_stop(final, stops, 0)
        result.text = final if cut is None else final[:cut]
        if len(result.text) > len(emitted):
            yield result.text[len(emitted):]

    def generate(self, prompt: Prompt, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 stop: Sequence[str] | None = None) -> Result:
        result = Result([], "")
        for _ in self.stream(prompt, max_new_tokens, stop, result):
            pass
        return result


def _first_stop(text: str, stops: list[str], search_from: int) -> int | None:
    """End index (exclusive) of the earliest stop string in text, or None."""
    ends = [i + len(s) for s in stops if (i := text.find(s, search_from)) >= 0]
    return min(ends) if ends else None


def eos_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    return sorted(ids)
