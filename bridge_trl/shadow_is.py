"""θ̂'s importance ratio on shared rollouts: one rule on every generation backend (`shadow_importance_sampling`).

With `shadow_rollouts="shared"` θ̂ is trained on rollouts y ∼ μ, the sampling policy of the joint step: π(θ, w),
as vLLM computed it (its reported log-probs, with `vllm_importance_sampling_correction`) or as the trainer computes
it (the joint RL pass's own per-token log-probs, detached; `old_per_token_logps` when GRPO computed them because the
samples are older than the current weights). θ̂'s update (Eq. 10) wants its on-policy gradient

    ∇ J(θ̂, w) = E_{y∼π(θ̂,w)}[A ∇ log π(θ̂,w)(y)] = E_{y∼μ}[ρ(y) A ∇ log π(θ̂,w)(y)],   ρ = π(θ̂,w)(y) / μ(y).

θ̂'s "old" log-probs are its own, detached (the sampler's are dropped from its batch), so GRPO's clipped ratio is
1 and its per-token loss has gradient A ∇ log π(θ̂,w); weighting it by ρ gives the identity above. With
`shadow_importance_sampling="truncate"` the weight is ρ truncated as TRL truncates vLLM's ratio (TIS): per sequence
(ρ = exp Σ_t (log π̂_t − log μ_t)) or per token (ρ_t = π̂_t / μ_t) as `vllm_importance_sampling_mode` says,
clamped to [`vllm_importance_sampling_clip_min`, `vllm_importance_sampling_clip_max`]. What each level estimates
(`tests/test_shadow_is.py`, exact enumeration on a 3-token vocabulary):

- sequence level, cap inactive: exactly ∇ J(θ̂, w); the cap C trades that for bounded variance (bias from the
  sequences with ρ > C, weighted C instead);
- token level: the gradient of Σ_t E_{y<t∼μ} E_{y_t∼π(θ̂,w)(·|y<t)}[Q_μ(y≤t)], Q_μ the expected advantage of the
  continuation under μ: each token's choice is re-weighted to θ̂, its prefix and continuation stay μ's. It is
  ∇ J(θ̂, w) to first order in π(θ̂, w) − μ (exactly at θ̂ = θ), the usual per-token TIS surrogate.

The same ratio, with the same μ, on HF generation and on vLLM: the same config gives the same θ̂ step on the same
samples (up to vLLM's own log-prob error, corrected only with its correction on, as for θ). π(θ̂, w) is the log-prob
the shadow's own forward computes, so the weight is written into its batch right after that forward, before GRPO's
loss reads it: no extra forward. Where GRPO multiplies `importance_sampling_ratio` into the per-token loss (vLLM with
its correction) the weight goes there, as TRL does for θ; elsewhere it scales the advantages, which is the same for
every loss GRPO clips (the loss is positively homogeneous in the advantage when the ratio is 1). Everything is per
rank: the μ of a row is on the rank that holds the row, so DDP and ZeRO need no communication.

With `shadow_rollouts="own"` θ̂ samples its own rollouts: it is on policy and gets no correction here (under vLLM,
TRL corrects the engine mismatch of θ̂'s samples as it does θ's). `"none"` keeps the paper's estimator: θ̂'s loss
carries only what θ's does.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .logps import observe_logps

# Keys of a prepared GRPO batch that describe the sampling policy π(θ, w); θ̂ is scored against its own detached
# log-probs instead (DESIGN.md §2), so they are dropped from its inputs.
SAMPLER_KEYS = ("old_per_token_logps", "importance_sampling_ratio", "sampling_per_token_logps")
_MU = "shadow_sampler_logps"  # μ's per-token log-probs, carried in θ̂'s batch until its forward


def importance_ratio(logps, sampling_logps, mask, sequence: bool, low=None, high=None, truncate: bool = True):
    """π/μ from (B, C) per-token log-probs: (B, C) per token, or (B, 1) per sequence, clamped to [low, high]
    (`truncate`) or zeroed outside it (TRL's `*_mask` modes). A token whose μ is NaN contributes ratio 1."""
    diff = torch.nan_to_num((logps - sampling_logps) * mask, nan=0.0)
    ratio = torch.exp(diff.sum(dim=-1, keepdim=True) if sequence else diff)
    if truncate:
        return ratio if low is None and high is None else torch.clamp(ratio, min=low, max=high)
    low = -math.inf if low is None else low
    high = math.inf if high is None else high
    return ratio.masked_fill((ratio < low) | (ratio > high), 0.0)


def truncated_is_ratio(trainer, logps, sampling_logps, mask, truncate: bool = True):
    """`importance_ratio` at the level and bounds of TRL's vLLM settings (`vllm_importance_sampling_*`)."""
    mode = trainer.vllm_importance_sampling_mode
    return importance_ratio(logps, sampling_logps, mask, mode.startswith("sequence"),
                            trainer.vllm_importance_sampling_clip_min, trainer.vllm_importance_sampling_clip_max,
                            truncate)  # fmt: skip


def _grpo_applies_ratio(trainer) -> bool:
    """GRPO multiplies `inputs["importance_sampling_ratio"]` into the per-token loss (and reads it)."""
    return bool(trainer.use_vllm and trainer.vllm_importance_sampling_correction)


def sampler_logps(trainer, inputs: dict, joint_logps: torch.Tensor | None) -> torch.Tensor:
    """μ's (B, C) per-token log-probs for a batch of shared rollouts: vLLM's (with its correction; NaN where it
    gave none: the trainer's π(θ, w) instead), else GRPO's `old_per_token_logps` (computed when the samples
    predate the current weights), else the joint RL pass's own (`joint_logps`, detached)."""
    if _grpo_applies_ratio(trainer):
        sampling, joint = inputs["sampling_per_token_logps"], inputs["old_per_token_logps"]
        return torch.where(sampling.isnan(), joint, sampling)
    if inputs.get("old_per_token_logps") is not None:
        return inputs["old_per_token_logps"]
    if joint_logps is None:
        raise RuntimeError(
            "θ̂'s importance ratio needs the joint RL pass's per-token log-probs, and none were observed (e.g. "
            "`use_liger_kernel` computes none); set `shadow_importance_sampling='none'`."
        )
    return joint_logps.detach()


def shadow_batch(trainer, inputs: dict, joint_logps: torch.Tensor | None) -> dict:
    """θ̂'s batch on the joint step's rollouts: the sampler's keys dropped, μ carried for `shadow_importance_sampling`."""
    mode = trainer.args.shadow_importance_sampling  # one of SHADOW_IS_MODES (checked by BridgeConfig)
    out = {k: v for k, v in inputs.items() if k not in SAMPLER_KEYS}
    if mode == "truncate":
        out[_MU] = sampler_logps(trainer, inputs, joint_logps)
    elif _grpo_applies_ratio(trainer):  # 'none': θ's engine correction π(θ,w)/π_vLLM only
        out["importance_sampling_ratio"] = inputs["importance_sampling_ratio"]
    return out


@contextmanager
def shadow_importance_sampling(trainer, inputs: dict) -> Iterator[None]:
    """Weight θ̂'s loss in the block by ρ = π(θ̂,w)/μ, truncated, from the log-probs its forward computes."""
    if _MU not in inputs:  # 'none', or θ̂'s own rollouts
        yield
        return
    sampling, advantages = inputs.pop(_MU), inputs["advantages"]
    advantages = advantages if advantages.dim() == 2 else advantages.unsqueeze(1)

    def weigh(logps):
        mask = inputs["completion_mask"] * inputs.get("tool_mask", 1)
        ratio = truncated_is_ratio(trainer, logps.detach(), sampling, mask)
        if _grpo_applies_ratio(trainer):
            inputs["importance_sampling_ratio"] = ratio
        else:
            inputs["advantages"] = advantages * ratio  # (B, C) or (B, 1)

    with observe_logps(trainer, weigh):
        yield
