"""Cold start is a two-stage pipeline: its RL phase is a GRPO run started from the SFT phase's weights.

The reference is TRL's own `GRPOTrainer`, built from the SFT-phase weights with a fresh optimizer and its own
schedule, on the same rollouts (a deterministic `rollout_func` of the prompt and its index in the group, and a
dataset of one repeated prompt, so the data order cannot differ either).
"""

import zlib

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from .conftest import toy_reward
from .helpers import GRPO_DEFAULTS, assert_dicts_close, make_trainer

SFT_STEPS, RL_STEPS, LR = 2, 3, 1e-2
# AdamW with a warmup: the RL phase's first step is at lr 0 (its own warmup) but still fills Adam's moments.
OPT = dict(optim="adamw_torch", learning_rate=LR, lr_scheduler_type="linear", warmup_steps=1, beta=0.0)


def rollouts(prompts, trainer):
    tokenizer = trainer.processing_class
    seen, prompt_ids, completion_ids = {}, [], []
    for prompt in prompts:
        j = seen[prompt] = seen.get(prompt, -1) + 1
        g = torch.Generator().manual_seed(zlib.crc32(f"{prompt}|{j}".encode()))
        prompt_ids.append(tokenizer(prompt)["input_ids"])
        completion_ids.append(torch.randint(32, 127, (5,), generator=g).tolist())
    return {
        "prompt_ids": prompt_ids,
        "completion_ids": completion_ids,
        "logprobs": [[0.0] * 5] * len(prompts),
    }


def rl_prompts():
    return Dataset.from_dict({"prompt": ["3+4="] * 16})


def adam_steps(optimizer) -> set:
    inner = getattr(optimizer, "optimizer", optimizer)
    return {int(s["step"]) for s in inner.state.values()}


class Probe(TrainerCallback):
    """θ at the end of the SFT phase, and θ's optimizer state right after the first RL step."""

    def __init__(self, trainer):
        self.trainer, self.theta_sft, self.steps_after_first_rl = trainer, None, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == SFT_STEPS:
            self.theta_sft = self.trainer.get_base_state_dict()
            self.steps_before_switch = adam_steps(self.trainer.optimizer)
        if state.global_step == SFT_STEPS + 1:
            self.steps_after_first_rl = adam_steps(self.trainer.optimizer)


def cold_start(tmp_path, make_model, tokenizer, sft_dataset, **kw):
    trainer = make_trainer(tmp_path, make_model(), tokenizer, rl_prompts(), sft_dataset, method="cold_start",
                           max_steps=SFT_STEPS + RL_STEPS, cold_start_sft_steps=SFT_STEPS, **OPT, **kw)  # fmt: skip
    trainer.rollout_func = rollouts
    return trainer


@pytest.mark.filterwarnings("ignore:You are using 'rollout_func'")
def test_rl_phase_is_a_fresh_grpo_run_from_the_sft_weights(tmp_path, make_model, tokenizer, sft_dataset):
    trainer = cold_start(tmp_path / "cold", make_model, tokenizer, sft_dataset)
    probe = Probe(trainer)
    trainer.add_callback(probe)
    trainer.train()
    # Adam's state is reset at the switch: one step old after the first RL step, RL_STEPS old at the end.
    assert probe.steps_before_switch == {SFT_STEPS}
    assert probe.steps_after_first_rl == {1}
    assert adam_steps(trainer.optimizer) == {RL_STEPS}
    # Each phase has its own linear schedule with a 1-step warmup: [0, α] for SFT, then [0, α, α/2] for RL.
    lrs = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert lrs == [0.0, LR, 0.0, LR, LR / 2]

    grpo_model = make_model(seed=7)
    grpo_model.load_state_dict(probe.theta_sft)
    args = GRPOConfig(output_dir=str(tmp_path / "grpo"), **{**GRPO_DEFAULTS, "max_steps": RL_STEPS, **OPT})
    grpo = GRPOTrainer(grpo_model, toy_reward, args=args, train_dataset=rl_prompts(), processing_class=tokenizer,
                       rollout_func=rollouts)  # fmt: skip
    grpo.train()
    expected = {k: v.detach() for k, v in grpo.model.state_dict().items()}
    assert_dicts_close(trainer.get_base_state_dict(), expected, atol=1e-6, rtol=1e-5)
    moved = max((expected[k] - probe.theta_sft[k]).abs().max().item() for k in expected)
    assert moved > 1e-4  # the RL phase did train


def test_resume_before_and_after_the_switch(tmp_path, make_model, tokenizer, sft_dataset):
    full = cold_start(
        tmp_path / "full", make_model, tokenizer, sft_dataset, save_strategy="steps", save_steps=1
    )
    full.train()
    final = full.get_base_state_dict()
    for step in (SFT_STEPS - 1, SFT_STEPS, SFT_STEPS + 1):  # before, at and after the switch
        resumed = cold_start(tmp_path / f"r{step}", make_model, tokenizer, sft_dataset)
        resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "out" / f"checkpoint-{step}"))
        assert_dicts_close(resumed.get_base_state_dict(), final, atol=0, rtol=0)
        assert adam_steps(resumed.optimizer) == {RL_STEPS}


def test_sft_phase_trains_at_sft_learning_rate(tmp_path, make_model, tokenizer, sft_dataset):
    """`sft_learning_rate` is the SFT phase's rate; the RL phase keeps `learning_rate` (each with its schedule)."""
    trainer = cold_start(tmp_path, make_model, tokenizer, sft_dataset, sft_learning_rate=3 * LR)
    trainer.train()
    lrs = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert lrs == pytest.approx([0.0, 3 * LR, 0.0, LR, LR / 2], rel=1e-12)
