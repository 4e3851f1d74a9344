"""The fields of the peers `BridgeTrainer` runs beside BRIDGE: CHORD, LUFFY, ReLIFT and HPT (`bridge_trl.methods`).

A mixin of `BridgeConfig` (fields after GRPOConfig's, before BRIDGE's own), so that `config.py` keeps to BRIDGE.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

LUFFY_LOSS_TYPES = ("dapo", "dr_grpo")  # one normaliser over on- and off-policy tokens (luffy, hpt)


@dataclass
class PeerMethodsConfig:
    # CHORD (arXiv 2508.11408; `bridge_trl.chord`) and LUFFY (arXiv 2504.14945; `bridge_trl.luffy`)
    chord_mu_peak: float = field(
        default=0.1,
        metadata={
            "help": "chord: μ at the end of the warm-up, the SFT weight in (1-μ) L_GRPO + μ L_SFT-φ. Must be in [0, 1]. "
            "The default (0.1, constant) is the reference's CHORD-φ setting."
        },
    )
    chord_mu_valley: float = field(
        default=0.1,
        metadata={"help": "chord: μ after the cosine decay, held to the end of training. Must be in [0, 1]."},
    )
    chord_mu_warmup_steps: int = field(
        default=0,
        metadata={"help": "chord: optimizer steps over which μ rises linearly from 0 to `chord_mu_peak`."},
    )
    chord_mu_decay_steps: int = field(
        default=0,
        metadata={
            "help": "chord: optimizer steps, after the warm-up, over which μ decays from `chord_mu_peak` to "
            "`chord_mu_valley` along a cosine. 0 jumps to the valley."
        },
    )
    chord_phi: bool = field(
        default=True,
        metadata={
            "help": "chord: weight each SFT token's NLL by φ = p(1-p), p its probability under the current policy "
            "(detached). False gives CHORD-μ: the plain token-mean NLL."
        },
    )
    # ReLIFT (arXiv 2506.07527; `bridge_trl.relift`)
    relift_buffer_size: int = field(
        default=128,
        metadata={
            "help": "relift: examples (failed prompts with their expert traces) the buffer collects before an SFT "
            "update on them, at `sft_learning_rate` (constant); the reference script's `sft_data_size`. A multiple "
            "of the number of processes."
        },
    )
    relift_fail_reward: float = field(
        default=0.0,
        metadata={
            "help": "relift: a prompt enters the buffer when every one of its rollouts' rewards is <= this (the "
            "reference: none of a 0/1 reward's rollouts is right)."
        },
    )
    luffy_num_off_policy: int = field(
        default=1,
        metadata={
            "help": "luffy: rollouts of each group replaced by the prompt's expert trace (the last ones of the group), "
            "for prompts that have a trace in `sft_dataset`. Must be in [1, num_generations - 1]."
        },
    )
    luffy_shaping_gamma: float = field(
        default=0.1,
        metadata={
            "help": "luffy: γ of the off-policy importance weight f(π) = π / (π + γ), unclipped. Must be > 0."
        },
    )
    luffy_min_trace_coverage: float = field(
        default=0.0,
        metadata={
            "help": "luffy: the fraction of RL prompts that must have an expert trace in `sft_dataset` (paired by "
            "the rendered prompt); fewer is an error before training, naming the count. With 0, only a run where no "
            "prompt has a trace is refused (it would be plain GRPO)."
        },
    )
    # HPT (arXiv 2509.04419; `bridge_trl.hpt`)
    hpt_switch_gate: int = field(
        default=0,
        metadata={
            "help": "hpt: a prompt with at most this many correct rollouts (of its G) drops them and is trained by SFT "
            "on its expert trace; the others by GRPO. 0 (the reference's `switch_gate`): only prompts no rollout "
            "solves. Must be in [0, num_generations - 1]."
        },
    )
    hpt_sft_coef: float = field(
        default=1.0,
        metadata={
            "help": "hpt: coefficient of the SFT term (the traces' token-mean NLL) added to the GRPO loss; the "
            "reference's `sft_loss_coef` (1.0; 0.3 for Qwen2.5-Math-1.5B). Must be >= 0."
        },
    )
    hpt_correct_threshold: float = field(
        default=1.0,
        metadata={
            "help": "hpt: a rollout is correct when its reward (the weighted sum over reward functions) is >= this; "
            "1.0 is the reference's `reward == 1` for a 0/1 (or -1/1) correctness reward. Unscorable rollouts are "
            "not correct."
        },
    )
    hpt_min_trace_coverage: float = field(
        default=0.0,
        metadata={
            "help": "hpt: the fraction of RL prompts that must have an expert trace in `sft_dataset` (paired by the "
            "rendered prompt, as luffy); a prompt without one cannot switch and stays GRPO. Fewer is an error "
            "before training; with 0, only a run where no prompt has a trace is refused (it would be plain GRPO)."
        },
    )

    def _check_peer_fields(self) -> None:
        """Checks of the peers' fields, called by `BridgeConfig.__post_init__` once GRPOConfig's have run."""
        if self.relift_buffer_size < 1 or not math.isfinite(self.relift_fail_reward):
            raise ValueError(f"`relift_buffer_size` must be >= 1 (got {self.relift_buffer_size}) and "
                             f"`relift_fail_reward` finite (got {self.relift_fail_reward}).")  # fmt: skip
        for name in ("chord_mu_peak", "chord_mu_valley"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"`{name}` must be in [0, 1], got {getattr(self, name)}.")
        for name in ("chord_mu_warmup_steps", "chord_mu_decay_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)}.")
        if self.luffy_shaping_gamma <= 0:
            raise ValueError(f"`luffy_shaping_gamma` must be > 0, got {self.luffy_shaping_gamma}.")
        if not 0.0 <= self.luffy_min_trace_coverage <= 1.0:
            raise ValueError(
                f"`luffy_min_trace_coverage` must be in [0, 1], got {self.luffy_min_trace_coverage}."
            )
        if not 0.0 <= self.hpt_min_trace_coverage <= 1.0 or self.hpt_sft_coef < 0:
            raise ValueError(f"`hpt_min_trace_coverage` must be in [0, 1] (got {self.hpt_min_trace_coverage}) and "
                             f"`hpt_sft_coef` >= 0 (got {self.hpt_sft_coef}).")  # fmt: skip
        if self.method == "hpt" and not 0 <= self.hpt_switch_gate < (self.num_generations or 0):
            raise ValueError(
                f"`hpt_switch_gate` must be in [0, num_generations - 1], got {self.hpt_switch_gate}."
            )
        if self.method == "hpt" and (self.loss_type not in LUFFY_LOSS_TYPES or self.use_adaptive_entropy
                                     or self.use_liger_kernel):  # fmt: skip
            raise ValueError(
                f"method='hpt' needs `loss_type` in {LUFFY_LOSS_TYPES} (got {self.loss_type!r}), a "
                "constant `entropy_coef` and no `use_liger_kernel` (its loss reads per-token log-probs)."
            )

        if self.method != "luffy":
            return
        if not 1 <= self.luffy_num_off_policy < (self.num_generations or 0):
            raise ValueError(
                f"`luffy_num_off_policy` must be in [1, num_generations - 1] = [1, {(self.num_generations or 0) - 1}] "
                f"so that each group keeps an on-policy rollout, got {self.luffy_num_off_policy}."
            )
        # One normaliser over the whole mixed batch, as the reference: a token mean ('dapo') or, as its published
        # training script (`loss_remove_token_mean=True`), a constant per-row length ('dr_grpo').
        if self.loss_type not in LUFFY_LOSS_TYPES:
            raise ValueError(
                f"method='luffy' needs `loss_type` in {LUFFY_LOSS_TYPES} (one normaliser over on- and off-policy "
                f"tokens), got {self.loss_type!r}."
            )
        if self.use_adaptive_entropy:
            raise ValueError(
                "method='luffy' supports a constant `entropy_coef` only, not `use_adaptive_entropy`."
            )
        if self.use_liger_kernel:
            raise ValueError(
                "method='luffy' does not support `use_liger_kernel`: its loss reads per-token log-probs."
            )
