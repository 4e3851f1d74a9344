"""Prompt templates and dataset loaders: RL prompt sets, DeepMath pairing, sources and error messages."""

import json
import logging
from pathlib import Path

import pytest
from datasets import Dataset

from bridge_trl.maths.data import (
    load_limr,
    load_math_level3to5,
    load_rl_dataset,
    load_sft_dataset,
    load_solutions_sft_dataset,
    load_source,
    normalize_question,
    process_trace,
)
from bridge_trl.maths.prompts import (
    BOXED_INSTRUCTION,
    PROMPT_TEMPLATES,
    format_completion,
    format_prompt,
    render_prompt,
)
from bridge_trl.maths.rewards import MathVerifier

from .conftest import SHARED_DATA, needs_shared_data

FIXTURES = Path(__file__).parent / "fixtures"
RL_FIXTURE = FIXTURES / "rl_tiny.jsonl"
DEEPMATH_FIXTURE = FIXTURES / "deepmath_tiny.jsonl"


@pytest.fixture(scope="module")
def verifier():
    pool = MathVerifier(num_workers=1)
    yield pool
    pool.close()


# -------------------------------------------------------------------------------------------- prompts
def test_prompt_templates():
    q = "What is $\\{1, 2\\}$?"  # braces must survive (no str.format)
    assert format_prompt(q, "qwen-boxed") == [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": f"{q}\n{BOXED_INSTRUCTION}"},
    ]
    assert format_prompt(q, "qwen-math-cot") == [
        {"role": "system", "content": BOXED_INSTRUCTION},
        {"role": "user", "content": q},
    ]
    assert format_prompt(q, "abel") == f"Question:\n{q}\nAnswer:\nLet's think step by step.\n"
    assert format_prompt(q, "chat") == [{"role": "user", "content": f"{q}\n{BOXED_INSTRUCTION}"}]
    assert BOXED_INSTRUCTION == "Please reason step by step, and put your final answer within \\boxed{}."
    assert format_completion("trace", "abel") == "trace"
    assert format_completion("trace", "qwen-boxed") == [{"role": "assistant", "content": "trace"}]


def test_unknown_template_lists_valid_names():
    with pytest.raises(ValueError) as err:
        format_prompt("q", "qwen")
    for name in PROMPT_TEMPLATES:
        assert name in str(err.value)


def test_render_prompt_uses_the_chat_template(tokenizer):
    text = render_prompt(format_prompt("1+1?", "qwen-boxed"), tokenizer)
    assert text.startswith(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n1+1?"
    )
    assert text.endswith("<|im_start|>assistant\n")
    assert render_prompt("plain", tokenizer) == "plain"


# ------------------------------------------------------------------------------------------- RL sets
def test_rl_loader_on_fixture(caplog):
    with caplog.at_level(logging.WARNING, logger="bridge_trl.maths.data"):
        ds = load_limr(str(RL_FIXTURE))
    assert ds.column_names == ["prompt", "answer"]
    assert len(ds) == 3  # the row with an empty answer is dropped, and said so
    assert "dropped 1 rows with an empty 'answer'" in caplog.text
    assert ds[0]["prompt"][1]["content"].startswith("What is $2+3$?\n")
    assert ds["answer"] == ["5", "\\frac{3}{4}", "6"]
    assert load_math_level3to5(str(RL_FIXTURE), template="abel")[0]["prompt"].startswith("Question:\nWhat is")


@pytest.mark.parametrize("fmt", ["json", "parquet", "arrow", "save_to_disk", "folder"])
def test_sources_of_every_kind(tmp_path, fmt):
    rows = [
        {"question": "What is 1+1?", "extra_info": {"answer": 2}},
        {"question": "And 2+2?", "extra_info": {"answer": 4}},
    ]
    ds = Dataset.from_list(rows)
    if fmt == "json":  # a JSON array, like LIMR's limr.json
        path = tmp_path / "data.json"
        path.write_text(json.dumps(rows))
    elif fmt == "parquet":
        path = tmp_path / "data.parquet"
        ds.to_parquet(str(path))
    elif fmt == "arrow":
        ds.save_to_disk(str(tmp_path / "saved"))
        path = next((tmp_path / "saved").glob("*.arrow"))
    elif fmt == "save_to_disk":
        path = tmp_path / "saved"
        ds.save_to_disk(str(path))
    else:
        path = tmp_path / "folder"
        path.mkdir()
        ds.to_json(str(path / "train.jsonl"))
    out = load_rl_dataset(str(path), template="chat")  # verl-style nested answer found by its dotted name
    assert out["answer"] == ["2", "4"]
    assert out[1]["prompt"] == [{"role": "user", "content": f"And 2+2?\n{BOXED_INSTRUCTION}"}]


def test_missing_column_errors_name_the_column(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "What is 1+1?", "label": "2"}) + "\n")
    with pytest.raises(ValueError) as err:
        load_rl_dataset(str(path))
    assert "no question column" in str(err.value) and "['label', 'text']" in str(err.value)
    with pytest.raises(
        ValueError, match=r"the answer column 'solution' is missing; columns present: \['label', 'text'\]"
    ):
        load_rl_dataset(str(path), question_column="text", answer_column="solution")
    with pytest.raises(FileNotFoundError):
        load_source(str(tmp_path / "nope.jsonl"))


@needs_shared_data("train")
def test_local_copies_of_limr_and_math():
    limr = load_limr(str(SHARED_DATA / "train" / "limr.jsonl"))
    assert len(limr) == 1389
    math = load_math_level3to5(str(SHARED_DATA / "train" / "math_level3to5_8k.jsonl"))
    assert len(math) == 8523 - 2  # two rows of the copy have an empty answer
    assert all(isinstance(a, str) and a for a in math["answer"])


# ------------------------------------------------------------------------------------------ SFT traces
def test_normalize_question_and_think_modes():
    assert normalize_question("Compute $\\dfrac{1}{2}$ .") == normalize_question("compute \\frac{1}{2}")
    assert normalize_question("What is 2+3?") != normalize_question("What is 2+4?")
    trace = "<think>\nreasoning\n</think>\n\nsolution \\boxed{1}"
    assert process_trace(trace) == "reasoning\n\nsolution \\boxed{1}"
    assert process_trace(trace, "keep") == trace
    assert process_trace(trace, "drop") == "solution \\boxed{1}"
    assert process_trace(None) == ""
    with pytest.raises(ValueError, match="strip_tags"):
        process_trace(trace, "remove")


def test_deepmath_pairing(verifier, caplog):
    with caplog.at_level(logging.INFO, logger="bridge_trl.maths.data"):
        ds = load_sft_dataset(str(DEEPMATH_FIXTURE), rl_sources=[str(RL_FIXTURE)], verifier=verifier)
    assert ds.column_names == ["prompt", "completion", "answer"]
    assert len(ds) == 2  # r1 and r2 matched; r3 has no DeepMath row
    first, second = ds[0], ds[1]
    # The RL query's own text is the prompt, with the RL template.
    assert first["prompt"][1]["content"] == f"What is $2+3$?\n{BOXED_INSTRUCTION}"
    # The wrong first trace (\boxed{6}) is skipped; the first verified one is kept, tags stripped.
    assert first["completion"] == [
        {"role": "assistant", "content": "2 plus 3 equals 5.\n\nSo $2+3=\\boxed{5}$."}
    ]
    assert "<think>" not in second["completion"][0]["content"]
    assert "\\dfrac{3}{4}" in second["completion"][0]["content"]  # the empty first trace was dropped
    assert "Paired 2 of 3 RL queries" in caplog.text and "1 unmatched" in caplog.text
    assert "Dropped 1 empty traces" in caplog.text


def test_deepmath_without_rl_sets_and_options(verifier):
    ds = load_sft_dataset(
        str(DEEPMATH_FIXTURE), rl_sources=None, template="abel", traces_per_question=3, verifier=verifier
    )
    # 2 + 2 + 2 verified traces (6 and 8 fail; 0.75 equals 3/4; one trace is empty).
    assert len(ds) == 6
    assert ds[0]["prompt"] == "Question:\nWhat is 2 + 3?\nAnswer:\nLet's think step by step.\n"
    assert isinstance(ds[0]["completion"], str)
    assert not any("\\boxed{8}" in c for c in ds["completion"])
    unverified = load_sft_dataset(
        str(DEEPMATH_FIXTURE), rl_sources=None, verify_traces=False, limit=1, think="keep"
    )
    assert len(unverified) == 1 and unverified[0]["completion"][0]["content"].startswith("<think>")


def test_deepmath_errors(tmp_path, verifier):
    bad = tmp_path / "dm.jsonl"
    bad.write_text(json.dumps({"question": "q", "final_answer": "1", "r1_solution_1": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"'r1_solution_2' is missing; columns present: \['final_answer'"):
        load_sft_dataset(str(bad), rl_sources=None, verifier=verifier)
    with pytest.raises(ValueError, match="No SFT examples"):
        load_sft_dataset(str(DEEPMATH_FIXTURE), rl_sources=[str(RL_FIXTURE)], verifier=verifier, limit=0)


def test_solutions_sft_dataset(tmp_path):
    path = tmp_path / "math.jsonl"
    rows = [
        {"problem": "What is $1+1$?", "solution": " So $1+1=\\boxed{2}$. "},
        {"problem": "Q2", "solution": "A2"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_solutions_sft_dataset(path, template="chat", limit=1)
    assert len(data) == 1
    assert data[0]["prompt"] == format_prompt("What is $1+1$?", "chat")
    assert data[0]["completion"] == [{"role": "assistant", "content": "So $1+1=\\boxed{2}$."}]
    plain = load_solutions_sft_dataset(path, template="abel")
    assert plain["completion"] == ["So $1+1=\\boxed{2}$.", "A2"]
    path.write_text(json.dumps({"problem": "Q", "solution": "  "}) + "\n")
    with pytest.raises(ValueError, match="row 0 has no text in column 'solution'"):
        load_solutions_sft_dataset(path)
    path.write_text(json.dumps({"problem": "Q", "answer": "1"}) + "\n")
    with pytest.raises(ValueError, match="solution column 'solution' is missing"):
        load_solutions_sft_dataset(path)
