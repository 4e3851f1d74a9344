"""`bridge/cooperative_gain`: how much the joint policy π(θ, w) beats the RL-only one π(θ̂, w) on RL's objective.

The paper's upper level maximises J_RL(θ, w) − J_RL(θ̂, w) (Eq. 7, 11), J = expected reward. The GRPO loss *value*
cannot show it: with one on-policy iteration the loss is −mean(advantage) at any weights, so both passes read the
same number. The meter measures it instead, in reward units under both `shadow_rollouts` modes, from each step's
data and with no extra forward pass.

`"shared"` (both policies scored on rollouts y ∼ π(θ, w)), with ρ(y) = π(θ̂,w)(y)/π(θ,w)(y) = exp Σ_t (log π̂_t −
log π_t), the *sequence* ratio, from the per-token log-probs the joint and shadow RL passes compute anyway, and
A = R − b, b the leave-one-out mean reward of the other completions of the same prompt (`reward_advantages`: raw
rewards, not GRPO's std-normalised advantages), over the step's N measured sequences:

- `bridge/cooperative_gain_is` = (1/N) Σ A (1 − ρ): the importance-sampling identity J(θ) − J(θ̂) =
  E_{y∼π(θ,w)}[(R − b)(1 − ρ)], exact for any b independent of y (E[1 − ρ] = 0). Unbiased, but ρ is heavy-tailed:
  single steps can read far outside the reward range.
- `bridge/cooperative_gain` = (1/N) Σ A − Σ ρA / Σ ρ: self-normalised importance sampling (SNIS), ρ normalised to
  mean 1 over the step. When the step holds whole groups (the default: `steps_per_generation` ≤
  `gradient_accumulation_steps`) Σ A = 0 and it is a convex combination of the −A's, so it lies within
  ±(R_max − R_min); in general within twice that. Biased by O(1/N) (measured in `tests/test_gain_estimators.py`),
  consistent, far less variable: the curve to read.
- `bridge/gain_ess` = (Σ ρ)² / (N Σ ρ²), the ratios' effective sample size as a fraction of N: 1 while θ̂ = θ, small
  when a few sequences carry all the weight (then both estimates are noisy and SNIS's bias grows).

All three are 0 (1 for the ESS) while θ̂ = θ. Both estimates treat the trainer's π(θ, w) as the sampling policy:
with vLLM sampling they are off by vLLM's mismatch (its correction applies to the losses, not here), and with
`num_iterations` > 1 (or samples older than the current step) by the policy's drift since sampling. A completion that GRPO masks out of its loss (`mask_truncated_completions`: its
tokens are masked out of the forward, so it has no log-probs) or that could not be scored (NaN reward) is not
measured: it is out of the numerators, the denominators and the other completions' baselines alike, as if it had
not been sampled. The estimates then refer to the completions that finished.

`"own"` (θ̂ samples its own rollouts): the difference of the mean rewards of the two policies' rollouts.
"""

from __future__ import annotations

import torch

from .logps import observe_logps

# exp(±20) ≈ 5e8: beyond that a ratio says only "far apart", and an overflow must not stop training.
_MAX_LOG_RATIO = 20.0
# Per-step sums: measured sequences N, Σ A, Σ A(1 − ρ), Σ ρ, Σ ρA, Σ ρ².
_SUMS = 6


def reward_advantages(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """R − b per completion, b the mean reward of the *other* completions of its prompt (groups are consecutive).

    NaN rewards (unscorable or unmeasured completions) are left out of the means and stay NaN; a completion with
    no other measured one in its group gets 0 (no baseline, no information).
    """
    grouped = rewards.view(-1, num_generations)
    mean = torch.nanmean(grouped, dim=1, keepdim=True)
    n = (~grouped.isnan()).sum(dim=1, keepdim=True)
    out = (grouped - mean) * n / (n - 1).clamp(min=1)  # R − mean of the others
    return out.view(-1)


def log_ratios(joint: torch.Tensor, shadow: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log ρ = Σ_t (log π(θ̂,w) − log π(θ,w)) over masked tokens, per sequence, from (…, C) per-token log-probs."""
    return ((shadow.double() - joint.double()) * mask).sum(dim=-1).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)


def gain_terms(joint: torch.Tensor, shadow: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor):
    """(R − b)(1 − π(θ̂,w)(y)/π(θ,w)(y)) per sequence, the unbiased estimate's terms (0 where A is NaN)."""
    return torch.nan_to_num(advantages.double(), nan=0.0) * (1 - torch.exp(log_ratios(joint, shadow, mask)))


def gain_sums(log_ratio: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """(…, N) sequence log-ratios and advantages (NaN: not measured) → (…, 6) sums (`_SUMS`) over the last dim."""
    measured = ~advantages.isnan()
    a = torch.nan_to_num(advantages.double(), nan=0.0)
    rho = torch.exp(log_ratio.double()) * measured
    terms = [measured.double(), a, a * (1 - rho), rho, rho * a, rho * rho]
    return torch.stack([t.sum(dim=-1) for t in terms], dim=-1)


def gain_estimates(sums: torch.Tensor) -> dict[str, torch.Tensor]:
    """The three metrics from (…, 6) sums; N must be > 0."""
    n, a, is_sum, rho, rho_a, rho_sq = sums.unbind(-1)
    return {
        "bridge/cooperative_gain": a / n - rho_a / rho,
        "bridge/cooperative_gain_is": is_sum / n,
        "bridge/gain_ess": rho * rho / (n * rho_sq),
    }


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
        # Masked out of GRPO's loss (`mask_truncated_completions`): not measured either (module docstring).
        if self.mask_truncated_completions:
            trained = self.accelerator.gather((output["completion_mask"].sum(dim=1) > 0).long()).bool()
            rewards[~trained.to(rewards.device)] = torch.nan
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
        self.sums = torch.zeros(_SUMS, dtype=torch.float64)  # this rank's, over the step's micro-batches
        self.rewards: dict[str, list[float]] = {"joint": [], "shadow": []}

    def capture(self, trainer, which: str):
        """Record the (B, C) per-token log-probabilities that the block's GRPO loss computes, as `which`."""
        return observe_logps(trainer, lambda logps: self.logps.__setitem__(which, logps.detach()))

    def add_shared(self, inputs: dict) -> None:
        """Accumulate one micro-batch's sums from the captured joint and shadow log-probabilities."""
        joint, shadow = self.logps.pop("joint"), self.logps.pop("shadow")
        mask = inputs["completion_mask"] * inputs.get("tool_mask", 1)
        advantages = inputs["reward_advantages"].double()
        advantages = advantages.masked_fill(mask.sum(dim=-1) == 0, float("nan"))  # no token: not measured
        self.sums += gain_sums(log_ratios(joint, shadow, mask), advantages).cpu()

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
        else:  # Σ over the step's micro-batches and ranks, then the estimates
            sums = accelerator.reduce(self.sums.to(accelerator.device, torch.float32), reduction="sum")
            sums = sums.double().cpu()
            if sums[0] > 0:
                out = {key: value.item() for key, value in gain_estimates(sums).items()}
        self.__init__()
        return out
