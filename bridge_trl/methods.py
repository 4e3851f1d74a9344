"""What one optimizer step does under each method the paper compares (DESIGN.md §3).

Every method runs through the same `BridgeTrainer` loop, data pipeline and step budget: at step k all of them are
handed the same RL prompt batch and the same SFT batch positions, and each uses what its definition needs.

| method        | step k                                                                  |
|---------------|-------------------------------------------------------------------------|
| `bridge`      | Algorithm 2: joint update of θ (and w), RL-only update of θ̂, gain in w  |
| `mix`         | the joint loss (1-λ) L_SFT + λ L_RL on θ: BRIDGE without its upper level |
| `alternating` | Algorithm 1: a GRPO update, then an SFT update at the new point          |
| `rl`          | GRPO only (RL-zero)                                                      |
| `sft`         | SFT only                                                                 |
| `cold_start`  | SFT for the first steps, then GRPO                                       |
| `chord`       | (1-μ) L_GRPO + μ L_SFT-φ on θ, μ(k) scheduled (`bridge_trl.chord`)      |
| `luffy`       | GRPO on groups where expert traces replace rollouts (`bridge_trl.luffy`) |
| `hpt`         | per prompt: SFT on its trace if ≤ gate rollouts are right, else GRPO (`bridge_trl.hpt`) |
| `relift`      | GRPO; failed prompts' traces buffered, an SFT update when it is full (`bridge_trl.relift`) |
"""

from __future__ import annotations

from dataclasses import dataclass

METHODS = ("bridge", "mix", "alternating", "rl", "sft", "cold_start", "chord", "luffy", "hpt", "relift")


@dataclass(frozen=True)
class StepPlan:
    """The terms one step computes, and their weights in the step's backward (0: evaluated, not trained)."""

    sft: bool  # compute L_SFT(θ, w) on the step's SFT batch
    rl: bool  # generate rollouts and compute L_RL(θ, w)
    sft_weight: float = 0.0
    rl_weight: float = 0.0
    shadow: bool = False  # BRIDGE: the RL pass at (θ̂, w), θ̂'s update and the cooperative-gain term of g_w
    sft_after: bool = False  # alternating: a second update, on L_SFT at the point the RL update reached

    def last_backward(self, shadow_through_engine: bool = True) -> str:
        """The micro-step's last backward through DeepSpeed's engine ('shadow', 'rl' or 'sft'): its boundary."""
        if self.shadow and shadow_through_engine:
            return "shadow"
        return "rl" if self.rl and self.rl_weight != 0.0 else "sft"


def cold_start_switch(sft_steps: int | None, sft_ratio: float, max_steps: int) -> int:
    """First optimizer step of cold start's RL phase."""
    return sft_steps if sft_steps is not None else round(sft_ratio * max_steps)


def step_plan(method: str, lam: float, step: int, switch: int) -> StepPlan:
    """The plan of optimizer step `step` (0-based); `switch` is cold start's first RL step. For `chord`, `lam` is
    μ(k), the SFT weight."""
    if method == "bridge":
        return StepPlan(sft=True, rl=True, sft_weight=1.0 - lam, rl_weight=lam, shadow=True)
    if method == "mix":
        return StepPlan(sft=True, rl=True, sft_weight=1.0 - lam, rl_weight=lam)
    if method == "rl" or (method == "cold_start" and step >= switch):
        return StepPlan(sft=False, rl=True, rl_weight=1.0)
    if method == "sft" or method == "cold_start":
        return StepPlan(sft=True, rl=False, sft_weight=1.0)
    if method == "alternating":
        return StepPlan(sft=False, rl=True, rl_weight=1.0, sft_after=True)
    if method == "chord":  # CHORD's single update of θ on (1 − μ) L_GRPO + μ L_SFT-φ
        return StepPlan(sft=True, rl=True, sft_weight=lam, rl_weight=1.0 - lam)
    if method == "luffy":  # GRPO's step; the traces enter through the rollouts and the loss (`LuffyMixin`)
        return StepPlan(sft=False, rl=True, rl_weight=1.0)
    if (
        method == "hpt"
    ):  # one update; switched prompts' traces enter through the batch and the loss (`HptMixin`)
        return StepPlan(sft=False, rl=True, rl_weight=1.0)
    if method == "relift":  # GRPO's step; the buffer's SFT update runs after it when full (`ReliftMixin`)
        return StepPlan(sft=False, rl=True, rl_weight=1.0)
    raise ValueError(f"Unknown method {method!r}; expected one of {METHODS}.")
