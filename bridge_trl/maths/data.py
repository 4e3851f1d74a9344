"""Dataset loaders: the RL prompt sets (LIMR, MATH levels 3-5) and the SFT traces (DeepMath-103K).

Every loader takes a hub id or a local path (a `.jsonl`/`.json`/`.parquet`/`.csv`/`.arrow` file, a folder
of data files, or a folder written by `save_to_disk`).

* RL sets become TRL prompt datasets: `prompt` (from `prompts.format_prompt`) and `answer` (a string,
  read by `rewards.accuracy_reward`).
* `load_solutions_sft_dataset` pairs problems with worked solutions (MATH's `solution`), a stand-in for
  DeepMath traces in offline pipeline tests.
* The SFT set follows the paper: "we pair queries from LIMR and MATH with corresponding intermediate
  reasoning traces extracted from DeepMath-103k". A DeepMath row pairs with an RL query when their
  normalised question texts (`normalize_question`) are equal. Unmatched RL queries get no trace: they
  stay in the RL set only, and their count is logged. Without RL sets, DeepMath's own questions are used.
  Only traces whose final answer verifies against DeepMath's `final_answer` are kept. The output is TRL's
  prompt/completion format, with the same prompt template as RL.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, IterableDataset, load_dataset, load_from_disk
from tqdm.auto import tqdm

from ..sft import normalize_question  # the core's: LUFFY pairs traces with RL prompts the same way
from .prompts import DEFAULT_TEMPLATE, format_completion, format_prompt
from .rewards import MathVerifier, answer_text

logger = logging.getLogger(__name__)

LIMR_HUB_ID = "GAIR/LIMR"  # 1,389 problems
# SimpleRL-Zoo's MATH levels 3-5 (8,523 problems); the file inside the hub repo is given as `data_files`.
MATH_HUB_ID = "hkust-nlp/SimpleRL-Zoo-Data"
MATH_HUB_DATA_FILES = "simplelr_qwen_level3to5/train.parquet"
DEEPMATH_HUB_ID = "zwhe99/DeepMath-103K"

# Column names tried in order when none is given; dotted names reach into struct columns (verl's format).
QUESTION_COLUMNS = ("problem", "question", "prompt", "query")
ANSWER_COLUMNS = ("answer", "final_answer", "gt_answer", "extra_info.answer", "reward_model.ground_truth")
DEEPMATH_TRACE_COLUMNS = ("r1_solution_1", "r1_solution_2", "r1_solution_3")
THINK_MODES = ("strip_tags", "keep", "drop")
_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def load_source(
    source: str | Path,
    split: str = "train",
    streaming: bool = False,
    data_files: str | Sequence[str] | None = None,
) -> Dataset | IterableDataset:
    """Load `source` (hub id or local path) as one split; `streaming=True` iterates without downloading it all."""
    path = Path(source).expanduser()
    if path.is_dir() and any(
        (path / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json")
    ):
        dataset = load_from_disk(str(path))
        if isinstance(dataset, DatasetDict):
            if split not in dataset:
                raise ValueError(f"{source} has no split {split!r}; splits: {sorted(dataset)}.")
            dataset = dataset[split]
        return dataset.to_iterable_dataset() if streaming else dataset
    if path.is_dir():
        return load_dataset(str(path), data_files=data_files, split=split, streaming=streaming)
    if path.is_file():
        if path.suffix == ".arrow":
            dataset = Dataset.from_file(str(path))
            return dataset.to_iterable_dataset() if streaming else dataset
        if path.suffix not in _FILE_BUILDERS:
            raise ValueError(
                f"Unsupported file type {path.suffix!r} for {source}; use one of {sorted(_FILE_BUILDERS)}."
            )
        return load_dataset(
            _FILE_BUILDERS[path.suffix], data_files=str(path), split="train", streaming=streaming
        )
    if str(source).startswith((".", "/", "~")) or path.suffix in (*_FILE_BUILDERS, ".arrow"):
        raise FileNotFoundError(f"No such file or directory: {source}")
    return load_dataset(str(source), data_files=data_files, split=split, streaming=streaming)


def get_field(row: dict, name: str) -> Any:
    """`row[name]`, where a dotted name reaches into nested dicts; KeyError if any part is missing."""
    value: Any = row
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(name)
        value = value[part]
    return value


def resolve_column(
    dataset: Dataset | IterableDataset, wanted: str | None, candidates: Sequence[str], what: str, source: Any
) -> str:
    """The column to read `what` from: `wanted` if given, else the first candidate present; else a clear error."""
    first_row = next(iter(dataset), None)  # streamed sets may not know their columns; dotted names need a row
    columns = sorted(first_row) if first_row is not None else sorted(dataset.column_names or [])

    def present(name: str) -> bool:
        if first_row is None:
            return name.split(".")[0] in columns
        try:
            get_field(first_row, name)
            return True
        except KeyError:
            return False

    if wanted is not None:
        if not present(wanted):
            raise ValueError(
                f"{source}: the {what} column {wanted!r} is missing; columns present: {columns}."
            )
        return wanted
    for name in candidates:
        if present(name):
            return name
    raise ValueError(
        f"{source}: no {what} column (looked for {', '.join(map(repr, candidates))}); columns present: "
        f"{columns}. Pass the column name explicitly."
    )


def read_problems(
    source: str | Path,
    question_column: str | None = None,
    answer_column: str | None = None,
    split: str = "train",
    data_files: str | Sequence[str] | None = None,
    limit: int | None = None,
) -> list[tuple[str, str]]:
    """The (question, answer) pairs of a problem set, answers as strings.

    Rows without an answer are dropped with a warning (the local MATH 3-5 copy has 2); a missing or
    non-text question is a ValueError naming the row.
    """
    if data_files is None and str(source) == MATH_HUB_ID:
        data_files = MATH_HUB_DATA_FILES
    raw = load_source(source, split=split, data_files=data_files)
    question_column = resolve_column(raw, question_column, QUESTION_COLUMNS, "question", source)
    answer_column = resolve_column(raw, answer_column, ANSWER_COLUMNS, "answer", source)
    if limit is not None:
        raw = raw.select(range(min(limit, len(raw))))
    problems, no_answer = [], []
    for index, row in enumerate(raw):
        question, answer = get_field(row, question_column), get_field(row, answer_column)
        if not isinstance(question, str) or not question.strip():
            raise ValueError(
                f"{source}: row {index} has an empty or non-text {question_column!r}: {question!r}."
            )
        if answer is None or not answer_text(answer):
            no_answer.append(index)  # unscoreable: every rollout would get the incorrect reward
            continue
        problems.append((question.strip(), answer_text(answer)))
    if no_answer:
        logger.warning(
            "%s: dropped %d rows with an empty %r (rows %s).",
            source,
            len(no_answer),
            answer_column,
            no_answer[:10],
        )
    return problems


def load_rl_dataset(source: str | Path, template: str = DEFAULT_TEMPLATE, **kwargs) -> Dataset:
    """An RL prompt dataset with columns `prompt` (formatted with `template`) and `answer` (a string).

    `kwargs` go to `read_problems`: `question_column`, `answer_column`, `split`, `data_files`, `limit`.
    """
    problems = read_problems(source, **kwargs)
    logger.info("Loaded %d RL prompts from %s (template %r).", len(problems), source, template)
    return Dataset.from_dict(
        {"prompt": [format_prompt(q, template) for q, _ in problems], "answer": [a for _, a in problems]}
    )


def load_limr(source: str | Path = LIMR_HUB_ID, **kwargs) -> Dataset:
    """LIMR's 1,389 RL problems (hub `GAIR/LIMR` or a local copy)."""
    return load_rl_dataset(source, **kwargs)


def load_math_level3to5(source: str | Path = MATH_HUB_ID, **kwargs) -> Dataset:
    """MATH levels 3-5, 8,523 problems (SimpleRL-Zoo's file on the hub, or a local copy)."""
    return load_rl_dataset(source, **kwargs)


def process_trace(trace: str | None, think: str = "strip_tags") -> str:
    """Apply the `think` mode to an R1 trace (`<think>reasoning</think>solution`).

    `strip_tags` (default) keeps the reasoning and the solution but removes the literal tags: the RL
    prompt templates never ask for them, so SFT targets stay in the format RL rollouts take. `keep`
    leaves the trace as written; `drop` keeps only the solution after `</think>`.
    """
    if think not in THINK_MODES:
        raise ValueError(f"Unknown think mode {think!r}; valid: {', '.join(THINK_MODES)}.")
    trace = trace or ""
    if think == "drop" and "</think>" in trace:
        trace = trace.rsplit("</think>", 1)[1]
    elif think == "strip_tags":
        trace = re.sub(r"\n?</?think>\n?", "\n", trace)
    return trace.strip()


def _rl_queries(rl_sources: Sequence[str | Path | tuple]) -> dict[str, tuple[str, str]]:
    """normalised question -> (question, answer) over all RL sources; an entry may be (source, read_problems kwargs)."""
    queries: dict[str, tuple[str, str]] = {}
    for entry in rl_sources:
        source, kwargs = entry if isinstance(entry, tuple) else (entry, {})
        for question, answer in read_problems(source, **kwargs):
            queries.setdefault(normalize_question(question), (question, answer))
    return queries


def load_sft_dataset(
    deepmath: str | Path = DEEPMATH_HUB_ID,
    rl_sources: Sequence[str | Path | tuple] | None = (LIMR_HUB_ID, MATH_HUB_ID),
    template: str = DEFAULT_TEMPLATE,
    think: str = "strip_tags",
    traces_per_question: int = 1,
    verify_traces: bool = True,
    limit: int | None = None,
    verifier: MathVerifier | None = None,
    batch_size: int = 256,
) -> Dataset:
    """SFT examples (`prompt`, `completion`, `answer`) from DeepMath-103K's R1 traces.

    With `rl_sources` (default LIMR and MATH 3-5; an entry may be `(source, read_problems kwargs)`),
    each RL query matched by a DeepMath question gets up to `traces_per_question` of that row's verified
    traces, under the RL query's own text; unmatched queries are counted and logged. With
    `rl_sources=None`, DeepMath's own questions are used. `limit` caps the number of questions either
    way. A hub id is streamed. Empty traces and traces whose final answer does not verify against
    `final_answer` are dropped (counts logged). `think` is applied by `process_trace`.
    """
    queries = _rl_queries(rl_sources) if rl_sources else None
    rows = load_source(deepmath, streaming=not Path(deepmath).expanduser().exists())
    first = next(iter(rows), None)
    for column in ("question", "final_answer", *DEEPMATH_TRACE_COLUMNS):
        if first is None or column not in first:
            present = sorted(first) if first is not None else []
            raise ValueError(
                f"{deepmath}: the DeepMath column {column!r} is missing; columns present: {present}."
            )

    candidates: list[tuple[str, str, str]] = []  # (question text, gold, trace), in preference order
    matched: set[str] = set()
    num_empty = 0
    for row in tqdm(rows, desc="DeepMath rows", unit="row", disable=None):
        done = queries is not None and len(matched) == len(queries)
        if done or (limit is not None and len(matched) >= limit):
            break
        key = normalize_question(row["question"] or "")
        if queries is not None:
            if key not in queries or key in matched:
                continue
            question = queries[key][0]
        else:
            question = (row["question"] or "").strip()
            if not question or key in matched:
                continue
        matched.add(key)
        for column in DEEPMATH_TRACE_COLUMNS:
            trace = process_trace(row[column], think)
            if trace:
                candidates.append((question, answer_text(row["final_answer"]), trace))
            else:
                num_empty += 1
    if queries is not None:
        logger.info(
            "Paired %d of %d RL queries with DeepMath traces; %d unmatched queries have no SFT trace.",
            len(matched), len(queries), len(queries) - len(matched),
        )  # fmt: skip
    if num_empty:
        logger.warning("Dropped %d empty traces.", num_empty)

    keep = [True] * len(candidates)
    if verify_traces and candidates:
        pool = verifier or MathVerifier()
        try:
            for start in tqdm(range(0, len(candidates), batch_size), desc="Verifying traces", disable=None):
                chunk = candidates[start : start + batch_size]
                verdicts = pool.verify([c[1] for c in chunk], [c[2] for c in chunk])
                keep[start : start + len(chunk)] = [v.correct for v in verdicts]
        finally:
            if verifier is None:  # ours: stop its workers now rather than at exit
                pool.close()
        logger.info("Kept %d of %d traces whose final answer verifies.", sum(keep), len(candidates))

    out = {"prompt": [], "completion": [], "answer": []}
    per_question: dict[str, int] = {}
    for (question, gold, trace), ok in zip(candidates, keep, strict=True):
        if ok and per_question.get(question, 0) < traces_per_question:
            per_question[question] = per_question.get(question, 0) + 1
            out["prompt"].append(format_prompt(question, template))
            out["completion"].append(format_completion(trace, template))
            out["answer"].append(gold)
    if not out["prompt"]:
        raise ValueError(
            f"No SFT examples: {len(matched)} DeepMath questions matched, {len(candidates)} non-empty traces, none "
            "verified. With `rl_sources`, check that the RL questions occur in DeepMath; or pass rl_sources=None."
        )
    logger.info("Built %d SFT examples for %d questions.", len(out["prompt"]), len(per_question))
    return Dataset.from_dict(out)


def load_solutions_sft_dataset(
    source: str | Path,
    template: str = DEFAULT_TEMPLATE,
    question_column: str | None = None,
    solution_column: str = "solution",
    limit: int | None = None,
) -> Dataset:
    """SFT examples (`prompt`, `completion`) from a problem set with worked solutions (MATH's `solution`).

    A stand-in for DeepMath's R1 traces where those are not at hand (the offline pipeline test): each
    solution becomes the completion of its problem's prompt, in the template's format. A row with an empty
    solution or question is a ValueError naming the row.
    """
    rows = load_source(source)
    q_col = resolve_column(rows, question_column, QUESTION_COLUMNS, "question", source)
    s_col = resolve_column(rows, solution_column, (solution_column,), "solution", source)
    out: dict[str, list] = {"prompt": [], "completion": []}
    for index, row in enumerate(rows):
        if limit is not None and index >= limit:
            break
        question, solution = get_field(row, q_col), get_field(row, s_col)
        for name, value in ((q_col, question), (s_col, solution)):
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{source}: row {index} has no text in column {name!r} (got {value!r}).")
        out["prompt"].append(format_prompt(question, template))
        out["completion"].append(format_completion(solution.strip(), template))
    if not out["prompt"]:
        raise ValueError(f"{source}: no rows.")
    logger.info("Built %d SFT examples from the worked solutions of %s.", len(out["prompt"]), source)
    return Dataset.from_dict(out)
