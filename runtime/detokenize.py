"""Incremental detokenisation: text as tokens arrive, linear in the output length.

Each new token is decoded together with the few tokens before it (the window since the last text
was released) and only the text past the window's old text is returned, so a tokenizer that
merges across token boundaries (byte-level BPE, leading-space markers) still gives exactly what
decoding the whole sequence gives. A token that ends inside a multi-byte character decodes to
U+FFFD and is held back until the character is complete.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


class IncrementalDetokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0     # window start: the tokens before the last released text, kept as context
        self._read = 0       # tokens whose text has been released

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _pending(self) -> str:
        """Text of the tokens after `_read`, decoded in the context of the window before them."""
        before = self._decode(self.ids[self._prefix:self._read])
        return self._decode(self.ids[self._prefix:])[len(before):]

    def add(self, token: int) -> str:
        """Append a token; the text it completes ("" while a character is still partial)."""
        self.ids.append(int(token))
        delta = self._pending()
        if not delta or delta.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return delta

    def flush(self) -> str:
        """What is still held back (a partial character decodes as U+FFFD, as a full decode gives)."""
        delta = self._pending()
        self._prefix = self._read = len(self.ids)
        return delta


def first_stop(text: str, stops: list[str], search_from: int) -> int | None:
    """End index (exclusive) of the earliest-ending stop string found at or after `search_from`, or None."""
    ends = [i + len(s) for s in stops if (i := text.find(s, search_from)) >= 0]
    return min(ends) if ends else None
