"""`bridge/cooperative_gain`: how much the joint policy π(θ, w) beats the RL-only one π(θ̂, w) on RL's objective.

The paper's upper level maximises J_RL(θ, w) − J_RL(θ̂, w) (Eq. 7, 11). The GRPO loss *value* cannot show it: with
one on-policy iteration the loss is −mean(advantage) at any weights, so both passes read the same number. The meter
measures it instead, from each step's data, with no extra forward pass:

- `shadow_rollouts="shared"` (both policies scored on rollouts from π(θ, w)): the first-order (surrogate) estimate
  J(θ) − J(θ̂) ≈ E_{π(θ,w)}[A · (1 − ρ)], ρ = π(θ̂, w) / π(θ, w) per token, averaged over completion tokens. It is 0
  while θ̂ = θ and positive when θ puts more probability than θ̂ on better-than-average completions. The two
  per-token log-probabilities are the ones the joint and shadow RL passes compute anyway.
- `shadow_rollouts="own"` (θ̂ samples its own rollouts): the Monte-Carlo difference of the mean rewards of the two
  policies' rollouts, J(θ) − J(θ̂) exactly in expectation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

# exp(±20) ≈ 5e8: beyond that a ratio says only "far apart", and an overflow must not stop training.
_MAX_LOG_RATIO = 20.0


class GainMeter:
    def __init__(self):
        self.logps: dict[str, torch.Tensor] = {}
        self.terms = torch.zeros(
            2, dtype=torch.float64
        )  # Σ A (1 − ρ) mask, Σ mask over the step's micro-batches
        self.rewards: dict[str, list[float]] = {"joint": [], "shadow": []}

    @contextmanager
    def capture(self, trainer, which: str) -> Iterator[None]:
        """Record the (B, C) per-token log-probabilities that the block's GRPO loss computes, as `which`."""
        original = trainer._get_per_token_logps_and_entropies

        def recording(*args, **kwargs):
            out = original(*args, **kwargs)
            self.logps[which] = out[0].detach()
            return out

        name, shadowed = (
            "_get_per_token_logps_and_entropies",
            "_get_per_token_logps_and_entropies" in vars(trainer),
        )
        setattr(trainer, name, recording)
        try:
            yield
        finally:
            if shadowed:
                setattr(trainer, name, original)
            else:
                delattr(trainer, name)  # back to the class's method

    def add_shared(self, inputs: dict) -> None:
        """Accumulate one micro-batch's surrogate terms from the captured joint and shadow log-probabilities."""
        joint, shadow = self.logps.pop("joint"), self.logps.pop("shadow")
        mask = inputs["completion_mask"].to(joint.dtype)  # (B, C)
        advantages = inputs["advantages"]
        advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages  # (B, 1) or (B, C)
        ratio = torch.exp((shadow - joint).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))
        self.terms += torch.stack([(advantages * (1 - ratio) * mask).sum(), mask.sum()]).double().cpu()

    def add_rewards(self, joint: list[float], shadow: list[float]) -> None:
        """Mean rewards of the generation batches each policy sampled during the micro-step (already global)."""
        self.rewards["joint"] += joint
        self.rewards["shadow"] += shadow

    def result(self, accelerator, own_rollouts: bool) -> dict[str, float]:
        """The step's metrics; collective (every rank calls it once per optimizer step). Resets the meter."""
        out = {}
        if own_rollouts:
            if not self.rewards["shadow"]:  # no generation this step (rollouts reused across steps)
                return out
            joint = sum(self.rewards["joint"]) / max(len(self.rewards["joint"]), 1)
            shadow = sum(self.rewards["shadow"]) / len(self.rewards["shadow"])
            out = {"bridge/shadow_reward": shadow, "bridge/cooperative_gain": joint - shadow}
        else:  # Σ over the step's micro-batches and ranks, then the token mean
            terms = accelerator.reduce(self.terms.to(accelerator.device, torch.float32), reduction="sum")
            numerator, tokens = terms.double().tolist()
            out = {"bridge/cooperative_gain": numerator / max(tokens, 1.0)}
        self.__init__()
        return out
