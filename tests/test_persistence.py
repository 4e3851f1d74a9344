"""Saving, reloading with plain `from_pretrained`, resuming, and stopping cleanly on a non-finite loss."""

import os

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from .helpers import assert_dicts_close, make_trainer, snapshot


def completion_logps(model, tokenizer):
    ids = torch.tensor([tokenizer("12+30=42. \\boxed{42}")["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].double()
    return torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1)


def test_save_then_reload_reproduces_the_policy(tmp_path, make_model, tokenizer, rl_dataset, sft_dataset):
    trainer = make_trainer(
        tmp_path, make_model(), tokenizer, rl_dataset, sft_dataset, max_steps=2, save_merged=True
    )
    trainer.train()
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    trained = completion_logps(trainer.model, tokenizer)

    base = AutoModelForCausalLM.from_pretrained(out)
    assert base.lm_head.weight is base.model.embed_tokens.weight  # still tied
    assert_dicts_close(dict(base.state_dict().items()), trainer.get_base_state_dict(), atol=0, rtol=0)
    policy = PeftModel.from_pretrained(base, out / "adapter")
    torch.testing.assert_close(completion_logps(policy, tokenizer), trained, atol=1e-6, rtol=0)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    torch.testing.assert_close(completion_logps(merged, tokenizer), trained, atol=1e-4, rtol=0)
    # The trained base differs from the policy: the adapter matters.
    assert (completion_logps(AutoModelForCausalLM.from_pretrained(out), tokenizer) - trained).abs().max() > 0


def test_model_card_names_the_method(tmp_path, make_model, tokenizer, rl_dataset, sft_dataset):
    trainer = make_trainer(tmp_path, make_model(), tokenizer, rl_dataset, sft_dataset)
    trainer.create_model_card(model_name="tiny-bridge")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "BRIDGE" in card and "2509.06948" in card


def test_resume_from_checkpoint_continues_exactly(tmp_path, make_model, tokenizer, rl_dataset, sft_dataset):
    kw = {
        "max_steps": 4,
        "save_strategy": "steps",
        "save_steps": 2,
        "optim": "adamw_torch",
        "learning_rate": 1e-2,
    }
    full = make_trainer(tmp_path / "full", make_model(), tokenizer, rl_dataset, sft_dataset, **kw)
    full.train()
    checkpoint = tmp_path / "full" / "out" / "checkpoint-2"
    assert (checkpoint / "bridge_state.pt").exists() and (checkpoint / "adapter").is_dir()

    resumed = make_trainer(tmp_path / "resumed", make_model(seed=7), tokenizer, rl_dataset, sft_dataset, **kw)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for a, b in zip(snapshot(full), snapshot(resumed), strict=True):
        assert_dicts_close(a, b, atol=1e-6, rtol=1e-5)
    keys = ["bridge/sft_loss", "bridge/rl_loss", "bridge/shadow_rl_loss", "reward"]

    def late(t):
        return [h[k] for h in t.state.log_history if "bridge/sft_loss" in h and h["step"] > 2 for k in keys]

    assert len(late(full)) == 2 * len(keys)
    assert late(full) == pytest.approx(late(resumed), abs=1e-6)

    # Without θ̂'s file the run cannot continue where it stopped: a clear error, not a silent restart of θ̂ from θ.
    (checkpoint / "bridge_state.pt").unlink()
    again = make_trainer(tmp_path / "again", make_model(seed=7), tokenizer, rl_dataset, sft_dataset, **kw)
    with pytest.raises(FileNotFoundError, match="bridge_state.pt"):
        again.train(resume_from_checkpoint=str(checkpoint))


def test_non_finite_loss_stops_and_keeps_last_checkpoint(
    tmp_path, make_model, tokenizer, rl_dataset, sft_dataset
):
    trainer = make_trainer(tmp_path, make_model(), tokenizer, rl_dataset, sft_dataset, max_steps=3,
                           save_strategy="steps", save_steps=1)  # fmt: skip
    grpo_loss = trainer.compute_loss

    def diverging_loss(model, inputs, **kwargs):  # the GRPO loss blows up from step 1 on
        loss = grpo_loss(model, inputs, **kwargs)
        return loss if trainer.state.global_step < 1 else loss * float("nan")

    trainer.compute_loss = diverging_loss
    with pytest.raises(FloatingPointError, match="Non-finite loss at step 1"):
        trainer.train()
    checkpoint = tmp_path / "out" / "checkpoint-1"
    assert not (tmp_path / "out" / "checkpoint-2").exists()
    weights = load_file(os.path.join(checkpoint, "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())
    # Nothing moved after the failure: the live weights are still those of checkpoint 1.
    assert_dicts_close(
        dict(weights.items()),
        {k: v for k, v in trainer.get_base_state_dict().items() if k in weights},
        atol=0,
        rtol=0,
    )


def test_kill_during_save_resumes_from_last_complete_checkpoint(tmp_path):
    """SIGKILL a run while it writes checkpoint-2; `resume_from_checkpoint=True` skips it and resumes from checkpoint-1."""
    import json
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    script = Path(__file__).resolve().parent / "scripts" / "run_bridge.py"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1", "BRIDGE_TEST_SAVE": "1",
           "BRIDGE_TEST_MAX_STEPS": "3"}  # fmt: skip
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(script), str(out)], env={**env, "BRIDGE_TEST_STALL_AT": "2"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 300
    while not (out / "stalled").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert (out / "stalled").exists(), "the run did not reach the stalled save"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "checkpoint-2").is_dir() and not (out / "checkpoint-2" / "trainer_state.json").exists()

    resumed = subprocess.run([sys.executable, str(script), str(out)], env={**env, "BRIDGE_TEST_RESUME": "1"},
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Skipping" in resumed.stderr and "checkpoint-2" in resumed.stderr
    steps = [h["step"] for h in json.loads((out / "log.json").read_text()) if "bridge/sft_loss" in h]
    assert steps == [1, 2, 3]  # step 1's log comes back with checkpoint-1's trainer state
    # The resumed run ends exactly where an uninterrupted one does.
    straight = subprocess.run([sys.executable, str(script), str(tmp_path / "straight")], env=env, timeout=300,
                              capture_output=True, text=True)  # fmt: skip
    assert straight.returncode == 0, straight.stderr[-3000:]
    resumed_states, straight_states = (
        torch.load(out / "states.pt"),
        torch.load(tmp_path / "straight" / "states.pt"),
    )
    for a, b in zip(resumed_states[:3], straight_states[:3], strict=True):  # (θ, θ̂, w) at the end
        assert_dicts_close(a, b, atol=1e-6, rtol=1e-5)


def test_accessors_before_during_and_after_training(tmp_path, make_model, tokenizer, rl_dataset, sft_dataset):
    """θ, θ̂ and w can be read before `train()` (θ̂ = θ⁰), from a callback, and after, with the same values."""
    from transformers import TrainerCallback

    trainer = make_trainer(tmp_path, make_model(), tokenizer, rl_dataset, sft_dataset, max_steps=2)
    theta0 = make_model().state_dict()
    before = snapshot(trainer)
    assert_dicts_close(before[0], theta0, atol=0, rtol=0)
    assert_dicts_close(before[1], theta0, atol=0, rtol=0)
    during = {}

    class Read(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            during[state.global_step] = snapshot(trainer)

    trainer.add_callback(Read())
    trainer.train()
    after = snapshot(trainer)
    for got, want in zip(during[2], after, strict=True):
        assert_dicts_close(got, want, atol=0, rtol=0)
    assert max((during[1][1][k] - during[1][0][k]).abs().max() for k in theta0) > 0  # θ̂ ≠ θ after step 1
    rl = make_trainer(tmp_path / "rl", make_model(), tokenizer, rl_dataset, sft_dataset, method="rl")
    with pytest.raises(ValueError, match="no shadow"):
        rl.get_shadow_state_dict()
    assert rl.get_adapter_state_dict() == {} and rl.get_base_state_dict().keys() == theta0.keys()
