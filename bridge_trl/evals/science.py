"""Science: GPQA-Diamond (198 graduate-level multiple-choice questions) from a local csv or jsonl.

The file has GPQA's published columns (`Question`, `Correct Answer`, `Incorrect Answer 1..3`, optionally
`Record ID`). The four options are shuffled with a seed derived from the question itself, so the order is fixed
across runs, models and machines, and the gold letter is not always A. The answer letter is read from the
response by `extract_letter`; accuracy is the share of responses whose letter is the gold one.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import re
from pathlib import Path

from .runner import Benchmark

LETTERS = "ABCD"
GPQA_FIELDS = ("Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")
GPQA_HINT = (
    "GPQA is gated: accept its terms at https://huggingface.co/datasets/Idavidrein/gpqa and download "
    "gpqa_diamond.csv (or take it from dataset.zip in https://github.com/idavidrein/gpqa, password in its "
    "README); pass --source gpqa_diamond=FILE or put it at <data_dir>/gpqa_diamond/test.csv"
)
PROMPT = (
    "Answer the following multiple choice question. The last line of your response should be of the following "
    "format: 'Answer: $LETTER' (without quotes) where LETTER is one of ABCD. Think step by step before "
    "answering.\n\n{question}\n\nA) {A}\nB) {B}\nC) {C}\nD) {D}"
)


def shuffle_options(row: dict, key: str) -> tuple[list[str], str]:
    """(the four options in their shuffled order, the gold letter); the order depends on `key` alone."""
    options = [
        row["Correct Answer"],
        row["Incorrect Answer 1"],
        row["Incorrect Answer 2"],
        row["Incorrect Answer 3"],
    ]
    order = list(range(4))
    # sha256, not hash(): str hashes are salted per process, and the order must be the same everywhere.
    random.Random(int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")).shuffle(order)
    return [options[i].strip() for i in order], LETTERS[order.index(0)]


def _rows(path: Path) -> list[dict]:
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_gpqa(path: str | Path, limit: int | None = None) -> list[dict]:
    """GPQA questions with `question`, `options` (shuffled), `gold` (a letter) and `record_id`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found. {GPQA_HINT}.")
    problems = []
    for index, row in enumerate(_rows(path)):
        if limit is not None and index >= limit:
            break
        missing = [k for k in GPQA_FIELDS if not str(row.get(k) or "").strip()]
        if missing:
            raise ValueError(
                f"{path} row {index}: missing or empty {missing} (GPQA columns: {list(GPQA_FIELDS)})."
            )
        key = str(row.get("Record ID") or row["Question"])
        options, gold = shuffle_options(row, key)
        problems.append({"index": index, "record_id": row.get("Record ID"), "question": row["Question"].strip(),
                         "options": options, "gold": gold, "domain": row.get("High-level domain")})  # fmt: skip
    return problems


def gpqa_prompt(problem: dict) -> list[dict]:
    content = PROMPT.format(
        question=problem["question"], **dict(zip(LETTERS, problem["options"], strict=True))
    )
    return [{"role": "user", "content": content}]


# Strongest evidence first; within a pattern the last match wins (a response may restate the options first).
# Letters are matched in capitals only: "to answer a question" must not read as A.
_LETTER = r"\(?\**\s*([A-D])\s*\**\)?"
_PATTERNS = [
    re.compile(rf"(?i:answer)\s*(?:(?i:is)|:)?\s*[:：]?\s*\**\s*(?:(?i:option)\s*)?{_LETTER}(?![A-Za-z])"),
    re.compile(r"\\boxed\{\s*(?:\\text\{)?\s*([A-D])\s*\}?\s*\}"),
    re.compile(r"(?i:option|choice)\s+\(?([A-D])\)?(?![A-Za-z])"),
    re.compile(r"^\s*\(?([A-D])[).:]?\s*$", re.M),
]


def extract_letter(text: str, options: list[str] | None = None) -> str | None:
    """The answer letter of a response: 'Answer: C', 'the answer is (C)', '\\boxed{C}', 'option C', a line
    holding just 'C)'; failing those, the one option whose full text the response's last line contains."""
    for pattern in _PATTERNS:
        matches = pattern.findall(text)
        if matches:
            return matches[-1].upper()
    if options:
        last = text.strip().splitlines()[-1].lower() if text.strip() else ""
        hits = [LETTERS[i] for i, o in enumerate(options) if o and o.lower() in last]
        if len(hits) == 1:
            return hits[0]
    return None


def gpqa_benchmark(problems: list[dict], name: str = "gpqa_diamond") -> Benchmark:
    def score(problems: list[dict], completions: list[list[str]]) -> list[list[dict]]:
        rows = []
        for p, cs in zip(problems, completions, strict=True):
            letters = [extract_letter(c, p["options"]) for c in cs]
            rows.append([{"extracted": x, "correct": x == p["gold"]} for x in letters])
        return rows

    return Benchmark(name, problems, gpqa_prompt, score, title="GPQA-Diamond")
