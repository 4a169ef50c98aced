"""Self-distillation data: ShareGPT contexts cut at random points, continued by the base model's
own greedy decoding, cached per model and data options.

A sample is context + continuation token ids. Only token ids are cached: the teacher
distributions along the continuation come from the teacher-forced pass over the whole sample that
training runs anyway to build the sequence's KV cache (train/ppd.py), so they are exact (full
vocabulary, no top-k truncation), cost no extra forward pass, and the cache stays a few MB.

Sample j of a split depends only on (data_seed, j): conversations are visited in a fixed
shuffled order, and the cut point of conversation c is drawn from rng(data_seed, c). Generation
runs in fixed blocks, so a cache grown from 1,000 to 4,000 samples keeps its first 1,000 as they
were and a smaller run reuses a prefix of a larger cache.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from train.sharegpt import chat_messages
from trees.atomic import atomic_path

CACHE_VERSION = 1


@dataclass(frozen=True)
class DistillOptions:
    """Everything that changes the generated samples (and so the cache key)."""

    max_context_tokens: int      # contexts longer than this keep their last tokens
    continuation_tokens: int     # greedy tokens generated per sample (fewer if EOS comes first)
    data_seed: int               # conversation order and cut points
    generation_batch: int        # sequences per generate() call (batch numerics can flip near-ties)

    @property
    def block(self) -> int:
        # Samples generated together: sorted by length inside a block to limit padding.
        return 4 * self.generation_batch


@dataclass(frozen=True)
class DistillData:
    """Samples as one flat token array. Sample s is tokens[offsets[s]:offsets[s+1]]; its first
    context_lens[s] tokens are the (chat-formatted) context, the rest the greedy continuation."""

    tokens: np.ndarray          # [total] int32
    offsets: np.ndarray         # [n + 1] int64
    context_lens: np.ndarray    # [n] int32
    conversations: np.ndarray   # [n] int64 index into the ShareGPT list
    ends_with_eos: np.ndarray   # [n] bool: the continuation stopped at EOS

    def __len__(self) -> int:
        return int(self.context_lens.shape[0])

    def sample(self, s: int) -> tuple[np.ndarray, int, bool]:
        """(tokens [S] int64, context length, continuation ended with EOS)."""
        seq = self.tokens[self.offsets[s]:self.offsets[s + 1]].astype(np.int64)
        return seq, int(self.context_lens[s]), bool(self.ends_with_eos[s])

    def head(self, n: int) -> "DistillData":
        n = min(n, len(self))
        return DistillData(self.tokens[: self.offsets[n]], self.offsets[: n + 1], self.context_lens[:n],
                           self.conversations[:n], self.ends_with_eos[:n])

    @property
    def continuation_tokens(self) -> int:
        return int((np.diff(self.offsets) - self.context_lens).sum())

    @classmethod
    def empty(cls) -> "DistillData":
        return cls(np.zeros(0, np.int32), np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int64),
                   np.zeros(0, bool))

    @classmethod
    def concat(cls, parts: Sequence["DistillData"]) -> "DistillData":
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty()
        offsets, base = [np.zeros(1, np.int64)], 0
        for p in parts:
            offsets.append(p.offsets[1:] + base)
            base += int(p.offsets[-1])
        return cls(np.concatenate([p.tokens for p in parts]), np.concatenate(offsets),
                   np.concatenate([p.context_lens for p in parts]), np.concatenate([p.conversations for p in parts]),
                   np.concatenate([p.ends_with_eos for p in parts]))

    def save(self, path: Path, meta: dict) -> None:
        with atomic_path(path, suffix=".npz") as tmp:  # the suffix keeps np.savez from appending one
            np.savez(tmp, tokens=self.tokens, offsets=self.offsets, context_lens=self.context_lens,
                     conversations=self.conversations, ends_with_eos=self.ends_with_eos,
                     meta=np.array(json.dumps(meta, sort_keys=True)))

    @classmethod
    def load(cls, path: Path) -> tuple["DistillData", dict]:
        with np.load(path) as z:
            data = cls(z["tokens"], z["offsets"], z["context_lens"], z["conversations"], z["ends_with_eos"])
            return data, json.loads(str(z["meta"]))


def build_context(tokenizer: PreTrainedTokenizerBase, conversation: dict, rng: np.random.Generator,
                  max_context_tokens: int) -> list[int] | None:
    """Chat-formatted conversation up to a random point inside a random assistant turn.

    The turns before the chosen assistant turn go through the chat template (with the generation
    prompt), then the first c tokens of that turn's text follow, c uniform in 0..len-1. A model whose
    tokenizer has no chat template (a base model, prompted with raw text at run time) gets the turns'
    texts one after another, separated by blank lines. None when the conversation has no assistant
    turn after a user turn.
    """
    messages = chat_messages(conversation)
    turns = [t for t, m in enumerate(messages)
             if m["role"] == "assistant" and any(p["role"] == "user" for p in messages[:t])]
    if not turns:
        return None
    turn = turns[int(rng.integers(len(turns)))]
    reply = tokenizer(messages[turn]["content"], add_special_tokens=False).input_ids
    cut = int(rng.integers(len(reply))) if reply else 0
    if tokenizer.chat_template is None:   # raw text, as the runtime prompts a base model (BOS included)
        head = "".join(m["content"] + "\n\n" for m in messages[:turn])
        ids = tokenizer(head).input_ids + reply[:cut]
    else:
        head = tokenizer.apply_chat_template(messages[:turn], tokenize=False, add_generation_prompt=True)
        ids = tokenizer(head, add_special_tokens=False).input_ids + reply[:cut]
    return ids[-max_context_tokens:]


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(int(i) for i in ids))


@torch.inference_mode()
def greedy_continuations(model: PreTrainedModel, contexts: list[list[int]], max_new_tokens: int,
                         eos_ids: list[int], pad_id: int) -> list[list[int]]:
    """One batched, left-padded greedy generate() call; each continuation ends at its first EOS
    (kept) or after max_new_tokens."""
    device = next(model.parameters()).device
    width = max(len(c) for c in contexts)
    input_ids = torch.full((len(contexts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(contexts), width), dtype=torch.long)
    for row, ctx in enumerate(contexts):
        input_ids[row, width - len(ctx):] = torch.tensor(ctx)
        attention[row, width - len(ctx):] = 1
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_ids,
                              pad_token_id=pad_id, bos_token_id=None)
    out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                         generation_config=config)
    new = out[:, width:].tolist()
    eos = set(eos_ids)
    result = []
    for row in new:
        end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        result.append(row[:end])
    return result


def cache_path(cache_dir: Path, fingerprint: str, split: str, options: DistillOptions) -> Path:
    key = json.dumps({"version": CACHE_VERSION, "fingerprint": fingerprint, "split": split, **asdict(options)},
                     sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return Path(cache_dir) / f"ppd-{fingerprint}-{split}-{digest}.npz"


def prepare_samples(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, conversations: list[dict],
                    pool: np.ndarray, count: int, options: DistillOptions, cache_file: Path,
                    desc: str = "distill") -> DistillData:
    """The first `count` samples of `pool` (conversation indices), generating only those the
    cache does not hold yet; the cache is rewritten after every block, so an interrupted run
    resumes where it stopped."""
    meta = {"version": CACHE_VERSION, **asdict(options)}
    data = DistillData.empty()
    if cache_file.is_file():
        data, cached_meta = DistillData.load(cache_file)
        if cached_meta.get("options") != meta:  # a hash collision or a hand-copied file: start over
            data = DistillData.empty()
    if len(data) >= count:
        return data.head(count)
    order = np.random.default_rng(options.data_seed).permutation(pool)
    # Resume the walk over `order` after the last conversation already cached.
    start = 0 if not len(data) else int(np.flatnonzero(order == data.conversations[-1])[0]) + 1
    eos_ids = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=count, initial=len(data), desc=desc, unit="sample", dynamic_ncols=True)
    pos = start
    while len(data) < count and pos < len(order):
        block_conv, block_ctx = [], []
        while len(block_conv) < options.block and pos < len(order):
            conv = int(order[pos])
            pos += 1
            ctx = build_context(tokenizer, conversations[conv], np.random.default_rng([options.data_seed, conv]),
                                options.max_context_tokens)
            if ctx:
                block_conv.append(conv)
                block_ctx.append(ctx)
        by_length = sorted(range(len(block_ctx)), key=lambda i: -len(block_ctx[i]))
        continuations: dict[int, list[int]] = {}
        for b in range(0, len(by_length), options.generation_batch):
            batch = by_length[b: b + options.generation_batch]
            for i, cont in zip(batch, greedy_continuations(model, [block_ctx[i] for i in batch],
                                                           options.continuation_tokens, eos_ids, pad_id)):
                continuations[i] = cont
            bar.update(min(len(batch), max(0, count - bar.n)))
        seqs = [block_ctx[i] + continuations[i] for i in range(len(block_ctx))]
        lengths = np.array([len(s) for s in seqs], dtype=np.int64)
        block = DistillData(
            tokens=np.concatenate([np.asarray(s, dtype=np.int32) for s in seqs]),
            offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            context_lens=np.array([len(c) for c in block_ctx], dtype=np.int32),
            conversations=np.array(block_conv, dtype=np.int64),
            ends_with_eos=np.array([bool(continuations[i]) and continuations[i][-1] in eos_ids
                                    for i in range(len(block_ctx))], dtype=bool),
        )
        data = DistillData.concat([data, block])
        data.save(cache_file, {"options": meta})
    bar.close()
    return data.head(count)
