"""ReLIFT (`method: relift`): the buffer of failed prompts, its SFT update and its checkpoint, on the tiny model.

The RL prompts come in dataset order (`shuffle_dataset=False`, 2 prompts × 4 rollouts per step) and the reward is a
function of the prompt only, so every group's rewards are equal: GRPO's advantages, hence its gradient, are exactly
0, and with plain SGD θ moves only through ReLIFT's SFT updates, which are then checked against a direct computation.
"""

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from bridge_trl import BridgeTrainer
from bridge_trl.checkpoint import load_trainer_extras
from bridge_trl.relift import failed_groups, push_and_pop

from .conftest import toy_reward
from .helpers import ROLLOUTS_SCRIPT_HEAD, assert_dicts_close, make_config

TRACED = [f"{i}+{i + 1}=" for i in range(6)]  # the `sft_dataset` fixture's prompts (one trace each)
UNTRACED, SOLVED = "50+51=", TRACED[5]
# Steps (2 prompts each): [T0 T1] [T2 T3] [U T4] [T5 T0]; every prompt but T5 fails, U has no trace.
ORDER = [TRACED[0], TRACED[1], TRACED[2], TRACED[3], UNTRACED, TRACED[4], SOLVED, TRACED[0]]
SFT_LR, SIZE = 0.5, 3
SGD = dict(optim="sgd", weight_decay=0.0, max_grad_norm=0.0, lr_scheduler_type="constant", beta=0.0)


def solved_reward(completions, prompts, **kwargs):
    return [1.0 if p == SOLVED else 0.0 for p in prompts]


class BufferProbe(TrainerCallback):
    def __init__(self, trainer):
        self.trainer, self.buffers = trainer, []

    def on_step_end(self, args, state, control, **kwargs):
        decode = self.trainer.processing_class.decode
        self.buffers.append([decode(p) for p, _ in self.trainer.relift_buffer])


def relift(tmp_path, make_model, tokenizer, sft_dataset, reward=solved_reward, rl=None, **overrides):
    defaults = dict(relift_buffer_size=SIZE, sft_learning_rate=SFT_LR, per_device_sft_batch_size=2,
                    max_completion_length=16, shuffle_dataset=False, **SGD)  # fmt: skip
    args = make_config(tmp_path, method="relift", **{**defaults, **overrides})
    rl = rl if rl is not None else Dataset.from_dict({"prompt": ORDER})
    trainer = BridgeTrainer(make_model(), reward, args=args, train_dataset=rl, sft_dataset=sft_dataset,
                            processing_class=tokenizer)  # fmt: skip
    probe = BufferProbe(trainer)
    trainer.add_callback(probe)
    return trainer, probe


def direct_sft_step(model, tokenizer, sft_dataset, prompts: list[str], lr: float) -> dict:
    """θ − lr ∇ [Σ NLL / #tokens] over (prompt, trace) pairs, one example at a time, from the model's logits."""
    theta0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    traces = dict(zip(sft_dataset["prompt"], sft_dataset["completion"], strict=True))
    nll, count = 0.0, 0
    for prompt in prompts:
        p_ids = tokenizer(prompt)["input_ids"]
        c_ids = tokenizer(traces[prompt], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        logits = model(input_ids=torch.tensor([p_ids + c_ids])).logits[0, len(p_ids) - 1 : -1].double()
        nll = nll - torch.log_softmax(logits, -1)[torch.arange(len(c_ids)), torch.tensor(c_ids)].sum()
        count += len(c_ids)
    (nll / count).backward()
    grads = {n: p.grad.double() for n, p in model.named_parameters()}
    grads["lm_head.weight"] = grads["model.embed_tokens.weight"]  # tied embeddings
    return {k: theta0[k].double() - lr * grads[k] for k in theta0}, count


def test_failed_groups_and_buffer_rule_hand_values():
    rewards = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, -1.0, 0.0, float("nan"), 0.0])
    assert failed_groups(rewards, 4, 0.0) == [0, 2]  # group 1 has one success; NaN (unscorable) counts 0
    assert failed_groups(rewards, 4, -0.5) == []
    assert failed_groups(rewards, 2, 0.0) == [0, 1, 3, 4, 5]
    # New examples go in front; at >= size the first `size` leave, the overflow stays (the reference's slicing).
    assert push_and_pop(["a", "b"], ["c", "d"], 3) == (["b"], ["c", "d", "a"])
    assert push_and_pop(["a"], ["b"], 3) == (["b", "a"], None)
    assert push_and_pop([], ["a", "b", "c"], 3) == ([], ["a", "b", "c"])


def test_buffer_fills_fires_one_sft_update_and_keeps_the_overflow(
    tmp_path, make_model, tokenizer, sft_dataset
):
    trainer, probe = relift(tmp_path, make_model, tokenizer, sft_dataset, max_steps=2)
    trainer.train()
    # Step 1 buffers T0, T1 (2 < 3); step 2 adds T2, T3 in front: [T2 T3 T0 T1] → trains on [T2 T3 T0], keeps T1.
    assert probe.buffers == [[TRACED[0], TRACED[1]], [TRACED[1]]]
    assert trainer.relift_sft_updates == 1
    expected, tokens = direct_sft_step(make_model(), tokenizer, sft_dataset, TRACED[2:4] + TRACED[:1], SFT_LR)
    assert_dicts_close(trainer.get_base_state_dict(), expected, atol=2e-6, rtol=1e-5)
    assert trainer.consumed["sft_samples"] == 3 and trainer.consumed["sft_tokens"] == tokens
    assert trainer.consumed["rl_samples"] == 2 * 8
    logs = [h for h in trainer.state.log_history if "relift/buffer_size" in h]
    assert [h["relift/buffer_size"] for h in logs] == [2, 1]
    assert [h["relift/sft_updates"] for h in logs] == [0, 1]
    assert [h["relift/failed_prompts"] for h in logs] == [2, 2]
    assert "relift/sft_loss" in logs[1] and "relift/sft_loss" not in logs[0]
    # The SFT step ran at `sft_learning_rate` on its own optimizer; θ's optimizer kept `learning_rate`.
    assert trainer.sft_optimizer.param_groups[0]["lr"] == SFT_LR
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)


def test_untraced_and_solved_prompts_stay_out(tmp_path, make_model, tokenizer, sft_dataset):
    """Steps 3-4: U (no trace) is skipped and T5 (solved) is not buffered; T0 completes a second update."""
    trainer, probe = relift(tmp_path, make_model, tokenizer, sft_dataset, max_steps=4)
    trainer.train()
    assert probe.buffers[2:] == [[TRACED[4], TRACED[1]], []]
    assert trainer.relift_sft_updates == 2 and trainer.consumed["sft_samples"] == 6
    logs = [h for h in trainer.state.log_history if "relift/failed_untraced" in h]
    assert [h["relift/failed_untraced"] for h in logs] == [0, 0, 1, 0]
    assert [h["relift/failed_prompts"] for h in logs] == [2, 2, 2, 1]


def test_resume_with_a_partly_full_buffer_is_exact(tmp_path, make_model, tokenizer, sft_dataset):
    full, _ = relift(tmp_path / "full", make_model, tokenizer, sft_dataset, max_steps=4, save_strategy="steps",
                     save_steps=1)  # fmt: skip
    full.train()
    final = full.get_base_state_dict()
    saved = load_trainer_extras(str(tmp_path / "full" / "out" / "checkpoint-3"))["relift"]
    assert [tokenizer.decode(p) for p, _ in saved["buffer"]] == [TRACED[4], TRACED[1]]
    assert saved["sft_updates"] == 1
    for step in (1, 3):  # buffer [T0 T1] and [T4 T1]: without them the next update would not fire
        resumed, probe = relift(tmp_path / f"r{step}", make_model, tokenizer, sft_dataset, max_steps=4)
        resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "out" / f"checkpoint-{step}"))
        assert_dicts_close(resumed.get_base_state_dict(), final, atol=0, rtol=0)
        assert resumed.relift_sft_updates == 2 and probe.buffers[-1] == []
        assert resumed.consumed == full.consumed


def test_never_full_buffer_is_grpo(tmp_path, make_model, tokenizer, rl_dataset, sft_dataset):
    """A buffer that never fills leaves ReLIFT's step GRPO's, bit for bit (toy reward: non-zero advantages)."""
    common = dict(max_steps=2, learning_rate=1e-2, shuffle_dataset=True, max_completion_length=6)
    trainer, _ = relift(tmp_path / "a", make_model, tokenizer, sft_dataset, toy_reward, rl_dataset,
                        relift_buffer_size=10_000, **common)  # fmt: skip
    trainer.train()
    args = make_config(tmp_path / "b", method="rl", **{**SGD, **common})
    rl = BridgeTrainer(
        make_model(), toy_reward, args=args, train_dataset=rl_dataset, processing_class=tokenizer
    )
    rl.train()
    assert_dicts_close(trainer.get_base_state_dict(), rl.get_base_state_dict(), atol=0, rtol=0)
    assert trainer.relift_sft_updates == 0 and trainer.consumed["sft_samples"] == 0


def test_relift_input_errors(tmp_path, make_model, tokenizer, sft_dataset):
    with pytest.raises(ValueError, match="relift_buffer_size"):
        make_config(tmp_path, method="relift", relift_buffer_size=0)
    no_traces = Dataset.from_dict({"prompt": [UNTRACED] * 4})
    with pytest.raises(ValueError, match="none of the 4 RL prompts has an expert trace"):
        relift(tmp_path, make_model, tokenizer, sft_dataset, rl=no_traces)


SCRIPT = (
    ROLLOUTS_SCRIPT_HEAD
    + """
rl = Dataset.from_dict({"prompt": [f"{i}+{i + 1}=" for i in range(12)]})
sft = Dataset.from_dict({"prompt": rl["prompt"], "completion": [f"{2 * i + 1}." for i in range(12)]})
# Prompts i = 0 mod 3 fail every rollout (they enter the buffer); the others get rewards that vary by rollout.
reward = lambda prompts, completions, **k: [0.0 if int(p.split("+")[0]) % 3 == 0 else float(sum(map(ord, c)) % 7) / 6.0
                                            for p, c in zip(prompts, completions)]
args = BridgeConfig(output_dir=sys.argv[1], method="relift", per_device_train_batch_size=16 // world // ga,
                    gradient_accumulation_steps=ga, num_generations=4, max_completion_length=6, max_steps=4,
                    optim="sgd", learning_rate=0.1, sft_learning_rate=0.3, lr_scheduler_type="constant",
                    weight_decay=0.0, beta=0.0, max_grad_norm=0.0, use_cpu=True, bf16=False, report_to="none",
                    save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0, relift_buffer_size=2,
                    per_device_sft_batch_size=1)
trainer = BridgeTrainer(build_tiny_model(tok), reward, args=args, train_dataset=rl, sft_dataset=sft,
                        processing_class=tok)
trainer.train()
if trainer.accelerator.is_main_process:
    torch.save(trainer.get_base_state_dict(), os.path.join(sys.argv[1], "theta.pt"))
    json.dump(trainer.state.log_history, open(os.path.join(sys.argv[1], "log.json"), "w"))
"""
)


def launch_relift(out, nproc, accumulation):
    import json
    import os
    import subprocess
    import sys

    from .helpers import torchrun_command

    out.mkdir(parents=True)
    script = out / "run_relift.py"
    script.write_text(SCRIPT)
    args = (out, accumulation)
    command = (
        torchrun_command(script, *args, nproc=nproc)
        if nproc > 1
        else [sys.executable, str(script), *map(str, args)]
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    logs = [h for h in json.loads((out / "log.json").read_text()) if "bridge/rl_loss" in h]
    return torch.load(out / "theta.pt"), logs


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_and_accumulation_match_one(tmp_path):
    """4 groups of G = 4 per step, 4 steps, buffer 2: 1 process, 2 processes (each rank holds the whole buffer and
    trains on its share of it) and 2 accumulation micro-steps give the same θ, buffer sizes, updates and data."""
    keys = ["relift/buffer_size", "relift/sft_updates", "bridge/sft_samples", "bridge/sft_tokens", "bridge/rl_samples",
            "reward"]  # fmt: skip
    runs = {(n, ga): launch_relift(tmp_path / f"{n}-{ga}", n, ga) for n, ga in [(1, 1), (2, 1), (1, 2)]}
    theta, logs = runs[1, 1]
    assert len(logs) == 4 and logs[-1]["relift/sft_updates"] >= 1  # the buffer fired
    for theta_b, logs_b in runs.values():
        assert_dicts_close(theta, theta_b, atol=1e-6, rtol=1e-5)
        for h1, h2 in zip(logs, logs_b, strict=True):
            assert [h1[k] for k in keys] == pytest.approx([h2[k] for k in keys], abs=1e-5)
