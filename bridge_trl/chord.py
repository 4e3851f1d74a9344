"""CHORD (arXiv 2508.11408): one update of θ on (1 − μ(k)) L_GRPO(θ) + μ(k) L_SFT-φ(θ).

Reference: Trinity-RFT, `trinity/algorithm/policy_loss_fn/chord_policy_loss.py` (loss `mix_chord`), whose field
names ms-swift's `chord_mu_*` options share. The trainer runs it as a `StepPlan` with SFT weight μ(k) and RL weight
1 − μ(k) (`bridge_trl.methods`); L_GRPO is exactly `rl`'s loss and L_SFT-φ is `bridge_trl.sft.sft_loss` with each
token's NLL weighted by φ = p(1 − p). Each part keeps its own token mean (GRPO's over the step's rollout tokens,
SFT's over the step's SFT completion tokens), as the reference normalises expert and on-policy data separately.
"""

from __future__ import annotations

import math

import torch


def mu_at(step: int, warmup_steps: int, decay_steps: int, peak: float, valley: float) -> float:
    """μ(k) at optimizer step k (0-based): linear warm-up 0 → peak over `warmup_steps`, then cosine decay
    peak → valley over `decay_steps`, then constant at valley (the reference's `mu_schedule_function`).

    With `warmup_steps = decay_steps = 0`, μ ≡ valley; with `peak = valley` and no warm-up, μ is constant.
    """
    if step < warmup_steps:
        return step / warmup_steps * peak
    if step >= warmup_steps + decay_steps:
        return valley
    progress = (step - warmup_steps) / decay_steps  # in [0, 1)
    return valley + (peak - valley) * 0.5 * (1.0 + math.cos(math.pi * progress))


def phi_weights(token_logps: torch.Tensor) -> torch.Tensor:
    """φ = p(1 − p) per token, p = exp(log p) under the current policy, detached: (B, C) → (B, C).

    φ is a weight, not part of the objective's gradient (the reference multiplies `-logprob` by `phi.detach()`),
    so ∇ L_SFT-φ = −Σ φ ∇ log p / N. It vanishes for tokens the policy already predicts with certainty (p → 1) and
    for ones it finds implausible (p → 0), keeping the SFT signal on uncertain tokens.
    """
    p = token_logps.detach().exp()
    return p * (1.0 - p)
