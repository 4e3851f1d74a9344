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
