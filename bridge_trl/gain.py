"""`bridge/cooperative_gain`: how much the joint policy π(θ, w) beats the RL-only one π(θ̂, w) on RL's objective.

The paper's upper level maximises J_RL(θ, w) − J_RL(θ̂, w) (Eq. 7, 11), J = expected reward. The GRPO loss *value*
cannot show it: with one on-policy iteration the loss is −mean(advantage) at any weights, so both passes read the
same number. The meter measures it instead, in reward units under both `shadow_rollouts` modes, from each step's
data and with no extra forward pass:

- `"shared"` (both policies scored on rollouts y ~ π(θ, w)): the importance-sampling identity
      J(θ) − J(θ̂) = E_{y∼π(θ,w)}[(R(y) − b) · (1 − ρ(y))],   ρ(y) = π(θ̂,w)(y) / π(θ,w)(y) = exp Σ_t (log π̂_t − log π_t),
  exact for any baseline b independent of y (E[1 − ρ] = 0). b is the leave-one-out mean reward of the other
  completions of the same prompt, so R − b = G/(G−1) · (R − group mean) (`reward_advantages`): raw rewards, not
  GRPO's std-normalised advantages, and the *sequence* ratio, not a per-token one, so the estimate is unbiased. The
  per-token log-probabilities are those the joint and shadow RL passes compute anyway. It is 0 while θ̂ = θ.
- `"own"` (θ̂ samples its own rollouts): the difference of the mean rewards of the two policies' rollouts.
"""

from __future__ import annotations

import torch

from .logps import observe_logps

# exp(±20) ≈ 5e8: beyond that a ratio says only "far apart", and an overflow must not stop training.
_MAX_LOG_RATIO = 20.0


def reward_advantages(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """R − b per completion, b the mean reward of the *other* completions of its prompt (groups are consecutive).

    NaN rewards (unscorable completions) are left out of the means and get 0, as in GRPO's advantages.
    """
    grouped = rewards.view(-1, num_generations)
    mean = torch.nanmean(grouped, dim=1, keepdim=True)
    n = (~grouped.isnan()).sum(dim=1, keepdim=True)
    out = (grouped - mean) * n / (n - 1).clamp(min=1)  # R − mean of the others
    return torch.nan_to_num(out, nan=0.0).view(-1)


def gain_terms(joint: torch.Tensor, shadow: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor):
    """(R − b)(1 − π(θ̂,w)(y)/π(θ,w)(y)) per sequence, from (B, C) per-token log-probs and (B,) advantages."""
    log_ratio = ((shadow.double() - joint.double()) * mask).sum(dim=-1)
    return advantages.double() * (1 - torch.exp(log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)))


class GainMixin:
    """Adds `reward_advantages` (raw rewards minus the leave-one-out group mean) to GRPO's prepared batches."""

    def _calculate_rewards(self, *args, **kwargs):
        self._rewards_per_func = super()._calculate_rewards(*args, **kwargs)  # all processes' completions
        return self._rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if self.args.method != "bridge" or self.args.shadow_rollouts != "shared":
            return output  # only the shared-rollout gain reads them
        per_func, weights = self._rewards_per_func, self.reward_weights.to(self._rewards_per_func.device)
        rewards = (per_func * weights.unsqueeze(0)).nansum(dim=1)
        rewards[per_func.isnan().all(dim=1)] = torch.nan  # unscorable, as GRPO marks them
        mode = "train" if self.model.training else "eval"
        group = self.num_generations if mode == "train" else self.num_generations_eval
        local = output["prompt_ids"].size(0)  # GRPO's slice of this process
        start = self.accelerator.process_index * local
        advantages = reward_advantages(rewards, group)[start : start + local]
        output["reward_advantages"] = advantages.to(output["advantages"].device)
        return output


class GainMeter:
    def __init__(self):
        self.logps: dict[str, torch.Tensor] = {}
        self.terms = torch.zeros(2, dtype=torch.float64)  # Σ (R − b)(1 − ρ), number of sequences
        self.rewards: dict[str, list[float]] = {"joint": [], "shadow": []}

    def capture(self, trainer, which: str):
        """Record the (B, C) per-token log-probabilities that the block's GRPO loss computes, as `which`."""
        return observe_logps(trainer, lambda logps: self.logps.__setitem__(which, logps.detach()))

    def add_shared(self, inputs: dict) -> None:
        """Accumulate one micro-batch's terms (per sequence) from the captured joint and shadow log-probabilities."""
        joint, shadow = self.logps.pop("joint"), self.logps.pop("shadow")
        mask = inputs["completion_mask"] * inputs.get("tool_mask", 1)
        terms = gain_terms(joint, shadow, mask, inputs["reward_advantages"])
        self.terms += torch.stack([terms.sum(), torch.tensor(float(terms.numel()))]).double().cpu()

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
        else:  # Σ over the step's micro-batches and ranks, then the mean over sequences
            terms = accelerator.reduce(self.terms.to(accelerator.device, torch.float32), reduction="sum")
            numerator, sequences = terms.double().tolist()
            out = {"bridge/cooperative_gain": numerator / max(sequences, 1.0)}
        self.__init__()
        return out
