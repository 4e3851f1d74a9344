"""The shadow pass under vLLM's importance-sampling correction (TRL's default with `use_vllm`), on the CPU.

vLLM is replaced by a deterministic `rollout_func` that also returns the sampler's per-token log-probs μ, chosen far
from the model's so that the truncation at `vllm_importance_sampling_clip_max` is active; the trainer is told it
uses vLLM after construction (nothing else of vLLM is touched on this path but `sync_weights`).
"""

import zlib
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from transformers import TrainerCallback

from .helpers import assert_dicts_close, diff, make_trainer, max_abs, snapshot

SGD = dict(optim="sgd", weight_decay=0.0, max_grad_norm=0.0, lr_scheduler_type="constant", beta=0.0)
LENGTH = 5


def lora():
    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)


def vllm_rollouts(prompts, trainer):
    """Completions of the prompt and its index in the group; μ log-probs in [-9, -2] (the model's are ≈ -5.5)."""
    tokenizer = trainer.processing_class
    seen, prompt_ids, completion_ids, logprobs = {}, [], [], []
    for prompt in prompts:
        j = seen[prompt] = seen.get(prompt, -1) + 1
        g = torch.Generator().manual_seed(zlib.crc32(f"{prompt}|{j}|{trainer.state.global_step}".encode()))
        prompt_ids.append(tokenizer(prompt)["input_ids"])
        completion_ids.append(torch.randint(32, 127, (LENGTH,), generator=g).tolist())
        logprobs.append((-2.0 - 7.0 * torch.rand(LENGTH, generator=g)).tolist())
    return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": logprobs}


def vllm_trainer(tmp_path, make_model, tokenizer, rl_dataset, sft_dataset, correction=True, **kw):
    trainer = make_trainer(tmp_path, make_model(), tokenizer, rl_dataset, sft_dataset, peft_config=lora(),
                           learning_rate=0.2, **SGD, **kw)  # fmt: skip
    trainer.use_vllm, trainer.vllm_importance_sampling_correction = True, correction
    trainer.vllm_importance_sampling_mode = "token_truncate"
    trainer.vllm_generation, trainer._last_loaded_step = SimpleNamespace(sync_weights=lambda: None), -1
    trainer.rollout_func = vllm_rollouts
    return trainer


def test_shadow_pass_runs_and_matches_theta_at_step0(
    tmp_path, make_model, tokenizer, rl_dataset, sft_dataset
):
    """λ = 1, step 0 (θ̂ = θ): θ̂'s ratio π(θ̂)/μ is the joint pass's π(θ)/μ, so θ̂ takes θ's (TRL's) step."""
    common = (make_model, tokenizer, rl_dataset, sft_dataset)
    trainer = vllm_trainer(tmp_path / "a", *common, bridge_lambda=1.0)
    theta0, _, _ = snapshot(trainer)
    trainer.train()  # used to raise KeyError: 'importance_sampling_ratio' in the shadow's pass
    theta1, shadow1, _ = snapshot(trainer)
    assert max_abs(diff(shadow1, theta0)) > 1e-4
    assert_dicts_close(shadow1, theta1, atol=1e-7, rtol=0)
    # The correction is in effect: without it θ̂ moves elsewhere.
    plain = vllm_trainer(tmp_path / "b", *common, correction=False, bridge_lambda=1.0)
    plain.train()
    assert max_abs(diff(plain.get_shadow_state_dict(), shadow1)) > 1e-5


class ShadowProbe(TrainerCallback):
    def __init__(self, trainer):
        self.trainer, self.start = trainer, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:  # θ̂ and w at the start of step 2
            self.start = (self.trainer.get_shadow_state_dict(), self.trainer.get_adapter_state_dict())


def test_shadow_ratio_is_truncated_pi_shadow_over_mu(
    tmp_path, make_model, tokenizer, rl_dataset, sft_dataset
):
    """Step 2 (θ̂ ≠ θ): the ratio in θ̂'s loss is clamp(π(θ̂,w)/μ, max=3) per token, with π(θ̂,w) computed by a
    fresh model loaded with θ̂ and w."""
    trainer = vllm_trainer(tmp_path, make_model, tokenizer, rl_dataset, sft_dataset, max_steps=2)
    probe, seen = ShadowProbe(trainer), []
    trainer.add_callback(probe)
    original = trainer._compute_loss

    def recording(model, inputs):
        loss = original(model, inputs)
        seen.append((trainer.shadow.active, trainer.state.global_step, dict(inputs)))
        return loss

    trainer._compute_loss = recording
    trainer.train()
    (_, _, joint), (_, _, shadow) = [(a, s, i) for a, s, i in seen if s == 1]
    assert not seen[-2][0] and seen[-1][0]  # joint pass, then the shadow's
    theta_hat, w = probe.start

    model = get_peft_model(make_model(seed=3), lora())
    with torch.no_grad():
        for name, p in model.get_base_model().named_parameters():
            if "lora_" not in name:
                p.copy_(theta_hat[name.replace(".base_layer", "")])
    set_peft_model_state_dict(model, w)
    ids = torch.cat([shadow["prompt_ids"], shadow["completion_ids"]], dim=1)
    attention = torch.cat([shadow["prompt_mask"], shadow["completion_mask"]], dim=1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits[:, -LENGTH - 1 : -1].double()
    logps = torch.log_softmax(logits, -1).gather(-1, shadow["completion_ids"][..., None]).squeeze(-1)
    mu = joint["sampling_per_token_logps"].double()
    expected = torch.clamp(torch.exp(logps - mu), max=3.0) * shadow["completion_mask"]
    ratio = shadow["importance_sampling_ratio"].double() * shadow["completion_mask"]
    torch.testing.assert_close(ratio, expected, atol=1e-5, rtol=1e-4)
    assert (expected == 3.0).any() and (expected < 1.0).any()  # truncation active, ratios far from 1
    # ... and it is not the joint pass's ratio π(θ,w)/μ.
    assert (
        ratio - joint["importance_sampling_ratio"].double() * shadow["completion_mask"]
    ).abs().max() > 1e-3


def test_none_gives_the_shadow_the_joint_ratio(tmp_path, make_model, tokenizer, rl_dataset, sft_dataset):
    """`shadow_importance_sampling='none'` (the paper's estimator): at step 2 (θ̂ ≠ θ) θ̂'s loss carries exactly
    what θ's does, the engine correction π(θ, w)/μ, and θ̂'s advantages are θ's."""
    trainer = vllm_trainer(tmp_path, make_model, tokenizer, rl_dataset, sft_dataset, max_steps=2,
                           shadow_importance_sampling="none")  # fmt: skip
    seen, original = [], trainer._compute_loss

    def recording(model, inputs):
        loss = original(model, inputs)
        seen.append((trainer.state.global_step, dict(inputs)))
        return loss

    trainer._compute_loss = recording
    trainer.train()
    (_, joint), (_, shadow) = [(s, i) for s, i in seen if s == 1]
    assert torch.equal(shadow["importance_sampling_ratio"], joint["importance_sampling_ratio"])
    assert torch.equal(shadow["advantages"], joint["advantages"])
    assert "old_per_token_logps" not in shadow and "sampling_per_token_logps" not in shadow


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sequence_mask", "token_mask", "sequence_truncate"])
def test_other_modes_run(tmp_path, make_model, tokenizer, rl_dataset, sft_dataset, mode):
    trainer = vllm_trainer(tmp_path, make_model, tokenizer, rl_dataset, sft_dataset)
    trainer.vllm_importance_sampling_mode = mode
    trainer.train()
    assert "bridge/shadow_rl_loss" in trainer.state.log_history[0]
