"""The paper's baselines (DESIGN.md §3), each checked on a tiny model against what its definition says."""

import pytest
import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from .conftest import toy_reward
from .helpers import GRPO_DEFAULTS, assert_dicts_close, diff, make_config, make_trainer, max_abs

SGD = dict(optim="sgd", weight_decay=0.0, max_grad_norm=0.0, lr_scheduler_type="constant", beta=0.0)


def theta_after(tmp_path, make_model, tokenizer, rl, sft, reward=toy_reward, **overrides):
    trainer = make_trainer(tmp_path, make_model(), tokenizer, rl, sft, **overrides)
    if reward is not toy_reward:
        trainer.reward_funcs = [reward]
    trainer.train()
    return trainer


def sft_gradient(model, tokenizer, dataset):
    """∇_θ of the mean token NLL of completions + EOS on a plain model, one unpadded example at a time."""
    model.zero_grad()
    nll, count = 0.0, 0
    for prompt, completion in zip(dataset["prompt"], dataset["completion"], strict=True):
        p_ids = tokenizer(prompt)["input_ids"]
        c_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        logp = torch.log_softmax(model(input_ids=torch.tensor([p_ids + c_ids])).logits[0].double(), -1)
        nll = nll - logp[len(p_ids) - 1 : -1][torch.arange(len(c_ids)), torch.tensor(c_ids)].sum()
        count += len(c_ids)
    (nll / count).backward()
    grads = {n: p.grad.double() for n, p in model.named_parameters()}
    grads["lm_head.weight"] = grads["model.embed_tokens.weight"]
    return grads


def test_rl_is_grpo_and_ignores_sft_data(tmp_path, make_model, tokenizer, rl_dataset, sft_dataset):
    other_sft = Dataset.from_dict({"prompt": ["q"] * 3, "completion": ["another trace entirely"] * 3})
    a = theta_after(tmp_path / "a", make_model, tokenizer, rl_dataset, sft_dataset, method="rl", **SGD)
    b = theta_after(tmp_path / "b", make_model, tokenizer, rl_dataset, other_sft, method="rl", **SGD)
    assert a.get_adapter_state_dict() == {}  # no adapter unless a peft_config is given
    assert_dicts_close(a.get_base_state_dict(), b.get_base_state_dict(), atol=0, rtol=0)

    grpo_args = GRPOConfig(output_dir=str(tmp_path / "c"), **GRPO_DEFAULTS, **SGD)
    grpo = GRPOTrainer(make_model(), toy_reward, args=grpo_args,
                       train_dataset=rl_dataset, processing_class=tokenizer)  # fmt: skip
    grpo.train()
    assert_dicts_close(a.get_base_state_dict(), {k: v.detach() for k, v in grpo.model.state_dict().items()})
    assert (
        a.state.log_history[0]["bridge/sft_samples"] == 0 and a.state.log_history[0]["bridge/rl_samples"] == 8
    )


def test_sft_ignores_rewards_and_generates_nothing(tmp_path, make_model, tokenizer, rl_dataset, sft_dataset):
    def other_reward(completions, **kwargs):
        return [float(len(c)) for c in completions]

    a = theta_after(tmp_path / "a", make_model, tokenizer, rl_dataset, sft_dataset, method="sft", **SGD)
    b = theta_after(tmp_path / "b", make_model, tokenizer, rl_dataset, sft_dataset, reward=other_reward,
                    method="sft", **SGD)  # fmt: skip
    assert_dicts_close(a.get_base_state_dict(), b.get_base_state_dict(), atol=0, rtol=0)
    log = a.state.log_history[0]
    assert log["bridge/rl_samples"] == 0 and "reward" not in log
    assert log["bridge/sft_samples"] == a.args.per_device_sft_batch_size


def test_mix_with_lambda_one_equals_rl(tmp_path, make_model, tokenizer, rl_dataset, sft_dataset):
    mix = theta_after(tmp_path / "m", make_model, tokenizer, rl_dataset, sft_dataset, method="mix",
                      bridge_lambda=1.0, max_steps=2, **SGD)  # fmt: skip
    rl = theta_after(
        tmp_path / "r", make_model, tokenizer, rl_dataset, sft_dataset, method="rl", max_steps=2, **SGD
    )
    assert_dicts_close(mix.get_base_state_dict(), rl.get_base_state_dict(), atol=1e-7, rtol=0)


@pytest.mark.parametrize("weight_decay", [0.0, 0.5])
def test_alternating_applies_rl_then_sft_update(tmp_path, make_model, tokenizer, rl_dataset, sft_dataset,
                                                weight_decay):  # fmt: skip
    """θ¹ = θ' − α_SFT ∇L_SFT(θ'), where θ' is the RL update (which `rl` alone reaches from the same seed).

    With weight decay, θ' (the RL update) carries the step's decay and the SFT update adds none: one step's worth.
    """
    common = dict(
        learning_rate=0.2, per_device_sft_batch_size=len(sft_dataset), **{**SGD, "weight_decay": weight_decay}
    )
    alt = theta_after(tmp_path / "a", make_model, tokenizer, rl_dataset, sft_dataset, method="alternating",
                      sft_learning_rate=0.05, **common)  # fmt: skip
    rl = theta_after(tmp_path / "r", make_model, tokenizer, rl_dataset, sft_dataset, method="rl", **common)
    theta_prime = rl.get_base_state_dict()
    assert max_abs(diff(theta_prime, make_model().state_dict())) > 1e-4  # the RL update did move θ

    reference = make_model(seed=99)
    reference.load_state_dict(theta_prime)
    grads = sft_gradient(reference, tokenizer, sft_dataset)
    expected = {k: theta_prime[k].double() - 0.05 * grads[k] for k in theta_prime}
    assert_dicts_close(alt.get_base_state_dict(), expected, atol=1e-6, rtol=1e-4)
    log = alt.state.log_history[0]
    assert log["bridge/rl_samples"] == 8 and log["bridge/sft_samples"] == len(sft_dataset)
    assert "bridge/sft_grad_norm" in log


@pytest.mark.parametrize(("steps", "ratio"), [(2, 0.0), (None, 0.25)])
def test_cold_start_switches_at_configured_point(
    tmp_path, make_model, tokenizer, rl_dataset, sft_dataset, steps, ratio
):
    trainer = theta_after(tmp_path, make_model, tokenizer, rl_dataset, sft_dataset, method="cold_start", max_steps=4,
                          cold_start_sft_steps=steps, cold_start_sft_ratio=ratio)  # fmt: skip
    switch = 2 if steps else 1
    logs = [h for h in trainer.state.log_history if "bridge/rl_samples" in h and "loss" in h]
    assert [h["step"] for h in logs] == [1, 2, 3, 4]
    for h in logs:
        in_sft_phase = h["step"] <= switch
        assert ("bridge/sft_loss" in h) == in_sft_phase and ("bridge/rl_loss" in h) != in_sft_phase
        assert h["bridge/rl_samples"] == 8 * max(0, h["step"] - switch)
        assert h["bridge/sft_samples"] == trainer.args.per_device_sft_batch_size * min(h["step"], switch)


def test_bridge_consumption_metrics(tmp_path, make_model, tokenizer, rl_dataset, sft_dataset):
    trainer = theta_after(tmp_path, make_model, tokenizer, rl_dataset, sft_dataset, max_steps=2,
                          gradient_accumulation_steps=2, per_device_sft_batch_size=3)  # fmt: skip
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["bridge/sft_samples"] for h in logs] == [6, 12]
    assert [h["bridge/rl_samples"] for h in logs] == [16, 32]
    assert 0 < logs[0]["bridge/rl_tokens"] <= 16 * trainer.args.max_completion_length
    assert logs[1]["bridge/sft_tokens"] > logs[0]["bridge/sft_tokens"] > 0


def test_unknown_method(tmp_path):
    with pytest.raises(ValueError, match="method"):
        make_config(tmp_path, method="dpo")
