"""`BridgeTrainer`: BRIDGE (arXiv 2509.06948, Algorithm 2) as a TRL `GRPOTrainer` subclass."""

from __future__ import annotations

import logging
import resource
import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext

import torch
from accelerate.utils import is_peft_model
from trl import GRPOTrainer
from trl.models.utils import prepare_deepspeed
from trl.trainer.utils import add_fused_lm_head, create_model_from_path, disable_dropout_in_model

from .card import BRIDGE_PAPER, BridgeCardMixin
from .checkpoint import BridgeCheckpointMixin
from .checks import DEFAULT_ADAPTER, ColdStartSwitchCheck, RewardChecksMixin, check_inputs
from .chord import mu_at
from .cold_start import init_val_loss_switch
from .config import BridgeConfig
from .diagnostics import UpperLevelDiagnostics
from .gain import GainMeter, GainMixin
from .hpt import HPT_KEY, TRACE_ROW, HptMixin
from .luffy import OFF_POLICY_KEY, LuffyMixin
from .merged_generation import MergedGenerationMixin
from .methods import StepPlan, step_plan
from .optim import BridgeOptimizersMixin
from .relift import ReliftMixin
from .sft import build_sft_stream, sft_loss
from .shadow import ShadowWeights, split_parameters
from .shadow_is import shadow_batch, shadow_importance_sampling
from .vllm_sync import install_vllm_sync
from .zero import check_backend, initial_reference

logger = logging.getLogger(__name__)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: allocated on the accelerator, else the CPU resident set (Linux: KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


class BridgeTrainer(BridgeCardMixin, BridgeCheckpointMixin, BridgeOptimizersMixin, GainMixin, HptMixin, LuffyMixin,
                    ReliftMixin, MergedGenerationMixin, RewardChecksMixin, GRPOTrainer):  # fmt: skip
    """
    Trainer for BRIDGE: cooperative SFT and RL by bilevel optimisation (https://huggingface.co/papers/2509.06948).

    Each optimizer step k computes, at the same point (θᵏ, θ̂ᵏ, wᵏ) and with λ = λ(k):

    - g_θ = ∇_θ [(1-λ) L_SFT(θ,w) + λ L_RL(θ,w)]               → θ ← opt(g_θ), lr α   (Eq. 8)
    - g_θ̂ = ∇_θ̂ L_RL(θ̂,w)                                     → θ̂ ← opt(g_θ̂), lr α   (Eq. 10)
    - g_w = ∇_w [(1-λ) L_SFT(θ,w) + λ L_RL(θ,w)] − λ ∇_w L_RL(θ̂,w)  → w ← opt(g_w), lr β  (Eq. 11)

    θ are the model's weights (trained in full), w a LoRA adapter (`peft_config`, default r = α = 16 on all linear
    layers) and θ̂ a shadow copy of θ trained by RL only, swapped into the model's parameters for its pass
    (`bridge_trl.shadow`; under DeepSpeed `bridge_trl.zero`). L_RL is GRPO's loss on the step's rollouts, sampled
    once from π(θ, w) and shared by θ̂ (or, with `shadow_rollouts="own"`, sampled by θ̂ from π(θ̂, w)).

    `method` also runs the paper's baselines from the same loop, data and budget (`bridge_trl.methods`): `mix`,
    `alternating`, `rl`, `sft` and `cold_start`, and CHORD and LUFFY (`chord`, `luffy`: `bridge_trl.chord`,
    `bridge_trl.luffy`). They train θ only, with no adapter unless `peft_config` is given.

    Hooks overridden, everything else is GRPOTrainer's: `training_step` (Algorithm 2) and `log` (data consumed)
    here; `create_optimizer` (α/β groups, θ̂'s optimizer, alternating's SFT optimizer) in `bridge_trl.optim`;
    `save_model` (θ plus adapter), `train` (complete checkpoints only), `_load_from_checkpoint`,
    `_save_optimizer_and_scheduler` and `_load_optimizer_and_scheduler` (θ̂ and the extra optimizers) in
    `bridge_trl.checkpoint`; `_generate_single_turn`, `_generate_and_score_completions`, `_compute_loss` (luffy
    only) in `bridge_trl.luffy`; `create_model_card` in `bridge_trl.card`; `_calculate_rewards` (non-finite or
    non-numeric rewards stop training) in `bridge_trl.checks`, which also checks every input before any step.
    `_generate_single_turn` again in `bridge_trl.merged_generation` (HF generation samples from the merged adapter).
    With `use_vllm`, the weights synced to vLLM are π(θ, w) (`bridge_trl.vllm_sync`).

    Args:
        sft_dataset: (prompt, reasoning trace + answer) pairs in TRL's SFT formats: `prompt`/`completion` (strings,
            or message lists) or `messages`. Prompts are rendered with the same template as RL prompts.
        Other arguments are GRPOTrainer's.
    """

    _tag_names = ["trl", "grpo", "bridge"]
    _name = "BRIDGE"
    _paper = BRIDGE_PAPER  # the card names the method actually run and its paper (`bridge_trl.card`)

    def __init__(self, model, reward_funcs=None, args: BridgeConfig | None = None, train_dataset=None,
                 sft_dataset=None, peft_config=DEFAULT_ADAPTER, **kwargs):  # fmt: skip
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = BridgeConfig(f"{str(name).split('/')[-1] or 'model'}-BRIDGE")
        if not isinstance(args, BridgeConfig):
            raise TypeError(f"`args` must be a BridgeConfig, got {type(args).__name__}.")
        # Before any model is loaded: data and rewards per method, prompt formats, the adapter (`bridge_trl.checks`)
        reward_funcs, sft_dataset, peft_config = check_inputs(reward_funcs, args, train_dataset, sft_dataset,
                                                              peft_config)  # fmt: skip
        if kwargs.get("optimizers", (None, None))[0] is not None:
            raise ValueError("BridgeTrainer builds its own optimizers (θ, w, θ̂); do not pass `optimizers`.")
        if not isinstance(model, str) and is_peft_model(model):
            raise ValueError(
                "Pass the base model and a `peft_config`: the trainer attaches the adapter itself."
            )
        if args.sync_ref_model:
            raise ValueError("`sync_ref_model` is not supported: the KL reference is the initial policy.")
        if isinstance(model, str):
            init_kwargs = dict(args.model_init_kwargs or {})
            if args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
                init_kwargs["device_map"] = None
            model = create_model_from_path(model, **init_kwargs)
        # With the base trained, "adapter disabled" is no longer the initial policy: the KL reference is a frozen
        # copy of π(θ⁰, w⁰), taken before the (zero-initialised) adapter is attached. GRPOTrainer would reload
        # one from the model id instead, so it is built with β = 0 and given this copy afterwards.
        reference = initial_reference(model, args.model_init_kwargs) if args.beta != 0.0 else None
        beta, args.beta = args.beta, 0.0
        try:
            super().__init__(model, reward_funcs, args=args, train_dataset=train_dataset,
                             peft_config=peft_config, **kwargs)  # fmt: skip
        finally:
            args.beta = self.beta = beta
        check_backend(args.method, self.accelerator, self.is_deepspeed_enabled, self.is_fsdp_enabled, args,
                      self.model)  # fmt: skip
        if self.use_vllm:  # vLLM gets π(θ, w): θ with w merged, out of place, one tensor at a time
            install_vllm_sync(self.vllm_generation, self.model)
        if reference is not None:
            self._set_reference_model(reference)

        base, adapter = split_parameters(self.model)
        for _, param in base:
            param.requires_grad_(True)  # θ is trained in full, unlike plain LoRA fine-tuning
        if args.method == "bridge" and not adapter:
            raise ValueError("method='bridge' needs an adapter w; pass a LoRA `peft_config`.")
        self.shadow = self.shadow_optimizer = self.sft_optimizer = None
        if args.method == "bridge" and not self.is_deepspeed_enabled:
            self.shadow = ShadowWeights(base, [p for _, p in adapter], offload=args.shadow_offload == "cpu")
            self._log_shadow_size()
        # Under DeepSpeed, θ̂ is built from the engine's state once the engine exists (`_ensure_shadow`).
        self.sft_dataset, self.sft_stream = build_sft_stream(self, sft_dataset)  # None for 'rl'
        self._init_luffy()  # luffy: the traces of the RL prompts (`bridge_trl.luffy`)
        self._init_hpt()  # hpt: the same lookup, for the prompts that switch to SFT (`bridge_trl.hpt`)
        self._init_relift()  # relift: the traces and the buffer of failed prompts (`bridge_trl.relift`)
        init_val_loss_switch(self)  # cold start, val_loss: the held-out slice (`bridge_trl.cold_start`)
        self.add_callback(ColdStartSwitchCheck())  # the run's length is known once `train()` starts
        # The fused LM head is bound to GRPO's sampling temperature: SFT's NLL uses it at T = 1 only. CHORD scores
        # its SFT tokens (and φ) at the rollout temperature, as Trinity-RFT does, so it always uses it.
        self._fused_sft = self.temperature == 1.0 or args.method == "chord"
        self._chord_phi = args.method == "chord" and args.chord_phi
        self._step_sums = torch.zeros(
            6, dtype=torch.float64
        )  # sft, rl, shadow losses; rl tokens; luffy traces
        self.gain, self._shadow_buffer = GainMeter(), None  # cooperative gain; θ̂'s rollouts ('own')
        self.diagnostics = UpperLevelDiagnostics(
            self.model, args.method, self.is_deepspeed_enabled
        )  # issue 27
        self.consumed = dict.fromkeys(("sft_samples", "sft_tokens", "rl_samples", "rl_tokens"), 0)
        logger.info("%s: θ %d tensors, w %d tensors, %d SFT examples", args.method, len(base), len(adapter),
                    len(self.sft_dataset or ()))  # fmt: skip

    def _set_reference_model(self, reference) -> None:
        if self.args.disable_dropout:
            disable_dropout_in_model(reference)
        add_fused_lm_head(
            reference, temperature=self.temperature, cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32
        )
        reference.requires_grad_(False).eval()
        if self.is_deepspeed_enabled:
            self.ref_model = prepare_deepspeed(reference, self.accelerator)
        else:
            self.ref_model = self.accelerator.prepare_model(reference, evaluation_mode=True)

    # ------------------------------------------------------------------ Algorithm 2, one micro-batch
    def training_step(self, model, inputs, num_items_in_batch=None):
        start = time.perf_counter()
        model.train()
        plan, lam = self.step_plan(), self.current_lambda()
        micro = self._step % self.args.gradient_accumulation_steps
        self._maybe_start_rl_phase(micro)  # cold start: the RL phase starts from a fresh optimizer
        sft = rl = shadow = torch.zeros((), device=self.accelerator.device)
        if plan.rl:  # GRPO: rollouts from π(θᵏ, wᵏ), rewards, group advantages
            raw_inputs, rewards_before = inputs, len(self._metrics["train"]["reward"])
            inputs = self._prepare_inputs(inputs)

        # Line 5 & 7: the joint objective at (θᵏ, wᵏ), (1-λ) L_SFT + λ L_RL. Its backward gives g_θ and the joint
        # part of g_w. The two terms are backpropagated one at a time so that only one graph is alive at once.
        if plan.sft:
            batch = self._sft_micro_batch(micro)
            self.diagnostics.before_sft()  # w's SFT term S, apart from the gain term (`bridge_trl.diagnostics`)
            sft = self._weighted_backward(
                lambda: sft_loss(model, batch, self._fused_sft, phi=self._chord_phi), plan.sft_weight, "sft"
            )
            self.diagnostics.after_sft()
        # Shared rollouts: the gain meter and θ̂'s ratio read the per-token log-probs both RL passes compute anyway.
        measure = plan.shadow and self.args.shadow_rollouts == "shared"
        if plan.rl:
            with self.gain.capture(self, "joint") if measure else nullcontext():
                rl = self._weighted_backward(lambda: self.compute_loss(model, inputs), plan.rl_weight, "rl")

        # Line 5 & 12 & 14: the RL objective at (θ̂ᵏ, wᵏ), on the same rollouts (or θ̂'s own). With θ̂ swapped in,
        # the backward accumulates g_θ̂ in θ̂'s gradient buffers, and its adapter part enters g_w with weight −λ.
        if plan.shadow:
            self._ensure_shadow()
            with (
                self.shadow.swapped_in(adapter_grad_scale=-lam),
                self._isolated_grpo_state() as shadow_metrics,
            ):
                shadow_inputs = self._shadow_inputs(raw_inputs, inputs)
                # ZeRO-1/2: the bare module, outside the engine's gradient hooks (`bridge_trl.zero`)
                shadow_model = self.model if self._shadow_bypasses_engine else model
                capture = self.gain.capture(self, "shadow") if measure else nullcontext()
                with capture, shadow_importance_sampling(self, shadow_inputs):  # θ̂'s ratio π(θ̂,w)/μ
                    compute = lambda: self.compute_loss(shadow_model, shadow_inputs)  # noqa: E731
                    shadow = self._weighted_backward(compute, 1.0, "shadow")
            if measure:
                self.gain.add_shared(inputs)
            else:
                joint_rewards = self._metrics["train"]["reward"][rewards_before:]
                self.gain.add_rewards(joint_rewards, shadow_metrics["train"]["reward"])
        rl_tokens = inputs["completion_mask"].sum() if plan.rl else torch.zeros((), device=sft.device)
        traces = torch.zeros(
            2, device=sft.device
        )  # luffy: trace rows and tokens, SFT data rather than rollouts
        if plan.rl and (OFF_POLICY_KEY in inputs or HPT_KEY in inputs):  # luffy's / hpt's trace rows
            off = inputs[OFF_POLICY_KEY] if OFF_POLICY_KEY in inputs else inputs[HPT_KEY] == TRACE_ROW  # (B,)
            traces = torch.stack([off.sum(), (inputs["completion_mask"].sum(1) * off).sum()]).float()
        # Stops on a non-finite loss, before anything moves.
        self._record(plan, lam, sft, rl, shadow, rl_tokens, traces)

        # Line 10, 12, 14: the optimizers apply g_θ, g_w (Trainer) and g_θ̂ (`_after_optimizer_step`).
        if self.is_deepspeed_enabled and self.accelerator.sync_gradients:
            self._deepspeed_step()
        # GRPOTrainer.training_step's bookkeeping: the micro-step counter drives its generation buffer.
        self._step += 1
        self._current_train_step_time += time.perf_counter() - start
        if self._step % self.current_gradient_accumulation_steps == 0:
            self._metrics["train"]["step_time"].append(self._current_train_step_time)
            self._current_train_step_time = 0.0
        return (plan.sft_weight * sft + plan.rl_weight * rl).to(self.args.device)

    def _after_optimizer_step(self, optimizer, *_, lr_factor: float | None = None) -> None:
        """Runs right after θ's (and w's) update: θ̂'s update (bridge), or the SFT update (alternating)."""
        self.diagnostics.post_step(
            self, self._metrics["train"]
        )  # θ's and w's updates, before anything else moves
        lr_factor = self._lr_factor() if lr_factor is None else lr_factor
        if self.shadow is not None:  # θ̂ ← opt_θ̂(g_θ̂), line 12, at θ's current learning rate α
            norm = self._extra_step(self.shadow_optimizer, self.shadow.clip_grad_norm_, lr_factor)
            self._metrics["train"]["bridge/shadow_grad_norm"].append(norm)
            self.shadow.zero_grad()
        if self.step_plan().sft_after:  # Algorithm 1, lines 9-11: SFT at θ', the point the RL update reached
            batches = (self._sft_micro_batch(micro) for micro in range(self._micro_steps()))
            total, norm = self._sft_update(batches, lr_factor, "alternating's (after its RL update)")
            self._metrics["train"]["bridge/sft_grad_norm"].append(norm)
            self._metrics["train"]["bridge/sft_loss"].append(total)
            self._count_sft_step()
        self._relift_after_step()  # relift: an SFT update on the buffer once it is full (`bridge_trl.relift`)

    # ------------------------------------------------------------------

    def step_plan(self) -> StepPlan:
        """What the current optimizer step computes under `args.method` (`bridge_trl.methods`)."""
        weight = self.current_mu() if self.args.method == "chord" else self.current_lambda()
        return step_plan(self.args.method, weight, self.state.global_step, self._cold_start_switch())

    def current_mu(self) -> float:
        """CHORD's μ(k) at the current optimizer step k (`bridge_trl.chord.mu_at`)."""
        a = self.args
        return mu_at(self.state.global_step, a.chord_mu_warmup_steps, a.chord_mu_decay_steps, a.chord_mu_peak,
                     a.chord_mu_valley)  # fmt: skip

    def current_lambda(self) -> float:
        """λ(k) at the current optimizer step k."""
        return self.args.lambda_at(self.state.global_step, max(1, self.state.max_steps))

    def _weighted_backward(self, compute, weight: float, kind: str = "") -> torch.Tensor:
        """Compute a loss and backpropagate `weight * loss`; with weight 0 the loss is only evaluated."""
        train = weight != 0.0
        with self._sync_context(kind if train else ""):  # DDP decides at forward time whether to all-reduce
            with torch.set_grad_enabled(train), self.compute_loss_context_manager():
                loss = compute()
            if train:
                self._backward(weight * loss, kind)
        return loss.detach()  # losses are already scaled for gradient accumulation

    def _sft_micro_batch(self, micro: int):
        """This rank's slice of the step's SFT batch (`SFTStream`): a pure function of the step, so resumes are exact."""
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        return self.sft_stream.micro_batch(self.state.global_step, micro, world, rank, self.accelerator.device,
                                           self._micro_steps())  # fmt: skip

    def _micro_steps(self) -> int:
        """Micro-batches the current optimizer step runs (fewer than `gradient_accumulation_steps` on an epoch's
        short last step)."""
        return (
            getattr(self, "current_gradient_accumulation_steps", None)
            or self.args.gradient_accumulation_steps
        )

    def _count_sft_step(self) -> None:
        step, world, micro_steps = self.state.global_step, self.accelerator.num_processes, self._micro_steps()
        self.consumed["sft_samples"] += len(self.sft_stream.step_positions(step, world, micro_steps))
        self.consumed["sft_tokens"] += self.sft_stream.step_tokens(step, world, micro_steps)

    def _shadow_inputs(self, raw_inputs, inputs):
        """The batch L_RL(θ̂, w) is computed on (DESIGN.md §2), with θ̂ swapped in.

        'shared': the joint step's rollouts, scored against θ̂'s own detached log-probs, with θ̂'s ratio π(θ̂,w)/μ
        (`bridge_trl.shadow_is`; μ from the joint pass's log-probs, captured by the gain meter). 'own': rollouts
        sampled from π(θ̂, w), generated, scored and buffered exactly like GRPO's own (a second generation per step).
        """
        if self.args.shadow_rollouts == "shared":
            return shadow_batch(self, inputs, self.gain.logps.get("joint"))
        joint_buffer, self._buffered_inputs = self._buffered_inputs, self._shadow_buffer
        if self.use_vllm:  # push π(θ̂, w) now, and π(θ, w) again before the next joint generation
            self._last_loaded_step = -1
        try:
            return self._prepare_inputs(raw_inputs)
        finally:
            self._shadow_buffer, self._buffered_inputs = self._buffered_inputs, joint_buffer
            if self.use_vllm:
                self._last_loaded_step = -1

    @contextmanager
    def _isolated_grpo_state(self):
        """Keep the shadow's pass out of GRPO's metrics, completion logs and entropy controller; yields its metrics."""
        saved_metrics, saved_logs = self._metrics, self._logs
        saved = {k: getattr(self, k) for k in ("entropy_coef", "_last_world_entropy", "_entropy_window_stats")
                 if hasattr(self, k)}  # fmt: skip
        # 'own': θ̂'s rollouts are extra compute, not extra data.
        tokens_seen = self.state.num_input_tokens_seen
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._logs = {k: defaultdict(list) if isinstance(v, dict) else [] for k, v in saved_logs.items()}
        try:
            yield self._metrics
        finally:
            self._metrics, self._logs = saved_metrics, saved_logs
            self.state.num_input_tokens_seen = tokens_seen
            for key, value in saved.items():
                setattr(self, key, value)

    def _record(self, plan: StepPlan, lam: float, sft, rl, shadow, rl_tokens, traces) -> None:
        """Average the micro-batch losses over ranks, stop on non-finite ones, log once per optimizer step."""
        values = torch.cat([torch.stack([sft, rl, shadow, rl_tokens.float()]).float(), traces.float()])
        values = self.accelerator.reduce(values, reduction="mean").double().cpu()
        if not torch.isfinite(values).all():
            raise FloatingPointError(
                f"Non-finite loss at step {self.state.global_step} (sft={values[0]:.4g}, rl={values[1]:.4g}, "
                f"shadow_rl={values[2]:.4g}); stopping before any parameter moves. The last saved checkpoint in "
                f"{self.args.output_dir} is intact."
            )
        self._step_sums += values
        if (self._step + 1) % self.current_gradient_accumulation_steps != 0:
            return
        sft_v, rl_v, shadow_v, rl_tokens_v, trace_rows_v, trace_tokens_v = self._step_sums.tolist()
        world = self.accelerator.num_processes
        metrics = self._metrics["train"]
        if plan.sft:
            metrics["bridge/sft_loss"].append(sft_v)
            self._count_sft_step()
        if plan.rl:  # luffy's traces were trained on as rows of the groups, but they are SFT data
            metrics["bridge/rl_loss"].append(rl_v)
            rows = self.args.per_device_train_batch_size * self.current_gradient_accumulation_steps * world
            trace_rows, trace_tokens = round(trace_rows_v * world), round(trace_tokens_v * world)
            self.consumed["rl_samples"] += rows - trace_rows
            self.consumed["rl_tokens"] += round(rl_tokens_v * world) - trace_tokens
            self.consumed["sft_samples"] += trace_rows
            self.consumed["sft_tokens"] += trace_tokens
        if plan.shadow:
            metrics["bridge/shadow_rl_loss"].append(shadow_v)
            for key, value in self.gain.result(self.accelerator, self.args.shadow_rollouts == "own").items():
                metrics[key].append(value)  # J_RL(θ,w) − J_RL(θ̂,w), `bridge_trl.gain`
        if self.args.method in ("bridge", "mix"):
            metrics["bridge/lambda"].append(lam)
        if self.args.method == "chord":  # bridge/sft_loss is then L_SFT-φ (unless chord_phi=False)
            metrics["bridge/mu"].append(self.current_mu())
        self.diagnostics.pre_step(self, lam, metrics)  # pre-clip gradients, θ̂'s drift, the adapter's share
        self._step_sums.zero_()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training:  # cumulative data consumption, so that methods can be compared per sample
            logs.update({f"bridge/{key}": float(value) for key, value in self.consumed.items()})
            logs["bridge/peak_memory_mb"] = peak_memory_mb(self.accelerator.device)
            if self._ensure_shadow() is not None:
                logs["bridge/shadow_mb"] = self.shadow.num_bytes(self.shadow_optimizer) / 2**20
        super().log(logs, start_time)
