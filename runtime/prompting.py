"""What a prompt may be, how it becomes token ids, and whether it fits: one home for both generators
(runtime.Generator, runtime.BatchGenerator) and the server's request preparation.

    a string            one user turn through the checkpoint's chat template, or the raw text for a
                        model without one (a base model)
    chat messages       [{"role": ..., "content": ...}] through the chat template
    token ids           as they are (each checked against the vocabulary)
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

Prompt = str | Sequence[dict[str, str]] | Sequence[int]


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Prompt, vocab_size: int) -> list[int]:
    """The prompt's token ids; ValueError naming what is wrong with it."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError("empty prompt: pass a non-empty string, chat messages or token ids")
        if tokenizer.chat_template is None:
            return tokenizer(prompt).input_ids
        prompt = [{"role": "user", "content": prompt}]
    if len(prompt) == 0:
        raise ValueError("empty prompt: pass a non-empty string, chat messages or token ids")
    if any(isinstance(m, dict) for m in prompt):
        messages = check_messages(prompt)
        if tokenizer.chat_template is None:
            raise ValueError("this model's tokenizer has no chat template (a base model): pass the prompt as a "
                             "string (sent as raw text) or as token ids, not as chat messages")
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False).input_ids
    bad = next((t for t in prompt if not isinstance(t, int) or isinstance(t, bool)), None)
    if bad is not None:
        raise ValueError(f"a prompt list holds chat messages (dicts) or token ids (ints), not {type(bad).__name__} "
                         f"{bad!r}")
    ids = [int(t) for t in prompt]
    out_of_range = [t for t in ids if not 0 <= t < vocab_size]
    if out_of_range:
        raise ValueError(f"token ids out of range 0..{vocab_size - 1}: {out_of_range[:5]}")
    return ids


def prompt_text(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """The text Generator.encode tokenizes for a string prompt: one user turn in the chat template, or for a
    base model the raw text after the BOS its tokenizer adds (encode_prompt above). (The llama.cpp check
    compares its ids of this text with Generator.encode's, so a drift here fails loudly.)"""
    if tokenizer.chat_template is None:
        bos = tokenizer.bos_token if tokenizer(prompt).input_ids[:1] == [tokenizer.bos_token_id] else ""
        return (bos or "") + prompt
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


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


def check_budget(prompt_len: int, max_new_tokens: int, draft_tokens: int, max_context: int) -> None:
    """Refuse a generation whose prompt, new tokens and largest draft exceed the context, before any work."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    need = prompt_len + max_new_tokens + draft_tokens
    if need > max_context:
        raise ValueError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) + draft ({draft_tokens}) = {need} "
            f"exceeds max_context {max_context}; shorten the prompt, lower max_new_tokens, or load with a larger "
            "max_context")
