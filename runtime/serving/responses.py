"""OpenAI response bodies and stream chunks for the two routes (chat and text completions).

A stream is `data: <chunk JSON>\\n\\n` events ending in `data: [DONE]`; chat streams open with a
chunk carrying the assistant role, every stream closes its choice with a chunk carrying
`finish_reason`, and `stream_options.include_usage` adds a last chunk with no choices and the usage.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from runtime.serving.jobs import Done

DONE_EVENT = b"data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"


def usage(done: Done) -> dict[str, int]:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


class Shape:
    """One response's id and how its route writes choices: chat puts text in `message` / `delta`,
    completions in `text`."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat, self.model = chat, model
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _envelope(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def response(self, text: str, done: Done) -> dict[str, Any]:
        """The whole non-streamed response (the seed is an extension: it reproduces a sampled call)."""
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": done.finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": done.finish_reason}
        body = self._envelope("chat.completion" if self.chat else "text_completion")
        return body | {"choices": [choice], "usage": usage(done), "seed": done.seed}

    def chunk(self, text: str | None, finish_reason: str | None = None, role: bool = False) -> dict[str, Any]:
        """One stream chunk with a piece of text (or none, to carry the role or the finish reason)."""
        if self.chat:
            delta: dict[str, str] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return self._envelope("chat.completion.chunk" if self.chat else "text_completion") | {"choices": [choice]}

    def usage_chunk(self, done: Done) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return self._envelope(obj) | {"choices": [], "usage": usage(done), "seed": done.seed}
