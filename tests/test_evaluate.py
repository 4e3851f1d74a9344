"""The evaluation CLI: benchmark loading, table rendering, and end-to-end runs of a tiny model on the CPU."""

import json
import re

import pytest
import torch

import bridge_trl.maths.evaluate as ev
from bridge_trl.maths.eval_report import load_results, render_table
from bridge_trl.tiny import build_tiny_model

from .conftest import SHARED_DATA, needs_shared_data

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Two tiny benchmarks in the local layout, with the field shapes of the real copies.
TINY_BENCHMARKS = {
    "aime24": [
        {"id": 1, "problem": "What is 030 + 003?", "answer": "033"},
        {"id": 2, "problem": "What is 7?", "answer": "007"},
    ],
    "minerva_math": [
        {"problem": "Compute 1/2.", "solution": "So it is $\\boxed{\\frac{1}{2}}$."},
        {"problem": "Compute 2.", "solution": "Trivially $\\boxed{2}$."},
        {"problem": "Compute 3.", "solution": "Trivially $\\boxed{3}$."},
    ],
}


@pytest.fixture
def bench_dir(tmp_path):
    root = tmp_path / "benchmarks"
    for name, rows in TINY_BENCHMARKS.items():
        (root / name).mkdir(parents=True)
        (root / name / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture
def tiny_model_dir(tmp_path, tokenizer):
    path = tmp_path / "tiny-model"
    build_tiny_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def _one_thread():
    """A tiny model is slower with several threads on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------- benchmarks
def test_load_benchmark_fields(bench_dir):
    aime = ev.load_benchmark("aime24", bench_dir)
    assert [p["gold"] for p in aime] == ["033", "007"]
    minerva = ev.load_benchmark("minerva_math", bench_dir, limit=2)
    assert [p["gold"] for p in minerva] == ["\\frac{1}{2}", "2"]  # the last \boxed{} of `solution`
    assert minerva[0]["question"] == "Compute 1/2."


def test_load_benchmark_errors_name_row_and_fields(tmp_path):
    (tmp_path / "amc23").mkdir()
    (tmp_path / "amc23" / "test.jsonl").write_text(
        json.dumps({"question": "ok", "answer": 1.0})
        + "\n"
        + json.dumps({"question": "no gold", "url": "u"})
        + "\n"
    )
    with pytest.raises(
        ValueError, match=r"amc23 row 1: no gold answer .*non-empty fields present: \['question', 'url'\]"
    ):
        ev.load_benchmark("amc23", tmp_path)
    with pytest.raises(FileNotFoundError, match="math500"):
        ev.load_benchmark("math500", tmp_path)
    with pytest.raises(ValueError, match="valid: math500"):
        ev.load_benchmark("gsm8k", tmp_path)


@needs_shared_data("benchmarks")
def test_local_benchmark_copies():
    sizes = {"math500": 500, "minerva_math": 272, "olympiadbench": 675, "aime24": 30, "amc23": 40}
    for name, size in sizes.items():
        problems = ev.load_benchmark(name, SHARED_DATA / "benchmarks")
        assert len(problems) == size
        assert all(p["question"].strip() and p["gold"] not in (None, "", []) for p in problems)
    assert ev.load_benchmark("amc23", SHARED_DATA / "benchmarks", limit=1)[0]["gold"] == 27.0


# -------------------------------------------------------------------------------------------- report
def test_table_layout_and_partial_rows():
    full = {
        "name": "A",
        "scores": {
            "math500": 70.0,
            "minerva_math": 30.0,
            "olympiadbench": 40.0,
            "aime24": 10.0,
            "amc23": 50.0,
        },
    }
    part = {"name": "B", "scores": {"aime24": 20.0}}
    table = render_table([full, part]).splitlines()
    assert table[0] == "| Model | MATH 500 | Minerva Math | Olympiad Bench | AIME24 | AMC23 | Average |"
    assert table[2] == "| A | 70.0 | 30.0 | 40.0 | 10.0 | 50.0 | 40.0 |"
    assert table[3] == "| B | – | – | – | 20.0 | – | 20.0* |"
    assert "average over the benchmarks evaluated" in table[-1]


def test_cli_rejects_unknown_benchmark_options():
    with pytest.raises(SystemExit):
        ev.main(["--model", "m", "--samples_per_benchmark", "aime=32"])
    with pytest.raises(SystemExit):
        ev.main([])


def test_stop_tokens_include_end_of_turn(tokenizer):
    ids = ev._stop_token_ids(tokenizer)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in ids and tokenizer.eos_token_id in ids


# ---------------------------------------------------------------------------------------- end to end
def _table_row(table: str, name: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_end_to_end_tiny_model(tmp_path, bench_dir, tiny_model_dir, capsys):
    out = tmp_path / "out"
    argv = ["--model", str(tiny_model_dir), "--data_dir", str(bench_dir), "--benchmarks", "aime24", "minerva_math",
            "--limit", "2", "--max_new_tokens", "4", "--backend", "hf", "--batch_size", "2", "--output_dir", str(out)]  # fmt: skip
    result = ev.main(argv)
    data = json.loads((out / "results.json").read_text())
    assert data["name"] == "tiny-model" and data["backend"] == "hf"
    assert set(data["scores"]) == {"aime24", "minerva_math"}
    for name in ("aime24", "minerva_math"):
        bench = data["benchmarks"][name]
        assert bench["num_problems"] == 2 and bench["num_samples"] == 1
        for problem in bench["problems"]:
            (sample,) = problem["samples"]
            assert set(sample) == {"completion", "extracted", "correct"}
            assert isinstance(sample["completion"], str)
            assert problem["accuracy"] == float(sample["correct"])
        assert bench["accuracy"] == pytest.approx(100 * sum(p["accuracy"] for p in bench["problems"]) / 2)
    assert data["scores"] == result["scores"]
    # Markdown table and stdout agree with the JSON; the chart is a PNG.
    md = (out / "results.md").read_text()
    assert md in capsys.readouterr().out
    row = _table_row(md, "tiny-model")
    assert row[4] == f"{data['scores']['aime24']:.1f}" and row[2] == f"{data['scores']['minerva_math']:.1f}"
    assert row[1] == "–" and row[6].endswith("*")
    assert (out / "results.png").read_bytes()[:8] == PNG_MAGIC


def test_scoring_and_avg_at_k_with_scripted_generations(tmp_path, bench_dir, tiny_model_dir, monkeypatch):
    """With generations known in advance, the scores must be exact: 3 of 4 AIME samples right, etc."""
    scripted = {
        "030 + 003": ["\\boxed{33}", "\\boxed{34}"],  # avg@2 = 0.5
        "What is 7?": ["so \\boxed{7}", "\\boxed{007}"],  # 1.0
        "Compute 1/2.": ["\\boxed{0.5}", "\\boxed{0.5}"],  # 1.0
        "Compute 2.": ["\\boxed{3}", "nothing"],  # 0.0
    }

    def fake_generate(lm, tokenizer, texts, n, sampling, batch_size=16):
        assert sampling["temperature"] == 0.6 and n == 2  # sampling defaults for avg@k
        return [next(v[:n] for k, v in scripted.items() if k in t) for t in texts]

    monkeypatch.setattr(ev, "generate_hf", fake_generate)
    out = tmp_path / "scripted"
    argv = ["--model", str(tiny_model_dir), "--data_dir", str(bench_dir), "--benchmarks", "aime24", "minerva_math",
            "--limit", "2", "--num_samples", "2", "--backend", "hf", "--name", "scripted", "--output_dir", str(out)]  # fmt: skip
    result = ev.main(argv)
    assert result["scores"] == {"aime24": 75.0, "minerva_math": 50.0}
    assert result["average"] == 62.5
    problems = result["benchmarks"]["aime24"]["problems"]
    assert [s["correct"] for s in problems[0]["samples"]] == [True, False]
    assert problems[0]["samples"][0]["extracted"] == "33"
    # Several results files render into one table.
    other = json.loads((out / "results.json").read_text())
    other["name"], other["scores"] = "other", {"aime24": 10.0}
    (tmp_path / "other.json").write_text(json.dumps(other))
    render_dir = tmp_path / "combined"
    ev.main(
        [
            "--results",
            str(out / "results.json"),
            str(tmp_path / "other.json"),
            "--output_dir",
            str(render_dir),
        ]
    )
    table = (render_dir / "results.md").read_text()
    assert _table_row(table, "scripted")[4] == "75.0" and _table_row(table, "other")[4] == "10.0"
    assert len(re.findall(r"^\| (scripted|other) \|", table, flags=re.M)) == 2
    assert (render_dir / "results.png").read_bytes()[:8] == PNG_MAGIC
    assert [r["name"] for r in load_results([out / "results.json"])] == ["scripted"]


def test_adapter_is_merged_before_generation(tmp_path, tiny_model_dir, tokenizer):
    from peft import LoraConfig, get_peft_model

    base = build_tiny_model(tokenizer)
    peft_model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir)
    merged, tok = ev.load_model(str(tiny_model_dir), str(adapter_dir), device="cpu")
    plain, _ = ev.load_model(str(tiny_model_dir), device="cpu")
    ids = torch.tensor([tokenizer("What is 1+1?")["input_ids"]])
    with torch.no_grad():
        expected = peft_model.eval()(ids).logits
        got = merged(ids).logits
        assert not torch.allclose(plain(ids).logits, expected, atol=1e-4)  # the adapter changes the model
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert tok.padding_side == "left"
    assert not hasattr(merged, "peft_config") or not merged.peft_config  # merged into a plain model


# ---------------------------------------------------------------------------------------- `bridge-trl eval ...`
def test_eval_subcommands_share_one_skeleton(tmp_path, bench_dir, tiny_model_dir, monkeypatch):
    """`bridge-trl eval maths` is the maths kit's main; `eval ood` adds the maths benchmarks to code and science."""
    from bridge_trl.cli import eval as cli_eval
    from bridge_trl.evals import generation

    def scripted(lm, tokenizer, texts, n, sampling, batch_size=16):
        return [["\\boxed{33}" if "030 + 003" in t else "no"] * n for t in texts]

    monkeypatch.setattr(ev, "generate_hf", scripted)  # the maths kit's own generation path
    monkeypatch.setattr(generation, "generate_hf", scripted)  # the shared one (ood)
    common = ["--model", str(tiny_model_dir), "--data_dir", str(bench_dir), "--benchmarks", "aime24", "--limit", "2",
              "--backend", "hf"]  # fmt: skip
    maths = cli_eval.main(["maths", *common, "--output_dir", str(tmp_path / "m")])
    ood = cli_eval.main(["ood", *common, "--output_dir", str(tmp_path / "o")])
    assert (
        maths["scores"] == ood["scores"] == {"aime24": 50.0}
    )  # 1 of 2 right, the same verdicts on both paths
    for out in ("m", "o"):
        assert "| AIME24 |" in (tmp_path / out / "results.md").read_text()
    with pytest.raises(SystemExit):
        cli_eval.main(["physics"])


def test_shared_evaluation_path_imports_no_kit():
    """`bridge_trl.evals` is below the kits: importing it (and its command) loads neither maths nor logic."""
    import subprocess
    import sys

    code = ("import sys, bridge_trl.evals.evaluate, bridge_trl.evals.runner; "
            "print([m for m in sys.modules if m.startswith(('bridge_trl.maths', 'bridge_trl.logic'))])")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"  # (wandb, imported by transformers, may print a line first)
