"""Issue 18's studies: the β = 0 ablation equals mix bitwise, mix with an adapter trains w, the slipped traces, the
seed-count rule and power against independent computations, the plateau premise, and every study's quick mode."""

import json
import math
import os
from statistics import NormalDist

import pytest
import torch
from peft import LoraConfig
from PIL import Image
from transformers import AutoModelForCausalLM, AutoTokenizer

from bridge_trl import BridgeTrainer
from bridge_trl.shadow import split_parameters
from bridge_trl.toy.base import shipped_base
from bridge_trl.toy.run import ToyRunSettings, method_args
from bridge_trl.toy.stats import t_quantile
from bridge_trl.toy.studies.common import power, seeds_for_halfwidth
from bridge_trl.toy.studies.plateau import plateau_check
from bridge_trl.toy.task import boxed_exact_match, slip_traces, toy_splits, trace_of

from .test_toy import _load_script


def _train(tmp_path, method, lrs, adapter, steps=3):
    """`steps` optimizer steps of the toy at its demo settings, from the shipped base: (θ by base name, w)."""
    path, splits = shipped_base(), toy_splits()
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
    peft = LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = BridgeTrainer(model, boxed_exact_match, processing_class=tokenizer, peft_config=peft if adapter else None,
                            args=method_args(method, lrs, 1, ToyRunSettings(max_steps=steps), str(tmp_path / method)),
                            train_dataset=splits["rl"], sft_dataset=splits["sft"])  # fmt: skip
    trainer.train()
    base, w = split_parameters(trainer.model)
    theta = {
        n.replace("base_model.model.", "").replace(".base_layer", ""): p.detach().clone() for n, p in base
    }
    return theta, {n: p.detach().clone() for n, p in w}, trainer


def test_bridge_with_beta_zero_equals_mix_bitwise(tmp_path):
    """w frozen (β = 0) leaves LoRA's B at 0, so π(θ, w) = π(θ) and θ's update is the joint loss's: the same bits as
    mix after 3 steps. θ moved, so the equality is not the trivial one."""
    torch.set_num_threads(1)
    initial = {
        n: p.detach().clone()
        for n, p in AutoModelForCausalLM.from_pretrained(shipped_base()).named_parameters()
    }
    theta_b, w, trainer = _train(
        tmp_path, "bridge", {"learning_rate": 3e-4, "adapter_learning_rate": 0.0}, True
    )
    assert trainer.shadow is not None  # the full BRIDGE step ran (θ̂ and the gain)
    theta_m, _, _ = _train(tmp_path, "mix", {"learning_rate": 3e-4}, False)
    assert theta_b.keys() == theta_m.keys()
    assert all(torch.equal(theta_b[k], theta_m[k]) for k in theta_m)
    assert any(not torch.equal(theta_m[k], initial[k]) for k in theta_m if k in initial)
    assert all((v == 0).all() for k, v in w.items() if "lora_B" in k)


def test_mix_with_an_adapter_trains_w_and_clips_per_group(tmp_path):
    """The ablation `mix_lora`: w moves on the joint loss alone, and its norm is clipped apart from θ's."""
    _, w, trainer = _train(
        tmp_path, "mix", {"learning_rate": 3e-4, "adapter_learning_rate": 3e-4}, True, steps=2
    )
    assert any((v != 0).any() for k, v in w.items() if "lora_B" in k)
    assert trainer.shadow is None
    logged = [h for h in trainer.state.log_history if "bridge/adapter_grad_norm" in h]
    assert len(logged) == 2 and all(h["bridge/adapter_grad_norm"] > 0 for h in logged)


def test_slipped_traces_have_one_wrong_last_step_and_a_consistent_answer():
    sft = toy_splits()["sft"]
    slipped_ds, slipped = slip_traces(sft, 0.5, seed=3)
    assert len(slipped) == 250 and slipped == slip_traces(sft, 0.5, seed=3)[1]
    assert slipped != slip_traces(sft, 0.5, seed=4)[1]
    for i, (prompt, good, bad) in enumerate(zip(sft["prompt"], sft["completion"], slipped_ds["completion"],
                                                strict=True)):  # fmt: skip
        terms = tuple(int(x) for x in prompt.rstrip("=").split("+"))
        assert good == trace_of(terms)
        if i not in slipped:
            assert bad == good
            continue
        head, last = bad.rsplit(",", 1)
        assert head == good.rsplit(",", 1)[0]  # the first step is untouched
        lhs, rest = last.split("=")
        wrong = int(rest.split(".")[0])
        assert abs(wrong - sum(terms)) == 1 and wrong >= 0 and lhs == good.rsplit(",", 1)[1].split("=")[0]
        assert boxed_exact_match([bad], [str(wrong)]) == [1.0]
    with pytest.raises(ValueError, match="share"):
        slip_traces(sft, 1.5)


def test_seed_count_and_power_against_direct_computation():
    # t(0.975, n-1) * 0.05 / sqrt(n): n = 8 gives 2.3646 * 0.05 / 2.828 = 0.0418 > 0.04; n = 9: 0.0384 <= 0.04
    assert seeds_for_halfwidth(0.05, 0.04, 5, 20) == 9
    assert seeds_for_halfwidth(0.01, 0.04, 5, 20) == 5  # already below at the pilot size
    assert seeds_for_halfwidth(1.0, 0.04, 5, 20) == 20  # the cap
    assert t_quantile(0.975, 8) == pytest.approx(2.3060, abs=1e-4)
    expected = NormalDist().cdf(0.04 * math.sqrt(9) / 0.05 - 2.3060)
    assert power(0.05, 9, 0.04) == pytest.approx(expected, abs=1e-3)
    assert power(None, 9, 0.04) is None


def _record(method, seed, mid, final):
    return {"method": method, "seed": seed, "steps": 30, "final_accuracy": final,
            "curve": [(0, 0, 0.2), (15, 0, mid), (30, 0, final)]}  # fmt: skip


def test_plateau_premise_reads_both_of_its_branches():
    rl = [_record("rl", s, 0.3, 0.40 + 0.01 * s) for s in (1, 2, 3)]
    below = [_record("sft", s, 0.30, 0.30 + 0.01 * s) for s in (1, 2, 3)]  # ends 10 points below RL, gains
    assert plateau_check(rl + below)["passed"]
    flat = [_record("sft", s, 0.50, 0.50 + (0.01, -0.01, 0.0)[s - 1]) for s in (1, 2, 3)]  # above RL, flat
    assert plateau_check(rl + flat)["passed"]
    rising = [_record("sft", s, 0.45, 0.55 + 0.01 * s) for s in (1, 2, 3)]  # above RL and still gaining
    check = plateau_check(rl + rising)
    assert not check["passed"] and check["numbers"]["last_half_gain"]["low"] > 0


def test_parts_quick_mode_writes_its_files(tmp_path):
    """`--study parts --quick` (pilot, more seeds, β = 0 arms) on 1 step and 8 evaluation sums, in the default suite;
    every study's quick mode is the slow test below (about 3 minutes)."""
    out = tmp_path / "study"
    _load_script().main(["--study", "parts", "--quick", "--max_steps", "1", "--eval_every", "1", "--eval_limit", "8",
                         "--output_dir", str(out)])  # fmt: skip
    data = json.loads((out / "parts" / "results.json").read_text())
    assert data["chosen_seeds"] in (2, 3) and {r["arm"].split("@")[0] for r in data["runs"]} == {
        "bridge", "mix", "mix_lora", "bridge_beta0"}  # fmt: skip
    assert all(v["max_abs_difference"] == 0.0 for v in data["beta0"].values())
    assert "## Verdict" in (out / "parts" / "results.md").read_text()
    assert (out / "parts" / "cooperative_gain.png").exists()


@pytest.mark.slow
def test_every_study_quick_mode_writes_its_files(tmp_path):
    """`--study all --quick` on 1 step and 8 evaluation sums: each study's results.{json,md} and figures, STUDY.md."""
    out = tmp_path / "study"
    results = _load_script().main(["--study", "all", "--quick", "--max_steps", "1", "--eval_every", "1",
                                   "--eval_limit", "8", "--output_dir", str(out)])  # fmt: skip
    figures = {"parts": ["curves.png", "cooperative_gain.png"], "noise": ["noise.png"], "lambda": ["curves.png"],
               "plateau": ["curves.png"]}  # fmt: skip
    for name, pngs in figures.items():
        data = json.loads((out / name / "results.json").read_text())
        assert data["study"] == name and data["quick"] and data["wall_seconds"] > 0 and data["runs"]
        assert results[name]["wall_seconds"] == data["wall_seconds"]
        text = (out / name / "results.md").read_text()
        assert "## Verdict" in text and "Quick mode" in text
        for png in pngs:
            with Image.open(out / name / png) as image:
                assert image.format == "PNG"
    parts = json.loads((out / "parts" / "results.json").read_text())
    assert all(v["max_abs_difference"] == 0.0 for v in parts["beta0"].values())  # β = 0 is mix, seed by seed
    noise = json.loads((out / "noise" / "results.json").read_text())
    assert {r["arm"] for r in noise["runs"]} >= {"rl@p0", "rl@p0.2", "bridge@p0.2", "sft@p0"}
    assert all("flip_rate" in r for r in noise["runs"] if "@p0.2" in r["arm"])
    plateau = json.loads((out / "plateau" / "results.json").read_text())
    assert {r["method"] for r in plateau["runs"]} == {"bridge", "mix", "alternating", "rl", "sft", "cold_start",
                                                      "chord", "luffy"}  # fmt: skip
    assert os.path.exists(out / "STUDY.md") and "Study `plateau`" in (out / "STUDY.md").read_text()


# Issue 24: fresh report seeds, verdicts gated on premises, replication on a second seed set, the parts count, C3's
# power, and the run cache that lets a replication reuse the test seeds' runs.


def test_report_seeds_are_disjoint_from_tuning_and_calibration_seeds(tmp_path):
    from bridge_trl.toy.studies.common import (
        CALIBRATION_SEEDS,
        REPLICATION_SEEDS,
        TEST_SEEDS,
        TUNING_SEEDS,
        check_disjoint,
    )
    from bridge_trl.toy.sweep import load_tuned

    used = {*TUNING_SEEDS, *CALIBRATION_SEEDS, *load_tuned()["seeds"]}
    assert not used & set(TEST_SEEDS) and not used & set(REPLICATION_SEEDS)
    assert not set(TEST_SEEDS) & set(REPLICATION_SEEDS)
    check_disjoint(TEST_SEEDS, used)
    with pytest.raises(ValueError, match=r"Seeds \[1, 2\] are tuning or calibration seeds"):
        check_disjoint([1, 2, 101], used)
    script = _load_script()
    for name, n in (("plateau", 10), ("noise", 3), ("lambda", 3), ("parts", 3)):
        seeds = script.study_seeds(name, script.parse_args(["--study", name]))
        assert len(seeds) == n and not used & set(seeds)
    assert script.study_seeds("noise", script.parse_args(["--study", "noise", "--quick"])) == [101, 102]
    with pytest.raises(ValueError, match="tuning or calibration seeds"):  # refused before any run
        script.main(["--study", "noise", "--quick", "--seeds", "2", "3", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="are test seeds"):
        script.main(["--study", "noise", "--quick", "--replicate", "--replicate_seeds", "101", "301", "--output_dir",
                     str(tmp_path)])  # fmt: skip


def _check(name, passed):
    return {"name": name, "passed": passed, "text": f"{name} text"}


def test_a_verdict_is_given_only_where_its_premises_hold():
    from bridge_trl.toy.studies.common import claim_word, gated_verdict

    text = "**C4 holds on the toy**: BRIDGE beats mix."
    assert gated_verdict("C4", [_check("rl_gain", True), _check("sft_fast", True)], "test", text) == text
    gated = gated_verdict("C4", [_check("rl_gain", True), _check("sft_plateau", False)], "test", text)
    assert "No verdict on C4" in gated and "sft_plateau (sft_plateau text)" in gated and "test split" in gated
    assert "rl_gain" not in gated and "holds" not in gated and "without a verdict" in gated
    assert claim_word(True, True) == "holds" and claim_word(False) == "does not hold"
    assert claim_word(True, False) == claim_word(False, False) == "no verdict (premises failed)"


def test_plateau_final_comparison_reports_no_verdict_when_a_premise_fails_on_test():
    """The gate on the plateau study's own records: SFT above RL-only and still gaining fails P3, so even a BRIDGE
    that beats every peer gets no C4 verdict."""
    from bridge_trl.toy.studies.common import gated_verdict
    from bridge_trl.toy.studies.plateau import _checks

    def rec(method, seed, early, mid, final):
        return {"method": method, "seed": seed, "steps": 30, "final_accuracy": final,
                "curve": [(0, 0, 0.2), (6, 0, early), (15, 0, mid), (30, 0, final)]}  # fmt: skip

    rl = [rec("rl", s, 0.24, 0.27, 0.28 + 0.01 * s) for s in (1, 2, 3)]
    sft = [rec("sft", s, 0.40, 0.34, 0.45 + 0.005 * s) for s in (1, 2, 3)]  # ahead of RL, rising at the end
    checks = _checks(rl + sft, 0.2)
    assert [c["name"] for c in checks] == ["rl_gain", "sft_fast", "sft_plateau"]
    assert [c["passed"] for c in checks] == [True, True, False]
    text = gated_verdict(
        "C4", checks, "test", "**C4 holds on the toy**: BRIDGE beats mix (+6.8 [+4.8, +8.8])."
    )
    assert text.startswith("**No verdict on C4**") and "sft_plateau" in text and "+6.8" not in text


def test_robustness_table_marks_verdicts_that_differ_between_seed_sets():
    from bridge_trl.toy.stats import paired_difference
    from bridge_trl.toy.studies.common import robustness_table

    def diff(values):
        return paired_difference(dict(enumerate(values)), dict.fromkeys(range(len(values)), 0.0))

    first = {"bridge vs mix": diff([0.05, 0.06, 0.07]), "bridge vs rl": diff([0.2, 0.21, 0.19])}
    second = {"bridge vs mix": diff([0.05, -0.06, 0.01]), "bridge vs rl": diff([0.18, 0.2, 0.22])}
    rows = robustness_table(first, second).splitlines()[2:]
    assert rows[0].startswith("| bridge vs mix |") and "beats" in rows[0] and "ties with" in rows[0]
    assert rows[0].endswith("**not robust** |")
    assert rows[1].startswith("| bridge vs rl |") and rows[1].endswith("| robust |")


def test_parts_gain_count_excludes_the_beta_zero_arms():
    from bridge_trl.toy.studies.parts import gain_outside

    def rec(arm, gains):
        return {"arm": arm, "method": "bridge", "cooperative_gain_curve": list(enumerate(gains))}

    records = [rec("bridge@0.0001", [0.1, 2.0, -0.5]), rec("bridge@0.0003", [-3.0, 0.2]),
               rec("bridge_beta0@0.0001", [5.0, 7.0, 0.0, 0.0]), {"arm": "mix@0.0001", "method": "mix"}]  # fmt: skip
    assert gain_outside(records, [1e-4, 3e-4]) == (2, 5)  # not (4, 9), which `method == "bridge"` counted
    assert gain_outside(records, [1e-4]) == (1, 3)


def test_lambda_reads_wide_ties_as_a_lack_of_power():
    from bridge_trl.toy.stats import paired_difference, verdict
    from bridge_trl.toy.studies.lam import robustness_reading

    def diff(values):
        d = paired_difference(dict(enumerate(values)), dict.fromkeys(range(len(values)), 0.0))
        return {**d, "verdict": verdict(d)}

    # 3 seeds, SD 0.1: half-width t(0.975, 2) * 0.1 / sqrt(3) = 4.303 * 0.0577 = 0.248 -> a tie that admits -24.8
    wide = diff([0.1, 0.0, -0.1])
    assert wide["ci"] == pytest.approx(4.3027 * 0.1 / math.sqrt(3), abs=1e-3)
    claim, text = robustness_reading([wide, diff([0.0, 0.01, -0.01])])
    assert claim == "not shown" and "lack of power" in text and "24.8" in text
    claim, text = robustness_reading(
        [diff([0.01, 0.0, -0.01]), diff([0.0, 0.01, -0.01])]
    )  # within ±2.5 points
    assert claim == "holds"
    assert robustness_reading([diff([-0.10, -0.11, -0.12]), wide])[0] == "does not hold"


def test_run_cells_reuses_a_finished_record_only_for_the_same_cell_and_data(tmp_path):
    from bridge_trl.toy.run import Cell, cell_key, data_fingerprint, run_cells

    splits = {k: v.select(range(4)) for k, v in toy_splits().items() if k in ("rl", "sft", "test")}
    cell = Cell("mix", 101, {"learning_rate": 1e-4}, ToyRunSettings(), "mix@x")
    fp = data_fingerprint(splits, "test")
    key = cell_key(cell, fp, "test")
    assert key.startswith("mix@x-seed101-") and key == cell_key(cell, fp, "test")
    assert key != cell_key(Cell("mix", 101, {"learning_rate": 3e-4}, ToyRunSettings(), "mix@x"), fp, "test")
    assert key != cell_key(Cell("mix", 101, {"learning_rate": 1e-4}, ToyRunSettings(max_steps=3), "mix@x"), fp,
                           "test")  # fmt: skip
    slipped = {**splits, "sft": slip_traces(splits["sft"], 1.0, direction="up")[0]}
    assert (
        data_fingerprint(slipped, "test") != fp
        and cell_key(cell, data_fingerprint(slipped, "test"), "test") != key
    )
    (tmp_path / "records").mkdir()
    (tmp_path / "records" / key).write_text(json.dumps({"arm": "mix@x", "seed": 101, "final_accuracy": 0.5}))
    # reused without training: the base path does not exist, so a run would fail
    assert run_cells([cell], str(tmp_path / "no-base"), splits, "test", str(tmp_path), reuse=True) == [
        {"arm": "mix@x", "seed": 101, "final_accuracy": 0.5}]  # fmt: skip


@pytest.mark.slow  # 16 one-step runs in spawned workers: ~40 s quiet, minutes on a loaded machine
def test_lambda_replicate_quick_mode_compares_two_seed_sets(tmp_path):
    """`--study lambda --replicate --quick` (1 step, 8 sums): the study on test seeds 101-102 and on 201-202, and a
    replication.md that compares every verdict across the two."""
    out = tmp_path / "study"
    result = _load_script().main(["--study", "lambda", "--replicate", "--quick", "--max_steps", "1", "--eval_every",
                                  "1", "--eval_limit", "8", "--output_dir", str(out)])["lambda"]  # fmt: skip
    data = json.loads((out / "lambda" / "replication.json").read_text())
    assert data["test"]["seeds"] == [101, 102] and data["replication"]["seeds"] == [201, 202]
    assert data["robust"] == (data["test"]["claim"] == data["replication"]["claim"]) == result["robust"]
    assert (
        set(data["test"]["verdicts"])
        == set(data["replication"]["verdicts"])
        >= {"bridge@const0.5 vs mix@const0.5"}
    )
    text = (out / "lambda" / "replication.md").read_text()
    assert "| comparison | test seeds | replication seeds | across the two |" in text
    runs = json.loads((out / "lambda" / "replicate" / "results.json").read_text())["runs"]
    assert {r["seed"] for r in runs} == {201, 202}


@pytest.mark.slow
def test_plateau_replicate_quick_mode(tmp_path):
    """`--study plateau --replicate --quick`: the committed regime's final comparison on 101-102 and 201-202, no
    tuning or calibration run, C4's verdict gated on the test premises in both."""
    out = tmp_path / "study"
    _load_script().main(["--study", "plateau", "--replicate", "--quick", "--max_steps", "1", "--eval_every", "1",
                         "--eval_limit", "8", "--output_dir", str(out)])  # fmt: skip
    data = json.loads((out / "plateau" / "replication.json").read_text())
    assert data["regime"]["share"] == 0.6 and "committed" in data["regime_source"]
    for part, seeds in (("test", [101, 102]), ("replication", [201, 202])):
        assert data[part]["seeds"] == seeds and {r["seed"] for r in data[part]["runs"]} == set(seeds)
        assert data[part]["premises_hold"] == all(c["passed"] for c in data[part]["test_checks"])
        assert ("No verdict" in data[part]["verdict_text"]) == (not data[part]["premises_hold"])
    assert data[part]["lrs"]["cold_start"] == {"learning_rate": 3e-5, "sft_learning_rate": 9e-5}
    assert "across the two seed sets" in (out / "plateau" / "replication.md").read_text()


def test_attribution_quick_mode_and_its_gated_readings(tmp_path):
    """Issue 27: `--study attribution --quick` (1 step, 8 sums) tunes β for bridge and mix_lora in both regimes on
    validation seeds only, runs the three arms on test seeds 101-102 and the long budget, and writes a reading per
    (regime, budget) that follows the design's rule; a β optimum on an edge gives no reading."""
    from bridge_trl.toy.studies.attribution import reading

    out = tmp_path / "study"
    _load_script().main(["--study", "attribution", "--quick", "--max_steps", "1", "--eval_every", "1",
                         "--eval_limit", "8", "--output_dir", str(out)])  # fmt: skip
    data = json.loads((out / "attribution" / "results.json").read_text())
    assert {r["arm"] for r in data["runs"]} == {"bridge@demo", "mix_lora@demo", "mix@demo", "bridge@plateau",
                                                "mix_lora@plateau", "mix@plateau", "bridge@demox4", "mix_lora@demox4"}  # fmt: skip
    assert {r["seed"] for r in data["runs"]} == {101, 102} and {r["seed"] for r in data["trials"]} == {1}
    assert all(r["eval_split"] == "val" for r in data["trials"])
    assert all(r["eval_split"] == "test" for r in data["runs"])
    lora = [r for r in data["runs"] if r["arm"].startswith("mix_lora")]
    assert all(r["method"] == "mix" and r["settings"]["adapter"] for r in lora)
    assert {r["steps"] for r in data["runs"] if r["arm"].endswith("x4")} == {4}
    assert data["prefix_check"] == 0.0  # a long run read at the demo's budget is the demo-budget run
    assert set(data["readings"]) == {"demo x1", "demo x2", "demo x4", "plateau x1"}
    for key, v in data["readings"].items():
        assert v["reading"] == reading(v["difference"], data["tuned"][key.split()[0]])
    assert "## Verdict" in (out / "attribution" / "results.md").read_text()
    # the rule itself, against hand-made differences: a premise that failed gives no reading whatever the CI
    d = {"mean": 0.05, "ci": 0.01, "low": 0.04, "high": 0.06, "n": 4}
    assert reading(d, True).startswith("the gain term changes the result (up)")
    assert reading(d, False).startswith("no reading")
    assert reading({**d, "mean": 0.0, "low": -0.02, "high": 0.02}, True).startswith("no effect beyond ±3")
    assert reading({**d, "mean": 0.0, "low": -0.05, "high": 0.05}, True).startswith("not shown")


def test_peers_quick_mode_tunes_on_validation_before_any_test_run(tmp_path, monkeypatch):
    """`--study peers --quick` (1 step, 8 evaluation sums): the new arms are tuned on the validation split with the
    tuning seed before any run reads the test split; the final comparison runs the quick arms on the test and the
    replication seeds; a verdict is given exactly where the premises held on both seed sets and the sets agree."""
    from bridge_trl.toy.studies import common, peers

    calls = []
    real = common.run_cells

    def spy(cells, base_path, splits, split, *args, **kwargs):  # every pool the study starts, in order
        calls.append((split, [(c.arm or c.method, c.method, c.seed) for c in cells]))
        return real(cells, base_path, splits, split, *args, **kwargs)

    monkeypatch.setattr(common, "run_cells", spy)
    out = tmp_path / "study"
    _load_script().main(["--study", "peers", "--quick", "--max_steps", "1", "--eval_every", "1", "--eval_limit", "8",
                         "--output_dir", str(out)])  # fmt: skip
    data = json.loads((out / "peers" / "results.json").read_text())
    new = {"hpt": "hpt", "relift": "relift", "cold_start_val_loss": "cold_start"}
    assert (
        data["best_baseline"] == "alternating"
    )  # tuned.json: 62.0% on validation at 3e-5, the eight's largest
    assert [split for split, _ in calls] == ["val", "test"]  # tuning first, and no test-split run during it
    assert {(a, m) for a, m, _ in calls[0][1]} == set(new.items()) and {s for *_, s in calls[0][1]} == {1}
    quick_arms = ("bridge", "alternating", *new)
    assert sorted((a, s) for a, _, s in calls[1][1]) == sorted(
        (a, s) for a in quick_arms for s in (101, 102, 201, 202))  # fmt: skip
    assert all(r["eval_split"] == "val" for r in data["trials"]) and len(data["trials"]) == 3
    assert all(r["eval_split"] == "test" for r in data["runs"] + data["replication_runs"])
    assert all(
        r["settings"]["cold_start_switch"] == "val_loss"
        for r in data["runs"]
        if r["arm"] == "cold_start_val_loss"
    )
    assert all(r["method"] == new.get(r["arm"], r["arm"]) for r in data["runs"])
    lrs = data["learning_rates"]
    assert lrs["relift"]["sft_learning_rate"] == pytest.approx(10 * lrs["relift"]["learning_rate"])
    assert list(lrs["hpt"]) == ["learning_rate"] and lrs["bridge"] == {
        "learning_rate": 1e-4,
        "adapter_learning_rate": 1e-4,
    }
    assert peers.final_arms("alternating")[0] == ["bridge", "mix", "alternating", "rl", "sft", "cold_start", "chord",
                                                  "luffy", *new]  # fmt: skip
    # the gate on this run's own comparisons ...
    for v, d1, d2 in zip(data["final_verdicts"], data["diffs"]["test seeds"], data["diffs"]["replication seeds"],
                         strict=True):  # fmt: skip
        given = d1["premises_hold"] and d2["premises_hold"] and d1["verdict"] == d2["verdict"]
        assert (v["verdict"] is not None) == given and v["verdict"] in (None, d1["verdict"])
    assert "## Verdict" in (out / "peers" / "results.md").read_text()

    # ... and on constructed ones, each branch
    def diff(word, held):
        return {
            "a": "hpt",
            "b": "bridge",
            "verdict": word,
            "premises": [{"passed": held, "text": "gate fired"}],
        }

    assert peers.final_verdict(diff("beats", True), diff("beats", True))["verdict"] == "beats"
    differs = peers.final_verdict(diff("beats", True), diff("ties with", True))
    assert differs["verdict"] is None and differs["reason"].startswith("not robust")
    failed = peers.final_verdict(diff("beats", True), diff("beats", False))
    assert failed["verdict"] is None and failed["reason"] == "premise failed: gate fired"
    runs = [{"arm": "relift", "sft_samples": 64.0}, {"arm": "relift", "sft_samples": 0.0}]
    assert (
        not peers.mechanism_check(runs, "relift")["passed"]
        and peers.mechanism_check(runs[:1], "relift")["passed"]
    )


def test_attribution_followup_sizes_n_from_the_pooled_sd():
    """The follow-up's n: the study's rule at the pooled paired SD of BRIDGE − mix_lora over the study's two seed
    sets (each set's sample variance, averaged), checked against a hand computation with tabulated t quantiles."""
    from bridge_trl.toy.studies.attribution_power import pooled_sd
    from bridge_trl.toy.studies.common import seeds_for_halfwidth

    def runs(diffs):  # mix_lora at 0.40, bridge at 0.40 + d, seeds 1..n
        return [{"arm": a, "seed": s, "final_accuracy": 0.40 + (d if a == "bridge@demo" else 0.0)}
                for s, d in enumerate(diffs, 1) for a in ("bridge@demo", "mix_lora@demo")]  # fmt: skip

    first, second = [0.216, -0.044, 0.08, 0.14], [0.028, 0.096, 0.064, 0.084]
    study = {"test": {"runs": runs(first)}, "replication": {"runs": runs(second)}}

    def var(x):
        m = sum(x) / len(x)
        return sum((v - m) ** 2 for v in x) / (len(x) - 1)

    expected = math.sqrt((var(first) + var(second)) / 2)
    assert pooled_sd(study, "demo") == pytest.approx(expected, abs=1e-9)
    assert expected == pytest.approx(0.0804, abs=5e-4)
    # t(0.975; 29) = 2.0452, t(0.975; 30) = 2.0423: 30 seeds give 3.004 points at SD 8.04, 31 give 2.95
    assert 2.0452 * expected / math.sqrt(30) > 0.03 >= 2.0423 * expected / math.sqrt(31)
    assert (
        seeds_for_halfwidth(expected, 0.03, 2, 40) == 31 and seeds_for_halfwidth(expected, 0.03, 2, 30) == 30
    )


@pytest.mark.slow
def test_attribution_replicate_and_followup_quick_mode(tmp_path):
    """The study, its replication and its follow-up in quick mode (1 step): the follow-up reads the study's rates,
    runs bridge and mix_lora only on its two fresh sets, and marks a reading robust exactly when A and B agree."""
    out, quick = tmp_path / "study", ["--quick", "--max_steps", "1", "--eval_every", "1", "--eval_limit", "8"]
    main = _load_script().main
    main(["--study", "attribution", *quick, "--output_dir", str(out)])
    main(["--study", "attribution", "--replicate", "--reuse", *quick, "--output_dir", str(out)])
    main(["--study", "attribution", "--followup", *quick, "--output_dir", str(out)])
    data = json.loads((out / "attribution" / "followup.json").read_text())
    study = json.loads((out / "attribution" / "results.json").read_text())
    assert data["betas"] == study["betas"] and data["n"] == 2
    assert {r["seed"] for r in data["runs"]} == {301, 302} and {
        r["seed"] for r in data["replication_runs"]
    } == {401, 402}
    assert {r["arm"] for r in data["runs"]} == {
        "bridge@demo",
        "mix_lora@demo",
        "bridge@plateau",
        "mix_lora@plateau",
    }
    for name, same in data["robust"].items():
        words = {data["readings"][label][name]["reading"] for label in ("follow-up A", "follow-up B")}
        assert same == (len(words) == 1)
    assert "## Verdict" in (out / "attribution" / "followup.md").read_text()
