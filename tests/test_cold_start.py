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

from bridge_trl.checkpoint import REFERENCE_FILE

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
    kw = {"max_steps": SFT_STEPS + RL_STEPS, "cold_start_sft_steps": SFT_STEPS, **OPT, **kw}
    trainer = make_trainer(
        tmp_path, make_model(), tokenizer, rl_prompts(), sft_dataset, method="cold_start", **kw
    )
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


@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_resume_before_and_after_the_switch(tmp_path, make_model, tokenizer, sft_dataset, beta):
    """With β > 0 a checkpoint past the switch carries the KL reference (the SFT model), so resumes stay exact."""
    full = cold_start(tmp_path / "full", make_model, tokenizer, sft_dataset, save_strategy="steps", save_steps=1,
                      beta=beta)  # fmt: skip
    full.train()
    final = full.get_base_state_dict()
    saved = [(tmp_path / "full" / "out" / f"checkpoint-{s}" / REFERENCE_FILE).exists() for s in range(1, 6)]
    assert saved == [beta > 0 and s > SFT_STEPS for s in range(1, 6)]
    for step in (SFT_STEPS - 1, SFT_STEPS, SFT_STEPS + 1):  # before, at and after the switch
        resumed = cold_start(tmp_path / f"r{step}", make_model, tokenizer, sft_dataset, beta=beta)
        resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "out" / f"checkpoint-{step}"))
        assert_dicts_close(resumed.get_base_state_dict(), final, atol=0, rtol=0)
        assert adam_steps(resumed.optimizer) == {RL_STEPS}


def test_sft_phase_trains_at_sft_learning_rate(tmp_path, make_model, tokenizer, sft_dataset):
    """`sft_learning_rate` is the SFT phase's rate; the RL phase keeps `learning_rate` (each with its schedule)."""
    trainer = cold_start(tmp_path, make_model, tokenizer, sft_dataset, sft_learning_rate=3 * LR)
    trainer.train()
    lrs = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert lrs == pytest.approx([0.0, 3 * LR, 0.0, LR, LR / 2], rel=1e-12)


@pytest.mark.filterwarnings("ignore:You are using 'rollout_func'")
def test_kl_reference_is_the_sft_model(tmp_path, make_model, tokenizer, sft_dataset):
    """β > 0: the RL phase's KL is taken against π(θ_SFT), as in a separate GRPO run loaded from the saved SFT
    model (TRL then loads its reference from the same path): KL 0 at the first RL step, the same KL after."""
    trainer = cold_start(tmp_path / "cold", make_model, tokenizer, sft_dataset, beta=0.1)
    probe = Probe(trainer)
    trainer.add_callback(probe)
    trainer.train()
    kls = [h["kl"] for h in trainer.state.log_history if "kl" in h]
    assert len(kls) == RL_STEPS and kls[0] == 0.0

    sft_model = make_model(seed=7)
    sft_model.load_state_dict(probe.theta_sft)
    sft_model.save_pretrained(tmp_path / "sft_model")
    tokenizer.save_pretrained(tmp_path / "sft_model")
    args = GRPOConfig(
        output_dir=str(tmp_path / "grpo"), **{**GRPO_DEFAULTS, "max_steps": RL_STEPS, **OPT, "beta": 0.1}
    )
    grpo = GRPOTrainer(str(tmp_path / "sft_model"), toy_reward, args=args, train_dataset=rl_prompts(),
                       processing_class=tokenizer, rollout_func=rollouts)  # fmt: skip
    grpo.train()
    grpo_kls = [h["kl"] for h in grpo.state.log_history if "kl" in h]
    assert kls == pytest.approx(grpo_kls, abs=1e-7) and max(kls) > 1e-6  # the last step has moved θ
    expected = {k: v.detach() for k, v in grpo.model.state_dict().items()}
    assert_dicts_close(trainer.get_base_state_dict(), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:You are using 'rollout_func'")
def test_rl_phase_starts_with_a_fresh_rollout_buffer(tmp_path, make_model, tokenizer, sft_dataset):
    """steps_per_generation = 2 and a switch after an odd number of steps: the RL phase generates at its steps 0
    and 2 (a full buffer each, both halves used), as a GRPO run of RL_STEPS steps does, not at the switch and
    again one step later."""
    generations = []

    def count(trainer):
        generate = trainer._generate_and_score_completions
        trainer._generate_and_score_completions = lambda batch: (
            generations.append(trainer.state.global_step) or generate(batch)
        )

    trainer = cold_start(tmp_path / "cold", make_model, tokenizer, sft_dataset, steps_per_generation=2,
                         cold_start_sft_steps=1, max_steps=1 + 4)  # fmt: skip
    count(trainer)
    trainer.train()
    assert generations == [1, 3]
    assert trainer._last_world_entropy == float("inf") and trainer.entropy_coef == trainer.args.entropy_coef
