"""Cold start with a measured switch (`cold_start_switch: val_loss`, `bridge_trl.cold_start`).

The held-out loss is stubbed as a function of the step, so the switch step follows from the patience / minimum-delta
rule alone; the real held-out loss is checked separately against a direct computation.
"""

import pytest
import torch
from datasets import Dataset

from bridge_trl.checkpoint import load_trainer_extras
from bridge_trl.cold_start import SaturationTracker, held_out_split

from .helpers import assert_dicts_close, make_config, make_trainer
from .test_cold_start import adam_steps, rl_prompts, rollouts

LR, CAP, STEPS = 1e-2, 6, 8
OPT = dict(optim="adamw_torch", learning_rate=LR, lr_scheduler_type="linear", warmup_steps=1, beta=0.0)
# Patience 2, min delta 0.05: 1.0 → 0.8 improves; 0.78 and 0.77 do not beat 0.8 − 0.05 → switch after step 4.
STUB = {1: 1.0, 2: 0.8, 3: 0.78, 4: 0.77, 5: 0.5, 6: 0.4, 7: 0.3, 8: 0.2}
SWITCH = 4


def measured(tmp_path, make_model, tokenizer, sft_dataset, stub=STUB, **kw):
    kw = {"max_steps": STEPS, "cold_start_sft_steps": CAP, "cold_start_switch": "val_loss", "cold_start_val_size": 2,
          "cold_start_eval_steps": 1, "cold_start_patience": 2, "cold_start_min_delta": 0.05, **OPT, **kw}  # fmt: skip
    trainer = make_trainer(
        tmp_path, make_model(), tokenizer, rl_prompts(), sft_dataset, method="cold_start", **kw
    )
    trainer.rollout_func = rollouts
    if stub is not None:
        trainer.cold_start_val.val_loss = lambda: stub[trainer.state.global_step]
    return trainer


def test_saturation_rule_hand_values():
    tracker = SaturationTracker(patience=2, min_delta=0.05)
    assert [tracker.update(s, STUB[s]) for s in range(1, 5)] == [False, False, False, True]
    assert tracker.switch_step == SWITCH and tracker.best == 0.8 and tracker.bad == 2
    plain = SaturationTracker(patience=2, min_delta=0.0)  # every drop counts: 0.78, 0.77 improve
    assert not any(plain.update(s, STUB[s]) for s in range(1, 9)) and plain.switch_step is None
    flat = SaturationTracker(patience=1, min_delta=0.0)
    assert [flat.update(s, v) for s, v in ((1, 1.0), (2, 1.0))] == [
        False,
        True,
    ]  # equal is not an improvement


def test_held_out_split():
    train, val = held_out_split(20, 0.25, seed=3)
    assert len(val) == 5 and sorted(train + val) == list(range(20))
    assert held_out_split(20, 0.25, seed=3) == (train, val) and held_out_split(20, 0.25, seed=4) != (
        train,
        val,
    )
    assert len(held_out_split(20, 3, seed=0)[1]) == 3
    assert len(held_out_split(20, 3, seed=0, multiple=2)[1]) == 4  # an equal share per process
    with pytest.raises(ValueError, match="leaving none"):
        held_out_split(4, 4, seed=0)


@pytest.mark.filterwarnings("ignore:You are using 'rollout_func'")
def test_switch_where_the_loss_stops_improving(tmp_path, make_model, tokenizer, sft_dataset):
    trainer = measured(tmp_path, make_model, tokenizer, sft_dataset)
    trainer.train()
    logs = {h["step"]: h for h in trainer.state.log_history if "loss" in h}
    assert [s for s in logs if "bridge/sft_loss" in logs[s]] == list(range(1, SWITCH + 1))
    assert [s for s in logs if "bridge/rl_loss" in logs[s]] == list(range(SWITCH + 1, STEPS + 1))
    assert [logs[s].get("cold_start/val_loss") for s in logs] == [STUB[s] for s in range(1, SWITCH + 1)] + [
        None
    ] * 4
    assert [s for s in logs if "cold_start/switch_step" in logs[s]] == [SWITCH]
    assert logs[SWITCH]["cold_start/switch_step"] == SWITCH
    assert adam_steps(trainer.optimizer) == {STEPS - SWITCH}  # fresh optimizer state at the switch
    # SFT phase: linear over the cap (6 steps, 1 warm-up), cut at 4; RL phase: linear over the remaining 4 steps.
    lrs = [logs[s]["learning_rate"] for s in logs]
    assert lrs == pytest.approx([0.0, LR, LR * 4 / 5, LR * 3 / 5, 0.0, LR, LR * 2 / 3, LR / 3], rel=1e-9)


@pytest.mark.filterwarnings("ignore:You are using 'rollout_func'")
def test_cap_ends_the_sft_phase_when_the_loss_keeps_improving(tmp_path, make_model, tokenizer, sft_dataset):
    falling = {s: 1.0 - 0.1 * s for s in range(1, STEPS + 1)}
    trainer = measured(tmp_path, make_model, tokenizer, sft_dataset, stub=falling)
    trainer.train()
    logs = {h["step"]: h for h in trainer.state.log_history if "loss" in h}
    assert [s for s in logs if "bridge/rl_loss" in logs[s]] == list(range(CAP + 1, STEPS + 1))
    assert logs[CAP]["cold_start/switch_step"] == CAP and "cold_start/val_loss" not in logs[CAP]


@pytest.mark.filterwarnings("ignore:You are using 'rollout_func'")
def test_resume_keeps_the_measured_switch(tmp_path, make_model, tokenizer, sft_dataset):
    full = measured(
        tmp_path / "full", make_model, tokenizer, sft_dataset, save_strategy="steps", save_steps=1
    )
    full.train()
    final = full.get_base_state_dict()
    saved = load_trainer_extras(str(tmp_path / "full" / "out" / "checkpoint-3"))["cold_start"]
    assert saved["bad"] == 1 and saved["switch_step"] is None
    # Step 3: one evaluation without improvement so far; step 5: past the switch (before the cap, 6).
    for step in (3, 5):
        resumed = measured(tmp_path / f"r{step}", make_model, tokenizer, sft_dataset)
        resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "out" / f"checkpoint-{step}"))
        assert resumed.cold_start_val.switch_step == SWITCH
        assert_dicts_close(resumed.get_base_state_dict(), final, atol=0, rtol=0)
        assert adam_steps(resumed.optimizer) == {STEPS - SWITCH}


def test_held_out_slice_is_not_trained_on_and_its_loss(tmp_path, make_model, tokenizer, sft_dataset):
    trainer = measured(tmp_path, make_model, tokenizer, sft_dataset, stub=None)
    held_out, trained = trainer.cold_start_val.held_out, trainer.sft_stream.dataset
    assert len(held_out) == 2 and len(trained) == len(sft_dataset) - 2
    key = lambda d: {tuple(p) for p in d["prompt_ids"]}  # noqa: E731
    assert not key(held_out) & key(trained) and len(key(held_out) | key(trained)) == len(sft_dataset)
    assert trainer.sft_stream.sampler.n == len(trained)  # the stream samples only the training part
    # The held-out loss: one token mean of the NLL over the slice, under θ⁰, computed directly.
    model = make_model()
    nll, count = 0.0, 0
    for p_ids, c_ids in zip(held_out["prompt_ids"], held_out["completion_ids"], strict=True):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p_ids + c_ids])).logits[0, len(p_ids) - 1 : -1].double()
        nll -= torch.log_softmax(logits, -1)[torch.arange(len(c_ids)), torch.tensor(c_ids)].sum().item()
        count += len(c_ids)
    assert trainer.cold_start_val.val_loss() == pytest.approx(nll / count, rel=1e-5)


def test_switch_field_errors(tmp_path):
    for bad, match in (({"cold_start_switch": "loss"}, "cold_start_switch"),
                       ({"cold_start_val_size": 0.0}, "cold_start_val_size"),
                       ({"cold_start_val_size": 2.5}, "cold_start_val_size"),
                       ({"cold_start_patience": 0}, "cold_start_patience"),
                       ({"cold_start_eval_steps": 0}, "cold_start_eval_steps"),
                       ({"cold_start_min_delta": -0.1}, "cold_start_min_delta")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            make_config(tmp_path, method="cold_start", max_steps=4, **bad)
    assert make_config(tmp_path, method="cold_start", max_steps=4).cold_start_switch == "ratio"


def test_ratio_switch_has_no_held_out_slice(tmp_path, make_model, tokenizer, sft_dataset):
    trainer = make_trainer(tmp_path, make_model(), tokenizer, Dataset.from_dict({"prompt": ["3+4="] * 8}),
                           sft_dataset, method="cold_start", max_steps=4)  # fmt: skip
    assert trainer.cold_start_val is None and len(trainer.sft_stream.dataset) == len(sft_dataset)
