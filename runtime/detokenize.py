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


class TextAssembler:
    """A generation's tokens in, its text out: incremental detokenisation and stop strings. Generation
    ends at the first stop string (the text through it is kept, nothing after it); what `add` returns
    may be released to a client at once (a stop string found later cuts only text not yet seen)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: list[str] | tuple[str, ...] | None = None) -> None:
        self.stops = [s for s in (stop or ()) if s]
        self._longest = max((len(s) for s in self.stops), default=0)
        self._detokenizer = IncrementalDetokenizer(tokenizer)
        self.text = ""          # the text so far (cut at a stop string once one is found)
        self.stopped = False    # a stop string ended the text
        self._released = 0

    def add(self, token: int) -> str:
        """Append a token; the new text that may be released ("" while a character is partial)."""
        return self._extend(self._detokenizer.add(token))

    def finish(self) -> str:
        """At EOS or the budget: what was held back as partial UTF-8 (after a stop string: nothing)."""
        return "" if self.stopped else self._extend(self._detokenizer.flush())

    def _extend(self, piece: str) -> str:
        searched = max(0, len(self.text) - self._longest + 1)   # a stop string must end in the new text
        self.text += piece
        cut = first_stop(self.text, self.stops, searched)
        if cut is not None:
            self.text, self.stopped = self.text[:cut], True
        released, self._released = self.text[self._released:], len(self.text)
        return released
