"""θ̂'s importance ratio π(θ̂, w)/μ on shared rollouts (`bridge_trl.shadow_is`), one rule on every backend.

Exact enumeration on a tiny vocabulary checks what θ̂'s expected gradient is under each convention; trainer runs
check that HF generation applies the ratio (μ = the joint pass's π(θ, w)) and takes the same θ̂ step as (fake) vLLM
on the same samples. Measured by enumeration (V = 3, length 2, θ̂'s logits θ's plus 0.8·noise, sequence ratios
0.48 to 12.4; relative error ‖E_μ[θ̂'s gradient] − ∇ J(θ̂)‖ / ‖∇ J(θ̂)‖): no ratio 0.370; per-token ratio 0.232
(0.189 truncated at C = 3); per-sequence ratio 3e-16; per-sequence truncated at C = 3 (binding on 2 of 9
sequences) 0.108, at C = 1.2 (3 of 9) 0.344.
"""

import itertools
from types import SimpleNamespace

import pytest
import torch
from peft import get_peft_model, set_peft_model_state_dict
from transformers import TrainerCallback

from bridge_trl.shadow_is import shadow_batch, shadow_importance_sampling

from .helpers import assert_dicts_close, make_trainer, snapshot
from .test_algorithm import SGD, lora
from .test_vllm_importance_sampling import vllm_rollouts

SEQS = torch.tensor(list(itertools.product(range(3), repeat=2)))  # all 9 sequences of length 2 over 3 tokens


def token_logps(logits: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """(N, 2) per-token log-probs of an autoregressive table policy (rows: first token, then second given first)."""
    policy = torch.log_softmax(logits, -1)
    return torch.stack([policy[0, ys[:, 0]], policy[1 + ys[:, 0], ys[:, 1]]], dim=1)


class TablePolicy:
    """Stands in for the trainer: GRPO's log-prob hook returns θ̂'s per-token log-probs, with their graph."""

    def __init__(self, logits, mode, clip_max):
        self.logits = logits
        self.use_vllm, self.vllm_importance_sampling_correction = False, False
        self.vllm_importance_sampling_mode, self.vllm_importance_sampling_clip_min = mode, None
        self.vllm_importance_sampling_clip_max = clip_max
        self.args = SimpleNamespace(shadow_importance_sampling="truncate" if mode else "none")

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        return token_logps(self.logits, SEQS), None, None


def expected_shadow_gradient(shadow_logits, mu_logits, advantage, mode, clip_max=None):
    """Σ_y μ(y) ∇ loss(y), the loss GRPO computes for θ̂ (ratio 1, its own old log-probs) on a batch of all 9
    sequences, with θ̂'s weights written into the batch by `shadow_importance_sampling` as in the trainer."""
    logits = shadow_logits.clone().requires_grad_(True)
    trainer = TablePolicy(logits, mode, clip_max)
    mu_logps = token_logps(mu_logits, SEQS)
    inputs = {"advantages": advantage.clone(), "completion_mask": torch.ones(9, 2)}
    batch = shadow_batch(trainer, inputs, mu_logps)
    with shadow_importance_sampling(trainer, batch):
        logps, _, _ = trainer._get_per_token_logps_and_entropies()
    adv = batch["advantages"] if batch["advantages"].dim() == 2 else batch["advantages"][:, None]
    coef = torch.exp(logps - logps.detach())  # GRPO's ratio at θ̂'s own old log-probs: 1, gradient ∇ log π
    per_token = -torch.min(coef * adv, torch.clamp(coef, 0.8, 1.28) * adv)
    mu = mu_logps.sum(1).exp()
    (mu * per_token.sum(1)).sum().backward()
    return logits.grad


def policies(delta=0.8):
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(4, 3, generator=g).double() * 1.5
    shadow = mu + delta * torch.randn(4, 3, generator=g).double()
    reward = torch.rand(9, generator=g, dtype=torch.float64).round()
    return mu, shadow, reward - 0.4  # an advantage: the reward minus a constant baseline


def on_policy_gradient(shadow_logits, advantage):
    """∇ of the loss −J(θ̂) = −Σ_y π(θ̂)(y) A(y): the gradient θ̂'s step should estimate (Eq. 10)."""
    logits = shadow_logits.clone().requires_grad_(True)
    (-(token_logps(logits, SEQS).sum(1).exp() * advantage).sum()).backward()
    return logits.grad


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_sequence_ratio_gives_the_on_policy_gradient():
    """Sequence-level ratio, cap inactive: E_{y∼μ}[ρ A ∇ log π(θ̂)] is ∇ J(θ̂) exactly; without the ratio it is not."""
    mu, shadow, advantage = policies()
    truth = on_policy_gradient(shadow, advantage)
    weighted = expected_shadow_gradient(shadow, mu, advantage, "sequence_truncate", clip_max=None)
    torch.testing.assert_close(weighted, truth, atol=1e-12, rtol=1e-10)
    assert rel(expected_shadow_gradient(shadow, mu, advantage, None), truth) > 0.3  # 'none': off-policy


def test_truncated_sequence_ratio_is_the_capped_density():
    """With the cap C active, the expectation is Σ_y min(π(θ̂)(y), C μ(y)) A ∇ log π(θ̂)(y): each sequence with
    ρ > C is counted at C μ, a bias toward μ's sequences."""
    mu, shadow, advantage = policies()
    cap = 1.2
    p_mu, p_shadow = token_logps(mu, SEQS).sum(1).exp(), token_logps(shadow, SEQS).sum(1).exp()
    assert 0 < (p_shadow > cap * p_mu).sum() < 9  # the cap binds on some sequences only
    logits = shadow.clone().requires_grad_(True)
    density = torch.minimum(p_shadow, cap * p_mu)
    (-(density * advantage * token_logps(logits, SEQS).sum(1)).sum()).backward()
    got = expected_shadow_gradient(shadow, mu, advantage, "sequence_truncate", clip_max=cap)
    torch.testing.assert_close(got, logits.grad, atol=1e-12, rtol=1e-10)
    assert rel(got, on_policy_gradient(shadow, advantage)) > 0.05


def test_token_ratio_gives_the_per_decision_surrogate():
    """TRL's token-level convention (per-token ratio π(θ̂)(y_t|y<t)/μ(y_t|y<t)) gives the gradient of
    Σ_t E_{y<t∼μ} E_{y_t∼π(θ̂)}[Q_μ(y≤t)], Q_μ the expected advantage of the continuation under μ: exact at θ̂ = μ,
    first-order elsewhere, and here measurably off the on-policy gradient (though closer than no ratio)."""
    mu, shadow, advantage = policies()
    logits = shadow.clone().requires_grad_(True)
    pol_hat, pol_mu = torch.log_softmax(logits, -1).exp(), torch.log_softmax(mu, -1).exp()
    adv = advantage.view(3, 3)  # A(y1, y2)
    q_first = (pol_mu[1:] * adv).sum(1)  # Q_μ(y1) = Σ_y2 μ(y2|y1) A(y1, y2)
    surrogate = (pol_hat[0] * q_first).sum() + (pol_mu[0][:, None] * pol_hat[1:] * adv).sum()
    (-surrogate).backward()
    got = expected_shadow_gradient(shadow, mu, advantage, "token_truncate", clip_max=None)
    torch.testing.assert_close(got, logits.grad, atol=1e-12, rtol=1e-10)
    truth = on_policy_gradient(shadow, advantage)
    none = expected_shadow_gradient(shadow, mu, advantage, None)
    assert 0.05 < rel(got, truth) < rel(none, truth)
    at_mu = expected_shadow_gradient(mu, mu, advantage, "token_truncate", clip_max=None)
    torch.testing.assert_close(at_mu, on_policy_gradient(mu, advantage), atol=1e-12, rtol=1e-10)


# --------------------------------------------------------------------------- the trainer


class StartOfStep2(TrainerCallback):
    """θ, θ̂ and w at the start of step 2 (after step 1's updates)."""

    def __init__(self, trainer):
        self.trainer, self.state = trainer, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            self.state = snapshot(self.trainer)


def recorded_run(trainer):
    """Train, recording every batch GRPO's loss saw (after the loss: θ̂'s weights are written by its forward)."""
    seen, original = [], trainer._compute_loss

    def recording(model, inputs):
        loss = original(model, inputs)
        seen.append((trainer.state.global_step, trainer.shadow.active, dict(inputs)))
        return loss

    trainer._compute_loss = recording
    probe = StartOfStep2(trainer)
    trainer.add_callback(probe)
    trainer.train()
    return seen, probe.state


def policy_logps(make_model, base: dict, adapter: dict, batch) -> torch.Tensor:
    """(B, C) completion log-probs of π(base, adapter), a fresh model loaded with those weights."""
    model = get_peft_model(make_model(seed=3), lora())
    with torch.no_grad():
        for name, p in model.get_base_model().named_parameters():
            if "lora_" not in name:
                p.copy_(base[name.replace(".base_layer", "")])
    set_peft_model_state_dict(model, adapter)
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    length = batch["completion_ids"].size(1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits[:, -length - 1 : -1].double()
    return torch.log_softmax(logits, -1).gather(-1, batch["completion_ids"][..., None]).squeeze(-1)


@pytest.mark.parametrize("mode", ["sequence_mask", "token_truncate"])
def test_hf_generation_weights_the_shadow_by_its_truncated_ratio(
    tmp_path, make_model, tokenizer, rl_dataset, sft_dataset, mode
):
    """HF generation, step 2 (θ̂ ≠ θ): θ̂'s advantages are the joint ones times min(π(θ̂,w)/π(θ,w), C), per sequence
    or per token as `vllm_importance_sampling_mode` says (truncated even for a `*_mask` mode), with both policies
    computed by fresh models; C = 1 binds on some entries. With 'none' they are the joint ones (the old rule)."""
    trainer = make_trainer(tmp_path, make_model(), tokenizer, rl_dataset, sft_dataset, peft_config=lora(),
                           learning_rate=0.2, max_steps=2, vllm_importance_sampling_mode=mode,
                           vllm_importance_sampling_clip_max=1.0, **SGD)  # fmt: skip
    seen, (theta, shadow_weights, w) = recorded_run(trainer)
    (_, joint_active, joint), (_, shadow_active, shadow) = [(k, a, i) for k, a, i in seen if k == 1]
    assert not joint_active and shadow_active
    mask = shadow["completion_mask"].double()
    shadow_logps = policy_logps(make_model, shadow_weights, w, shadow)
    diff = (shadow_logps - policy_logps(make_model, theta, w, shadow)) * mask
    raw = torch.exp(diff.sum(-1, keepdim=True) if mode.startswith("sequence") else diff)
    on = torch.ones_like(raw, dtype=torch.bool) if mode.startswith("sequence") else mask.bool()
    # The cap binds somewhere, not everywhere.
    assert (raw[on] > 1 + 1e-3).any() and (raw[on] < 1 - 1e-3).any()
    expected = joint["advantages"].double()[:, None] * torch.clamp(raw, max=1.0)
    got = shadow["advantages"].double()
    got = (got if got.dim() == 2 else got[:, None]).expand_as(expected)
    torch.testing.assert_close(got[on.expand_as(got)], expected[on.expand_as(got)], atol=1e-5, rtol=1e-4)
    assert "importance_sampling_ratio" not in shadow and "old_per_token_logps" not in shadow


def model_rollouts(prompts, trainer):
    """`vllm_rollouts`' completions, reported with their exact log-probs under the trainer's current π(θ, w): an
    engine with no mismatch, so μ_vLLM is the joint pass's π(θ, w) up to float rounding."""
    out = vllm_rollouts(prompts, trainer)
    model = trainer.model
    logprobs = []
    with torch.no_grad():
        for prompt, completion in zip(out["prompt_ids"], out["completion_ids"], strict=True):
            logits = model(input_ids=torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1]
            logps = torch.log_softmax(logits.float() / trainer.temperature, -1)
            logprobs.append(logps.gather(-1, torch.tensor(completion)[:, None]).squeeze(-1).tolist())
    return {**out, "logprobs": logprobs}


def fake_vllm(trainer):
    """Tell the trainer it samples with vLLM (correction on); nothing else of vLLM is used on this path."""
    trainer.use_vllm, trainer.vllm_importance_sampling_correction = True, True
    trainer.vllm_generation, trainer._last_loaded_step = SimpleNamespace(sync_weights=lambda: None), -1


@pytest.mark.parametrize("mode", ["token_truncate", "sequence_truncate"])
def test_hf_and_vllm_take_the_same_shadow_step(
    tmp_path, make_model, tokenizer, rl_dataset, sft_dataset, mode
):
    """The same config and the same samples give the same θ̂ (and θ, w) after 2 steps with HF generation and with
    vLLM (a stand-in engine reporting exact log-probs, correction on, C = 1 binding). Under the old rule HF's θ̂ had
    no ratio: `shadow_importance_sampling='none'` reproduces it, and it ends elsewhere."""
    kwargs = dict(peft_config=lora(), learning_rate=0.2, max_steps=2, vllm_importance_sampling_mode=mode,
                  vllm_importance_sampling_clip_max=1.0, **SGD)  # fmt: skip
    states = {}
    for name, overrides in (("hf", {}), ("vllm", {}), ("old", {"shadow_importance_sampling": "none"})):
        trainer = make_trainer(tmp_path / name, make_model(), tokenizer, rl_dataset, sft_dataset, **kwargs,
                               **overrides)  # fmt: skip
        trainer.rollout_func = model_rollouts
        if name == "vllm":
            fake_vllm(trainer)
        trainer.train()
        states[name] = snapshot(trainer)
    for a, b in zip(states["hf"], states["vllm"], strict=True):
        assert_dicts_close(a, b, atol=2e-6, rtol=1e-5)
    old, new = states["old"][1], states["hf"][1]
    assert max((old[k] - new[k]).abs().max() for k in new) > 1e-4
