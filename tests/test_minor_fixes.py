"""Issue 12 §6: the SFT normaliser on a short last step, lr 0, and the SGD-shadow warning."""

import logging

import torch
from datasets import Dataset

from bridge_trl.sft import SFTStream

from .helpers import assert_dicts_close, make_config
from .test_methods import SGD, sft_gradient, theta_after


def stream(accumulation=2, per_device=2):
    rows = {"prompt_ids": [[1, 2]] * 12, "completion_ids": [[3] * (i + 1) for i in range(12)]}
    rows["num_completion_tokens"] = [len(c) for c in rows["completion_ids"]]
    return SFTStream(Dataset.from_dict(rows), seed=0, per_device=per_device, accumulation=accumulation,
                     pad_token_id=0)  # fmt: skip


def test_short_last_step_normalises_by_the_micro_batches_that_run():
    """Σ NLL / N over the micro-batches that run: with 1 of 2 micro-batches, N is that micro-batch's tokens."""
    s = stream()
    full = [s.micro_batch(3, m, 1, 0, "cpu") for m in range(2)]
    short = s.micro_batch(3, 0, 1, 0, "cpu", micro_steps=1)
    assert torch.equal(
        short.input_ids, full[0].input_ids
    )  # same examples (positions depend on the step only)
    tokens = [b.completion_mask.sum().item() for b in full]
    assert full[0].normalizer == sum(tokens)
    assert short.normalizer == tokens[0]
    assert len(s.step_positions(3, 1, micro_steps=1)) == 2 and s.step_tokens(3, 1, micro_steps=1) == tokens[0]


def test_alternating_with_frozen_rl_rate(tmp_path, make_model, tokenizer, rl_dataset, sft_dataset):
    """learning_rate = 0 (θ's RL step does nothing): the SFT update still runs at its own rate, θ¹ = θ⁰ − α_SFT g."""
    alt = theta_after(tmp_path, make_model, tokenizer, rl_dataset, sft_dataset, method="alternating",
                      learning_rate=0.0, sft_learning_rate=0.05, per_device_sft_batch_size=len(sft_dataset),
                      **SGD)  # fmt: skip
    theta0 = make_model().state_dict()
    grads = sft_gradient(make_model(), tokenizer, sft_dataset)
    assert_dicts_close(alt.get_base_state_dict(), {k: theta0[k].double() - 0.05 * grads[k] for k in theta0},
                       atol=1e-6, rtol=1e-4)  # fmt: skip


def test_sgd_shadow_at_adam_rates_warns(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="bridge_trl.config"):
        make_config(tmp_path, shadow_optimizer="sgd", learning_rate=5e-7, optim="adamw_torch")
    assert "θ̂ stays ≈ θ⁰" in caplog.text and "shadow_optimizer='same'" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bridge_trl.config"):
        make_config(tmp_path, shadow_optimizer="sgd", learning_rate=0.1, optim="adamw_torch")
        make_config(tmp_path, learning_rate=5e-7, optim="adamw_torch")
    assert "shadow_optimizer" not in caplog.text
