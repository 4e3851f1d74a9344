"""`BridgeConfig`: GRPOConfig plus the fields of BRIDGE (arXiv 2509.06948, Algorithm 2)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from transformers.utils import is_torch_bf16_gpu_available
from trl import GRPOConfig

from .checks import check_cold_start_switch
from .cold_start import check_val_loss_switch
from .methods import METHODS
from .peer_config import PeerMethodsConfig

logger = logging.getLogger(__name__)

LAMBDA_SCHEDULES = ("constant", "linear", "cosine")
# Below this, an SGD-stepped θ̂ barely leaves θ⁰ (Adam-scale rates are ~1e-7 to 1e-4; SGD on LMs needs ~1e-2+).
SGD_SHADOW_MIN_LR = 1e-3
SHADOW_ROLLOUTS = ("shared", "own")
SHADOW_IS_MODES = ("truncate", "none")  # `bridge_trl.shadow_is`


@dataclass
class BridgeConfig(PeerMethodsConfig, GRPOConfig):
    r"""
    Configuration class for [`BridgeTrainer`].

    Inherits every [`trl.GRPOConfig`] field (generation, rewards, loss type, logging, ...). `learning_rate` is α, the
    learning rate of the base weights θ and of the shadow θ̂; `adapter_learning_rate` is β, the learning rate of the
    LoRA adapter w. Both follow `lr_scheduler_type` and use the optimizer named by `optim`.

    λ (`bridge_lambda`) weighs SFT against RL in the joint objective (Eq. 7-8): `(1 - λ) J_SFT + λ J_RL`. The paper
    fixes λ = 0.5 in its experiments but describes an annealed λ that "increases from a small value"; both are
    available through `lambda_schedule`.
    """

    method: str = field(
        default="bridge",
        metadata={
            "help": "Training method: 'bridge' (Algorithm 2), or one of the methods it is compared with on the same "
            "data and step budget: 'mix' (joint loss on θ, no shadow), 'alternating' (Algorithm 1), 'rl' (GRPO "
            "only), 'sft' (SFT only), 'cold_start' (SFT, then GRPO), 'chord' ((1-μ) GRPO + μ φ-weighted SFT, "
            "arXiv 2508.11408), 'luffy' (expert traces in the GRPO groups, arXiv 2504.14945), 'hpt' (per prompt, "
            "SFT on its trace where the rollouts fail, else GRPO, arXiv 2509.04419) or 'relift' (GRPO, plus SFT "
            "updates on a buffer of the prompts it fails, arXiv 2506.07527). Only 'bridge' attaches an adapter by "
            "default."
        },
    )
    cold_start_sft_ratio: float = field(
        default=0.5,
        metadata={
            "help": "cold_start: fraction of `max_steps` spent on SFT before switching to GRPO. Cold start is a "
            "two-stage pipeline: at the switch θ's optimizer state is reset (moments, step counts), and each phase "
            "follows `lr_scheduler_type` over its own length, with `warmup_ratio`/`warmup_steps` applied from its "
            "own start, so the RL phase is a GRPO run started from the SFT model."
        },
    )
    cold_start_sft_steps: int | None = field(
        default=None,
        metadata={"help": "cold_start: number of SFT steps before switching to GRPO; overrides the ratio."},
    )
    # cold start switch (`bridge_trl.cold_start`): the SFT phase ends where its held-out loss stops improving
    cold_start_switch: str = field(
        default="ratio",
        metadata={
            "help": "cold_start: when the SFT phase ends. 'ratio': at the fixed step `cold_start_sft_steps` (or "
            "`cold_start_sft_ratio` × max_steps). 'val_loss': when SFT's loss on a held-out slice of `sft_dataset` "
            "stops improving (`cold_start_patience` evaluations without a drop > `cold_start_min_delta`), as arXiv "
            "2512.11470 switches; the fixed step is then the cap on SFT steps, and the SFT phase's schedule is "
            "planned over that cap (cut short at the switch)."
        },
    )
    cold_start_val_size: float = field(
        default=0.05,
        metadata={
            "help": "cold_start_switch='val_loss': held-out slice of `sft_dataset`, never trained on; a fraction "
            "in (0, 1) or a number of examples (>= 1). Drawn with `seed`."
        },
    )
    cold_start_eval_steps: int = field(
        default=10,
        metadata={
            "help": "cold_start_switch='val_loss': evaluate the held-out loss every this many SFT steps."
        },
    )
    cold_start_patience: int = field(
        default=3,
        metadata={
            "help": "cold_start_switch='val_loss': switch to GRPO after this many evaluations in a row without an "
            "improvement of the best held-out loss by more than `cold_start_min_delta`."
        },
    )
    cold_start_min_delta: float = field(
        default=0.0,
        metadata={
            "help": "cold_start_switch='val_loss': smallest drop of the held-out loss that counts as one."
        },
    )
    sft_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate of the SFT updates of `alternating` (α_SFT of Algorithm 1), of `cold_start`'s "
            "SFT phase and of `relift`'s buffer updates; `learning_rate` is then the RL rate α_RL. Defaults to "
            "`learning_rate`. It follows the same scheduler (cold start: the SFT phase's own schedule), except "
            "under `relift`, whose SFT rate is constant as in its reference."
        },
    )
    adapter_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "β: learning rate of the LoRA adapter w (Algorithm 2, line 14). Defaults to `learning_rate` (α). "
            "It follows the same scheduler as α."
        },
    )
    bridge_lambda: float = field(
        default=0.5,
        metadata={
            "help": "λ ∈ [0, 1]: weight of the RL objective in the joint loss (1-λ) L_SFT + λ L_RL, and of the "
            "cooperative-gain term in the adapter update (Eq. 11). With an annealed schedule, the final value."
        },
    )
    lambda_schedule: str = field(
        default="constant",
        metadata={
            "help": "How λ evolves over optimizer steps: 'constant' (always `bridge_lambda`, the paper's experiments), "
            "'linear' or 'cosine' (from `lambda_start` to `bridge_lambda` over the first `lambda_warmup_ratio` of "
            "training, then constant)."
        },
    )
    lambda_start: float = field(
        default=0.0,
        metadata={"help": "λ at step 0 for the 'linear' and 'cosine' schedules. Must be in [0, 1]."},
    )
    lambda_warmup_ratio: float = field(
        default=1.0,
        metadata={
            "help": "Fraction of the optimizer steps over which an annealed λ moves from `lambda_start` to "
            "`bridge_lambda`; 1.0 anneals over the whole run. Ignored by 'constant'. Must be in (0, 1]."
        },
    )
    per_device_sft_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "SFT examples per device per micro-batch (the SFT counterpart of `per_device_train_batch_size`, "
            "which counts completions). Defaults to the number of RL prompts per micro-batch, "
            "max(1, per_device_train_batch_size // num_generations): one trace per RL prompt."
        },
    )
    max_sft_length: int | None = field(
        default=None,
        metadata={
            "help": "Truncate each SFT example (prompt + completion tokens) to this many tokens, cutting the end of "
            "the completion. `None` keeps whole examples."
        },
    )
    shadow_rollouts: str = field(
        default="shared",
        metadata={
            "help": "Rollouts the shadow θ̂ is scored on. 'shared': the rollouts sampled from π(θ, w) for the joint "
            "update, so one generation per step (the paper's later version). 'own': θ̂ samples its own rollouts "
            "from π(θ̂, w), an exact on-policy J_RL(θ̂, w) at twice the generation cost (with vLLM, π(θ̂, w) is "
            "synced to the engine for it)."
        },
    )
    shadow_importance_sampling: str = field(
        default="truncate",
        metadata={
            "help": "Shared rollouts: how θ̂'s loss accounts for rollouts sampled from μ = π(θ, w) (vLLM's log-probs "
            "with its correction on, else the joint pass's), on every generation backend alike. 'truncate': each "
            "token's loss is weighted by the ratio π(θ̂, w)/μ, per token or per sequence as "
            "`vllm_importance_sampling_mode` says, truncated to [`vllm_importance_sampling_clip_min`, "
            "`vllm_importance_sampling_clip_max`] (default C = 3), so θ̂'s step estimates its on-policy gradient "
            "(Eq. 10). 'none': θ̂'s loss carries only what θ's carries (the paper's estimator, "
            "E_{π(θ,w)}[A ∇ log π(θ̂,w)], off-policy once θ̂ leaves θ). Ignored with `shadow_rollouts='own'`."
        },
    )
    shadow_offload: str = field(
        default="none",
        metadata={
            "help": "Where θ̂ and its optimizer state live between uses: 'none' (beside θ, no copies) or 'cpu' "
            "(CPU memory, pinned on CUDA machines; copied to the device for the shadow's pass, stepped on the CPU)."
        },
    )
    shadow_optimizer: str = field(
        default="same",
        metadata={
            "help": "Optimizer of θ̂: 'same' (the kind `optim` names, with its own state) or 'sgd' (plain SGD, "
            "which keeps no state at all, at `learning_rate`; at adaptive-optimizer rates such as 5e-7 θ̂ then barely "
            "moves from θ⁰, which a warning points out)."
        },
    )
    save_merged: bool = field(
        default=False,
        metadata={
            "help": "Also write the policy with the adapter merged into the base under `<output_dir>/merged`, "
            "loadable with `AutoModelForCausalLM.from_pretrained` alone."
        },
    )
    merge_adapter_for_generation: bool = field(
        default=True,
        metadata={
            "help": "HF generation (not vLLM, which merges anyway) samples from π(θ, w) with the adapter merged into "
            "a copy of the adapted weights and θ restored exactly afterwards (`bridge_trl.merged_generation`): an "
            "unmerged LoRA layer adds three kernels per linear layer to every decoding step. Costs one transient "
            "copy of the adapted weights while generating; not applied under ZeRO-3."
        },
    )

    def __post_init__(self):
        # TRL turns an unset `bf16` on wherever torch runs; TrainingArguments then refuses it on a machine without a
        # bf16 GPU unless `use_cpu` is set. Unset, it means "where the hardware supports it", so CPU runs are fp32.
        if self.bf16 is None and not self.fp16 and not self.use_cpu and not is_torch_bf16_gpu_available():
            self.bf16 = False
        super().__post_init__()
        if self.method not in METHODS:
            raise ValueError(f"`method` must be one of {METHODS}, got {self.method!r}.")
        # Checked before `sft_learning_rate`/`adapter_learning_rate` inherit it, so the error names the field set.
        if self.learning_rate < 0:
            raise ValueError(f"`learning_rate` must be >= 0, got {self.learning_rate}.")
        if self.adapter_learning_rate is None:
            self.adapter_learning_rate = self.learning_rate
        if self.sft_learning_rate is None:
            self.sft_learning_rate = self.learning_rate
        if not 0.0 <= self.cold_start_sft_ratio <= 1.0:
            raise ValueError(f"`cold_start_sft_ratio` must be in [0, 1], got {self.cold_start_sft_ratio}.")
        if self.cold_start_sft_steps is not None and self.cold_start_sft_steps < 0:
            raise ValueError(f"`cold_start_sft_steps` must be >= 0, got {self.cold_start_sft_steps}.")
        # cold start switch
        check_val_loss_switch(self)
        if (
            self.method == "cold_start" and self.max_steps > 0
        ):  # with epochs, checked once the length is known
            check_cold_start_switch(self.cold_start_sft_steps, self.cold_start_sft_ratio, self.max_steps)
        for name in ("bridge_lambda", "lambda_start"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"`{name}` must be in [0, 1], got {value}.")
        if self.lambda_schedule not in LAMBDA_SCHEDULES:
            raise ValueError(
                f"`lambda_schedule` must be one of {LAMBDA_SCHEDULES}, got {self.lambda_schedule!r}."
            )
        if not 0.0 < self.lambda_warmup_ratio <= 1.0:
            raise ValueError(f"`lambda_warmup_ratio` must be in (0, 1], got {self.lambda_warmup_ratio}.")
        for name in ("adapter_learning_rate", "sft_learning_rate"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)}.")
        if self.per_device_sft_batch_size is None:
            self.per_device_sft_batch_size = max(
                1, self.per_device_train_batch_size // (self.num_generations or 1)
            )
        if self.per_device_sft_batch_size < 1:
            raise ValueError(
                f"`per_device_sft_batch_size` must be >= 1, got {self.per_device_sft_batch_size}."
            )
        if self.max_sft_length is not None and self.max_sft_length < 2:
            raise ValueError(f"`max_sft_length` must be >= 2 or None, got {self.max_sft_length}.")
        if self.shadow_importance_sampling not in SHADOW_IS_MODES:
            raise ValueError(
                f"`shadow_importance_sampling` must be one of {SHADOW_IS_MODES}, got {self.shadow_importance_sampling!r}."
            )
        if self.shadow_rollouts not in SHADOW_ROLLOUTS:
            raise ValueError(
                f"`shadow_rollouts` must be one of {SHADOW_ROLLOUTS}, got {self.shadow_rollouts!r}."
            )
        if self.shadow_offload not in ("none", "cpu"):
            raise ValueError(f"`shadow_offload` must be 'none' or 'cpu', got {self.shadow_offload!r}.")
        if self.shadow_optimizer not in ("same", "sgd"):
            raise ValueError(f"`shadow_optimizer` must be 'same' or 'sgd', got {self.shadow_optimizer!r}.")
        optim = str(getattr(self.optim, "value", self.optim))
        if self.method == "bridge" and self.shadow_optimizer == "sgd" and "sgd" not in optim:
            if self.learning_rate <= SGD_SHADOW_MIN_LR:
                logger.warning(
                    "shadow_optimizer='sgd' steps θ̂ by plain SGD at learning_rate=%g, a rate tuned for `%s`. An "
                    "SGD step is lr × gradient (no per-parameter normalisation), so at adaptive-optimizer rates θ̂ "
                    "stays ≈ θ⁰ and the cooperative-gain term of w's update (Eq. 11) compares θ with the initial "
                    "model. Use shadow_optimizer='same' (θ̂ gets an optimizer like θ's), or an SGD-scale rate.",
                    self.learning_rate, optim,
                )  # fmt: skip
        if self.fp16:
            # The shadow's gradients bypass the fp16 GradScaler's unscale/skip logic; bf16 needs no scaler.
            raise ValueError("`fp16=True` is not supported by BridgeTrainer: use `bf16=True`.")
        self._check_peer_fields()  # chord, luffy, relift, hpt (`bridge_trl.peer_config`)

    def lambda_at(self, step: int, max_steps: int) -> float:
        """λ(k) for optimizer step `step` (0-based) of a run of `max_steps` steps.

        An annealed λ ramps over R = ceil(`lambda_warmup_ratio` · max_steps) steps: step 0 gets `lambda_start` and
        step R − 1, the ramp's last, gets `bridge_lambda` (so a whole-run ramp ends at its final value); a ramp of
        one step is `bridge_lambda` from the start.
        """
        if self.lambda_schedule == "constant":
            return self.bridge_lambda
        ramp = max(1, math.ceil(self.lambda_warmup_ratio * max_steps))
        t = min(1.0, step / (ramp - 1)) if ramp > 1 else 1.0
        if self.lambda_schedule == "cosine":
            t = 0.5 * (1.0 - math.cos(math.pi * t))
        return self.lambda_start + (self.bridge_lambda - self.lambda_start) * t
