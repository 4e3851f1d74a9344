"""The toy Figure 1 reproduction: task splits, traces, the reward, the base band, and a miniature end-to-end run."""

import importlib.util
import json
import os
import re

import pytest
import torch
from PIL import Image

import bridge_trl.toy.base as toy_base
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


TINY = dict(hidden_size=32, num_layers=1, intermediate_size=64, batch_size=4, band_low=0.18, band_high=0.3)


def _stub(table: dict[int, float]):
    """Accuracy as a function of the step (as a deterministic replay gives), recording each evaluation's weights."""
    seen = []

    def accuracy(model, tokenizer, val, step):
        seen.append((step, {k: v.clone() for k, v in model.state_dict().items()}))
        return table.get(step, 0.05)

    return accuracy, seen


def _pretrain(settings, accuracy=None):
    splits = toy_splits()
    return pretrain_base(settings, list(splits["rl"]["prompt"]), splits["val"].select(range(8)), progress=False,
                         accuracy=accuracy)  # fmt: skip


def test_pretraining_rolls_back_after_a_jump_and_evaluates_more_often():
    """10: 5%, 20: 5%, 30: 50% (over the band) → back to step 20, every 5: 25: 10%, 30: 50% → back to 25, every
    step: 26, 27 below, 28 inside: stop there. The replayed weights equal the first pass's at the same step, and
    the base equals one pretrained straight to step 28."""
    settings = BaseSettings(**TINY, max_steps=40, eval_every=10, refine_every=(5, 1))
    accuracy, seen = _stub({30: 0.5, 25: 0.1, 26: 0.1, 27: 0.1, 28: 0.2})
    model, _, history, rollbacks = _pretrain(settings, accuracy)
    assert history == [
        (10, 0.05),
        (20, 0.05),
        (30, 0.5),
        (25, 0.1),
        (30, 0.5),
        (26, 0.1),
        (27, 0.1),
        (28, 0.2),
    ]
    assert rollbacks == [(30, 20, 5), (30, 25, 1)]
    at_30 = [w for step, w in seen if step == 30]
    assert len(at_30) == 2 and all(torch.equal(at_30[0][k], at_30[1][k]) for k in at_30[0])
    straight, _, history_straight, _ = _pretrain(BaseSettings(**TINY, max_steps=40, eval_every=28),
                                                 _stub({28: 0.2})[0])  # fmt: skip
    assert history_straight == [(28, 0.2)]
    assert all(torch.equal(v, straight.state_dict()[k]) for k, v in model.state_dict().items())


def test_pretraining_steps_over_the_band_trains_on_then_raises_with_its_history():
    """The band lies between steps 19 and 20 even evaluated every step: train on (no endless replays); with no
    evaluation inside it by max_steps, raise with the history and the rollbacks."""
    settings = BaseSettings(**TINY, max_steps=40, eval_every=10, refine_every=(5, 1))
    table = {20: 0.5, 30: 0.5, 40: 0.5}
    with pytest.raises(
        BandNotReached, match=r"never reached.*rollbacks \(from, to, every\) \[\(20, 10, 5\), \(20, 15, 1\)\]"
    ):
        _pretrain(settings, _stub(table)[0])


def test_the_shipped_base_is_the_calibrated_one():
    """The demo's base ships with the package: its hash is the recorded one, and its greedy accuracy on the 250
    validation sums is the recorded stopping accuracy within ±1 point (greedy near-ties may differ across CPUs)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = toy_base.toy_base_model()
    assert path == toy_base.SHIPPED_BASE_DIR
    assert toy_base.file_sha256(os.path.join(path, "model.safetensors")) == toy_base.SHIPPED_BASE_SHA256
    recorded = toy_base.base_history(path)
    assert recorded["settings"]["band_low"] <= recorded["history"][-1][1] <= recorded["settings"]["band_high"]
    model = AutoModelForCausalLM.from_pretrained(path)
    accuracy = toy_base.greedy_accuracy(model, AutoTokenizer.from_pretrained(path), toy_splits()["val"])
    assert accuracy == pytest.approx(recorded["history"][-1][1], abs=0.01)


def test_a_populated_cache_never_stands_in_for_the_shipped_base(tmp_path, monkeypatch):
    """A newcomer and a re-run with a populated cache load the same base; `pretrain=True` rebuilds, never reuses."""
    monkeypatch.setenv("BRIDGE_TRL_CACHE", str(tmp_path))
    splits = toy_splits()
    stale = os.path.join(toy_base.default_cache_dir(), BaseSettings().key(list(splits["rl"]["prompt"]),
                                                                         list(splits["val"]["prompt"])))  # fmt: skip
    os.makedirs(stale)
    open(os.path.join(stale, "config.json"), "w").write("{}")  # a stale, broken cache entry
    assert toy_base.toy_base_model() == toy_base.SHIPPED_BASE_DIR
    calls = []
    monkeypatch.setattr(toy_base, "pretrain_base", lambda *a, **k: calls.append(1) or (_ for _ in ()).throw(
        BandNotReached("stub")))  # fmt: skip
    with pytest.raises(BandNotReached):
        toy_base.toy_base_model(pretrain=True)
    assert calls == [1]  # it pretrained, although a cache entry existed


def test_a_changed_shipped_base_is_refused(monkeypatch):
    monkeypatch.setattr(toy_base, "SHIPPED_BASE_SHA256", "0" * 64)
    with pytest.raises(RuntimeError, match="not the base the tuning was measured on"):
        toy_base.toy_base_model()


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
    """bridge, rl and sft (what the sentence and the checks need), 2 paired seeds, 2 steps, the shipped base, 16
    evaluation sums: every file, the checks and the sentence agree. Every method is covered by the slow end-to-end
    test below."""
    out = tmp_path / "toy"
    _load_script().main(["--quick", "--max_steps", "2", "--eval_every", "1", "--seeds", "1",
                         "2", "--methods", "bridge", "rl", "sft", "--lr", "1e-4", "--eval_limit", "16",
                         "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    runs, summary = results["runs"], results["summary"]
    assert sorted({r["method"] for r in runs}) == ["bridge", "rl", "sft"] and len(runs) == 6
    assert 0.0 <= results["meta"]["base_accuracy"] <= 1.0 and results["meta"]["num_eval"] == 16
    assert results["meta"]["shipped_base"] and results["meta"]["base_sha256"] == toy_base.SHIPPED_BASE_SHA256
    assert not (tmp_path / "cache").exists()  # nothing was pretrained
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


def test_side_by_side_flags_a_flipped_verdict_and_a_flipped_check():
    """Two runs that agree on mix but not on rl (a CI that crosses 0 in one run only), and whose sft_fast check
    differs: both are named, the agreeing verdict is not."""
    from bridge_trl.toy.robustness import flips, side_by_side

    def run(rl_low, sft_fast, gain):
        d = lambda mean, low: {"mean": mean, "ci": mean - low, "low": low, "high": 2 * mean - low, "n": 5}  # noqa: E731
        curve = [(0, 0, 0.2), (30, 96, 0.5)]
        return {"meta": {"eval_split": "test", "base_accuracy": 0.2, "numerics": {"cpu_capability": "AVX2"}},
                "summary": {"bridge": {"final_accuracy_mean": 0.5, "final_accuracy_ci95": 0.02}},
                "comparisons": {"mix": d(0.05, 0.01), "rl": d(0.04, rl_low)},
                "checks": [{"name": "sft_fast", "passed": sft_fast, "numbers": {"mean": 0.1, "ci": 0.05}}],
                "sentence": "s", "runs": [{"method": "bridge", "seed": 1, "curve": curve, "reward_curve": [(1, 0.5)],
                                           "cooperative_gain_curve": [(1, gain)]}]}  # fmt: skip

    a, b = run(0.01, True, 0.1), run(-0.01, False, 0.1 + 2e-6)
    assert flips(a, b) == ["rl", "check sft_fast"] and flips(a, a) == []
    table = side_by_side(a, b)
    assert "beats | +4.0 [-1.0, +9.0]: ties with **(flips)**" in table and table.count("(flips)") == 1
    assert "| runs with identical accuracy curves | 1 of 1 |" in table and "2e-06" in table
    assert "Every verdict" in side_by_side(a, a) and "differ between the runs: rl, check sft_fast" in table
