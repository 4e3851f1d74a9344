"""The toy Figure 1 reproduction: task splits, traces, the reward, the base band, and a miniature end-to-end run."""

import importlib.util
import json
import os
import re

import pytest
from PIL import Image

from bridge_trl.methods import METHODS
from bridge_trl.toy import arithmetic_datasets, boxed_exact_match, pretraining_corpus, toy_splits
from bridge_trl.toy.base import BandNotReached, BaseSettings, pretrain_base
from bridge_trl.toy.calibration import accuracy_at, premise_checks
from bridge_trl.toy.task import is_trace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _terms(prompt: str) -> list[int]:
    return [int(x) for x in prompt.rstrip("=").split("+")]


def test_splits_are_disjoint_paired_and_cover_the_space():
    splits = toy_splits()
    prompts = {name: set(ds["prompt"]) for name, ds in splits.items()}
    assert {k: len(v) for k, v in prompts.items()} == {"rl": 500, "sft": 500, "val": 250, "test": 250}
    # RL prompts and SFT traces are the same problems, in the same order (the paper's §4.1 pairing).
    assert splits["rl"]["prompt"] == splits["sft"]["prompt"]
    for a, b in (("rl", "val"), ("rl", "test"), ("val", "test")):
        assert not prompts[a] & prompts[b], f"{a} and {b} share prompts"
    assert len(prompts["rl"] | prompts["val"] | prompts["test"]) == 1000  # every 3-number sum of 0-9, once
    assert toy_splits()["test"]["prompt"] == splits["test"]["prompt"]  # deterministic


def test_pretraining_corpus_never_shows_held_out_sums_and_mixes_formats():
    splits = toy_splits()
    corpus = pretraining_corpus(
        5000, list(splits["rl"]["prompt"]), hard_fraction=0.2, trace_fraction=0.25, seed=3
    )
    held_out = set(splits["test"]["prompt"]) | set(splits["val"]["prompt"])
    hard = traces = 0
    for text in corpus:
        prompt, body = re.fullmatch(r"(\d+\+\d+=|\d+\+\d+\+\d+=)(.*)", text).groups()
        assert prompt not in held_out
        assert boxed_exact_match([body], [str(sum(_terms(prompt)))]) == [1.0]  # every answer is right
        if len(_terms(prompt)) == 3:
            hard += 1
            traces += is_trace(body)
        else:
            assert not is_trace(body)  # 2-number sums are always direct
    assert 0.17 < hard / len(corpus) < 0.23 and 0.2 < traces / hard < 0.3


def test_easy_traces_put_the_facts_in_trace_position():
    """Base E's corpus: about half of the 2-number sums are 2-number traces `a+b=a+b=s.\\boxed{s}`, all right."""
    corpus = pretraining_corpus(4000, list(toy_splits()["rl"]["prompt"]), hard_fraction=0.2, trace_fraction=0.5,
                                seed=1, easy_trace_fraction=0.5)  # fmt: skip
    easy = [re.fullmatch(r"(\d+)\+(\d+)=(.*)", t).groups() for t in corpus if t.count("+") == 1 or
            re.fullmatch(r"\d+\+\d+=\d+\+\d+=.*", t)]  # fmt: skip
    traces = 0
    for a, b, body in easy:
        assert boxed_exact_match([body], [str(int(a) + int(b))]) == [1.0]
        if is_trace(body):
            traces += 1
            assert body == f"{a}+{b}={int(a) + int(b)}.\\boxed{{{int(a) + int(b)}}}"
    assert 0.45 < traces / len(easy) < 0.55
    assert pretraining_corpus(50, ["1+2+3="], seed=2) == pretraining_corpus(50, ["1+2+3="], seed=2,
                                                                           easy_trace_fraction=0.0)  # fmt: skip


def test_traces_end_with_the_right_boxed_answer():
    sft = toy_splits()["sft"]
    for prompt, trace in zip(sft["prompt"], sft["completion"], strict=True):
        a, b, c = _terms(prompt)
        assert trace == f"{a}+{b}={a + b},{a + b}+{c}={a + b + c}.\\boxed{{{a + b + c}}}"
        assert is_trace(trace) and boxed_exact_match([trace], [str(a + b + c)]) == [1.0]
    _, sft_small, _ = arithmetic_datasets(num_rl=8, num_sft=8, num_test=8)
    for prompt, trace in zip(sft_small["prompt"], sft_small["completion"], strict=True):
        assert boxed_exact_match([trace], [str(sum(_terms(prompt)))]) == [1.0]


def test_exact_match_reward():
    completions = ["3+4=7,7+5=12.\\boxed{12}", "\\boxed{11}", "12", "\\boxed{3}\\boxed{12}", "\\boxed{ 12 }",
                   "\\boxed{12", [{"role": "assistant", "content": "\\boxed{12}"}]]  # fmt: skip
    assert boxed_exact_match(completions, ["12"] * len(completions)) == [1, 0, 0, 1, 1, 0, 1]


def test_pretraining_fails_loudly_outside_the_band():
    splits = toy_splits()
    settings = BaseSettings(hidden_size=32, num_layers=1, intermediate_size=64, max_steps=2, eval_every=1,
                            band_low=0.9, band_high=1.0, batch_size=4)  # fmt: skip
    with pytest.raises(BandNotReached, match="never reached"):
        pretrain_base(settings, list(splits["rl"]["prompt"]), splits["val"].select(range(8)), progress=False)


def test_premise_checks_on_fixed_records():
    def rec(method, seed, accs):  # evaluated at steps 0, 2, 4, ..., 10
        return {"method": method, "seed": seed, "steps": 10, "final_accuracy": accs[-1],
                "curve": [(2 * i, 0, a) for i, a in enumerate(accs)]}  # fmt: skip

    records = [rec("rl", s, [0.2, 0.2, 0.22, 0.3, 0.35, 0.4 + 0.01 * s]) for s in (1, 2, 3)]
    records += [rec("sft", s, [0.2, 0.5 + 0.01 * s, 0.6, 0.6, 0.6, 0.6]) for s in (1, 2, 3)]
    assert accuracy_at(records[0]["curve"], 3) == 0.2  # last evaluation at or before step 3
    info = {
        "settings": {"band_low": 0.15, "band_high": 0.25, "eval_every": 25},
        "history": [(25, 0.1), (50, 0.2)],
    }
    checks = {c["name"]: c for c in premise_checks(records, 0.2, info)}
    assert checks["rl_gain"]["passed"] and checks["rl_gain"]["numbers"]["mean"] == pytest.approx(0.22)
    assert checks["sft_fast"]["passed"] and checks["sft_fast"]["numbers"]["step"] == 2
    assert checks["sft_fast"]["numbers"]["mean"] == pytest.approx(0.32)
    assert checks["base_in_band"]["passed"] and "step 50" in checks["base_in_band"]["text"]
    flat = [rec("rl", s, [0.2] * 5 + [0.2 + (0.01 if s == 1 else -0.01)]) for s in (1, 2, 3)]
    assert not premise_checks(flat, 0.2)[0]["passed"]  # a gain inside its CI does not pass


def _load_script():
    spec = importlib.util.spec_from_file_location(
        "reproduce_toy", os.path.join(ROOT, "examples/reproduce_toy.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_miniature_run_writes_every_file_checks_and_sentence(tmp_path, capsys):
    """bridge, rl and sft (what the sentence and the checks need), 2 paired seeds, 2 steps, a 20-step base, 16
    evaluation sums: every file, the checks and the sentence agree. Every method is covered by the slow end-to-end
    test below."""
    out = tmp_path / "toy"
    _load_script().main(["--quick", "--max_steps", "2", "--eval_every", "1", "--base_steps", "20", "--seeds", "1",
                         "2", "--methods", "bridge", "rl", "sft", "--lr", "1e-4", "--eval_limit", "16",
                         "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    runs, summary = results["runs"], results["summary"]
    assert sorted({r["method"] for r in runs}) == ["bridge", "rl", "sft"] and len(runs) == 6
    assert 0.0 <= results["meta"]["base_accuracy"] <= 1.0 and results["meta"]["num_eval"] == 16
    for r in runs:
        assert r["seed"] in (1, 2) and r["steps"] == 2 and [p[0] for p in r["curve"]] == [0, 1, 2]
        assert r["final_accuracy"] == r["curve"][-1][2]
        assert r["curve"][-1][1] == r["sft_samples"] + r["rl_samples"]  # samples axis = SFT + RL consumed
        assert (r["sft_samples"] > 0) == (r["method"] != "rl")
        assert (r["rl_samples"] > 0) == (r["method"] != "sft")
        assert r["sft_tokens"] + r["rl_tokens"] > 0
        assert r["seconds_per_step"] > 0 and r["peak_rss_mb"] > 0 and r["training_state_mb"] > 0
        assert (len(r["reward_curve"]) > 0) == (r["method"] != "sft")
    assert len({r["curve"][0][2] for r in runs}) == 1  # every method starts from the same base
    for method, s in summary.items():
        assert s["final_accuracy_mean"] == pytest.approx(sum(r["final_accuracy"] for r in runs
                                                             if r["method"] == method) / 2)  # fmt: skip
    assert set(results["comparisons"]) == {"rl", "sft"}
    for m in ("rl", "sft"):  # the paired difference is computed from the runs themselves
        diffs = [
            next(r["final_accuracy"] for r in runs if r["method"] == "bridge" and r["seed"] == s)
            - next(r["final_accuracy"] for r in runs if r["method"] == m and r["seed"] == s)
            for s in (1, 2)
        ]
        assert results["comparisons"][m]["mean"] == pytest.approx(sum(diffs) / 2)
    assert {c["name"] for c in results["checks"]} == {"rl_gain", "sft_fast", "base_in_band"}
    assert results["sentence"].startswith("On final held-out accuracy, BRIDGE ")
    table = (out / "results.md").read_text()
    assert results["sentence"] in table and results["sentence"] in printed and "Calibration checks" in table
    for name in ("curves.png", "dynamics.png"):
        with Image.open(out / name) as image:
            image.verify()
            assert image.format == "PNG"


@pytest.mark.slow
def test_quick_run_end_to_end(tmp_path):
    """The CI smoke configuration itself (`--quick`, tuned lrs), end to end."""
    out = tmp_path / "toy"
    result = _load_script().main(
        ["--quick", "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(out)]
    )
    assert sorted(result["summary"]) == sorted(METHODS)
    assert (out / "curves.png").exists() and (out / "dynamics.png").exists()


@pytest.mark.slow
def test_sweep_writes_the_grid_and_flags_edges(tmp_path):
    """`--sweep` on a copy of the record: every trial scored on val, edges extended and flagged, record rewritten."""
    record = tmp_path / "tuned.json"
    record.write_text((open(os.path.join(ROOT, "bridge_trl/toy/tuned.json"))).read())
    _load_script().main(["--sweep", "--methods", "rl", "sft", "--grid", "1e-4", "1e-3", "--seeds", "1",
                         "--max_steps", "1", "--eval_every", "1", "--base_steps", "20", "--tuned", str(record),
                         "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "sweep")])  # fmt: skip
    out = json.loads(record.read_text())
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text()) == out
    for m in ("rl", "sft"):
        rec = out["methods"][m]
        assert {1e-4, 1e-3} <= set(rec["grid"]) and all(len(v) == 1 for v in rec["scores"].values())
        assert rec["tuned"] == (rec["edge"] is None) and len(rec["grid"]) == 2 + len(rec["extensions"])
    assert out["sft_ratio"] == out["methods"]["sft"]["best"] / out["methods"]["rl"]["best"]
