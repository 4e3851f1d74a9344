"""How BRIDGE's gradients reach its parameters: backward routing and the optimizers of θ, w and θ̂.

`BridgeOptimizersMixin` is the part of `BridgeTrainer` that depends on the backend (one device, DDP, DeepSpeed
ZeRO-1/2/3) rather than on the algorithm:

- `_backward` sends each backward of a step where it belongs: DDP (all-reducing θ's gradient once per micro-step),
  DeepSpeed's engine (told which backward ends the accumulation), or θ̂'s own pass under ZeRO-1/2;
- `create_optimizer` builds θ (lr α) and w (lr β) as groups of one optimizer, θ̂'s optimizer and alternating's SFT
  optimizer; `_extra_step` steps the last two like the main one (clipped, on its schedule), `_sft_update` makes
  one step of that SFT optimizer (alternating's, ReLIFT's);
- `_ensure_shadow` builds θ̂ from the engine's state once DeepSpeed has prepared the model;
- `_deepspeed_step` takes the engine's step once per optimizer step, then θ̂'s;
- `create_scheduler` and `_maybe_start_rl_phase` make cold start a two-stage pipeline (a schedule per phase, fresh
  optimizer state at the switch).
"""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext

import torch
from accelerate.utils import is_peft_model
from transformers import get_scheduler

from .methods import cold_start_switch
from .sft import sft_loss
from .shadow import split_parameters
from .vllm_sync import iter_policy_weights
from .zero import Zero2ShadowWeights, ZeroShadowWeights, write_parameters

logger = logging.getLogger(__name__)


class BridgeOptimizersMixin:
    def _deepspeed_step(self) -> None:
        """The engine's step (θ, w), once per optimizer step after all of the step's backwards, then θ̂'s."""
        engine = self.accelerator.deepspeed_engine_wrapped.engine
        lr_factor = self._lr_factor()  # read before the engine steps the scheduler, as the step hook does
        if self._shadow_bypasses_engine:
            self.shadow.reduce_and_inject()  # ZeRO-1/2: g_θ̂ and the shadow's share of g_w, reduced over ranks
        engine.set_gradient_accumulation_boundary(True)
        engine.step()
        if engine.was_step_applied():
            self._after_optimizer_step(None, lr_factor=lr_factor)
        elif self.shadow is not None:  # the engine skipped θ's step (non-finite gradient): θ̂ skips it too
            logger.warning("DeepSpeed skipped step %d; θ̂ skips it too.", self.state.global_step)
            self.shadow.zero_grad()

    def _sync_context(self, kind: str):
        """DDP: θ's gradient is all-reduced once per micro-step, by its last joint backward (SFT's waits for RL's).

        The shadow's pass all-reduces its own gradient (θ̂'s). Under DeepSpeed the engine reduces every backward.
        """
        if kind == "sft" and not self.is_deepspeed_enabled and self.step_plan().last_backward(False) != "sft":
            return self.accelerator.no_sync(self.model_wrapped)
        return nullcontext()

    def _backward(self, loss: torch.Tensor, kind: str) -> None:
        if kind == "shadow" and self._shadow_bypasses_engine:
            self.shadow.backward(loss)
        elif self.is_deepspeed_enabled:
            # A step has several backwards; the engine accumulates them all and steps once (`_deepspeed_step`),
            # after the one DeepSpeed is told is the last (ZeRO-1/2 reduce the step's gradients at its end).
            engine = self.accelerator.deepspeed_engine_wrapped.engine
            last_kind = self.step_plan().last_backward(not self._shadow_bypasses_engine)
            engine.set_gradient_accumulation_boundary(self.accelerator.sync_gradients and kind == last_kind)
            engine.backward(loss, scale_wrt_gas=False)
        else:
            self.accelerator.backward(loss)

    def _clip_grad_norm(self, model):
        """BRIDGE clips each update on the norm of its own gradient: θ's (Eq. 8) and w's (Eq. 11) here, θ̂'s (Eq. 10)
        in `_extra_step`. Returns θ's norm (logged as `grad_norm`); w's is `bridge/adapter_grad_norm`.

        One joint norm over θ and w would let the cooperative-gain term −λ ∇_w L_RL(θ̂, w), which only w's update
        has, shrink θ's step, while θ̂ (clipped on its own norm) is not shrunk: at λ = 1 the two would then take
        different RL steps from the same gradient. Per group, θ and θ̂ see the same rule, and `mix`/`rl` runs clip θ
        exactly as before. A baseline given an adapter (`peft_config`: e.g. mix with w trained on the joint loss,
        BRIDGE without its cooperative-gain term) clips the same way, so that it differs from BRIDGE in that term
        only. Under DeepSpeed the engine clips inside its step with one norm over all of its
        (flattened, partitioned) parameters, θ and w together: `gradient_clipping` cannot be split per group
        there, so that backend keeps the joint norm for θ and w (θ̂ is still clipped on its own); a warning says so.
        """
        if self.is_deepspeed_enabled or not is_peft_model(self.model):  # no adapter: one norm (no name scan)
            return super()._clip_grad_norm(model)
        base, adapter = split_parameters(self.model)
        if not adapter:
            return super()._clip_grad_norm(model)
        max_norm = self.args.max_grad_norm
        norm = self.accelerator.clip_grad_norm_([p for _, p in base], max_norm)
        adapter_norm = self.accelerator.clip_grad_norm_([p for _, p in adapter], max_norm)
        self._metrics["train"]["bridge/adapter_grad_norm"].append(adapter_norm.item())
        return norm

    def _lr_factor(self) -> float:
        """Where the learning-rate schedule stands: θ's current learning rate over its initial one.

        With `learning_rate=0` (θ frozen, e.g. alternating with only `sft_learning_rate`), the ratio is 0/0: the
        schedule's own multiplier is read instead.
        """
        group = self.optimizer.param_groups[0]
        if group["initial_lr"] > 0:
            return group["lr"] / group["initial_lr"]
        scheduler = getattr(self.lr_scheduler, "scheduler", self.lr_scheduler)  # accelerate wraps it
        if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            return float(scheduler.lr_lambdas[0](scheduler.last_epoch))
        return 1.0

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """Cold start runs two trainings back to back, so each phase gets the configured schedule over its own length.

        The SFT phase (steps [0, s)) is scheduled as an SFT run of s steps would be, and the RL phase (steps
        [s, max_steps)) as a GRPO run of max_steps − s steps started from the SFT model: `warmup_ratio`/
        `warmup_steps` and the decay apply to each phase relative to its own start. Together with the fresh
        optimizer state of `_maybe_start_rl_phase`, the RL phase is exactly a separate GRPO run on the SFT weights.
        Every other method uses one schedule over the whole run (Trainer's).
        """
        if self.args.method != "cold_start" or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        # `cold_start_switch='val_loss'`: the switch is measured during the run (`bridge_trl.cold_start`), so the SFT
        # phase is planned over its cap (the fixed switch) and cut short; the RL phase is built once it is known.
        cap = min(self._cold_start_switch(num_training_steps, cap=True), num_training_steps)
        dummy = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)

        def phase(length: int):
            if length <= 0:
                return lambda step: 1.0
            scheduler = get_scheduler(
                self.args.lr_scheduler_type, optimizer=dummy, num_training_steps=length,
                num_warmup_steps=self.args.get_warmup_steps(length),
                scheduler_specific_kwargs=self.args.lr_scheduler_kwargs,
            )  # fmt: skip
            if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
                raise NotImplementedError(
                    f"method='cold_start' needs a multiplicative (LambdaLR) schedule per phase; "
                    f"lr_scheduler_type={self.args.lr_scheduler_type!r} is not one."
                )
            return scheduler.lr_lambdas[0]

        sft, rl_phases = phase(cap), {}
        # The SFT phase trains at `sft_learning_rate` (a separate SFT run would have its own rate): the optimizer's
        # base lr is α_RL = `learning_rate`, so the SFT phase's multiplier carries α_SFT / α_RL.
        sft_scale = (
            self.args.sft_learning_rate / self.args.learning_rate if self.args.learning_rate > 0 else 0.0
        )

        # A closure, not a callable object: LambdaLR's state_dict then saves only the step count, and a resumed run
        # rebuilds the same two phases from the config (and the measured switch from the checkpoint).
        def schedule(step: int) -> float:
            switch = min(self._cold_start_switch(num_training_steps), num_training_steps)
            if step < switch:
                return sft_scale * sft(step)
            if switch not in rl_phases:
                rl_phases[switch] = phase(num_training_steps - switch)
            return rl_phases[switch](step - switch)

        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, schedule)
        return self.lr_scheduler

    def _cold_start_switch(self, max_steps: int | None = None, cap: bool = False) -> int:
        """Cold start's first RL step: the fixed one, or (`val_loss`, once measured) the earlier measured one."""
        max_steps = max(1, self.state.max_steps if max_steps is None else max_steps)
        fixed = cold_start_switch(self.args.cold_start_sft_steps, self.args.cold_start_sft_ratio, max_steps)
        measured = None if cap else getattr(getattr(self, "cold_start_val", None), "switch_step", None)
        return fixed if measured is None else min(measured, fixed)

    def _maybe_start_rl_phase(self, micro: int) -> None:
        """Cold start, first micro-batch of step s: the RL phase starts as a separate GRPO run on the SFT model would.

        θ's optimizer forgets the SFT phase (moments and step counts); the KL reference (β > 0) becomes π(θ_SFT, w);
        TRL's adaptive-entropy controller starts afresh; and the rollout buffer is counted from s
        (`_prepare_inputs`), so the first RL step generates a full one. Called at the start of step s on every run,
        so a run resumed from a checkpoint taken before s resets here too, and one taken after s loads the RL
        phase's own state (the reference included: `bridge_reference.safetensors`).
        """
        if (
            self.args.method != "cold_start"
            or micro != 0
            or self.state.global_step != self._cold_start_switch()
        ):
            return
        inner = self.optimizer
        while hasattr(inner, "optimizer"):  # accelerate's wrapper, DeepSpeed's ZeRO optimizer
            inner = inner.optimizer
        inner.state.clear()
        for group in inner.param_groups:  # optimizers that count steps per group (DeepSpeed's FusedAdam)
            group.pop("step", None)
        self.entropy_coef = self.args.entropy_coef  # TRL's controller state, as at its __init__
        self._last_world_entropy, self._entropy_window_stats = float("inf"), None
        self._buffered_inputs, self._rl_phase_start = (
            None,
            self._step,
        )  # GRPO's micro-step counter at the switch
        if self.beta != 0.0:
            write_parameters(self.ref_model, iter_policy_weights(self.accelerator.unwrap_model(self.model)))
        logger.info(
            "cold start: RL phase begins at step %d with a fresh optimizer state%s.", self.state.global_step,
            ", the SFT model as KL reference" if self.beta != 0.0 else "",
        )  # fmt: skip

    def _prepare_inputs(self, generation_batch):
        """GRPO's rollout buffer, indexed from the start of cold start's RL phase rather than from step 0.

        TRL regenerates when `_step % (steps_per_generation × num_iterations) == 0` and serves slice
        `_step % steps_per_generation`; counted from step 0, an RL phase starting mid-cycle would generate a buffer
        and use only its tail, unlike a separate GRPO run. (A resumed run counts `_step` from the resume, as TRL
        does: the RL phase's offset is then 0.)
        """
        offset = (getattr(self, "_rl_phase_start", None) or 0) if self.model.training else 0
        self._step -= offset
        try:
            return super()._prepare_inputs(generation_batch)
        finally:
            self._step += offset

    def _extra_step(self, optimizer, clip_grad_norm, lr_factor: float) -> float:
        """Step θ̂'s or alternating's SFT optimizer like the main one: clipped, at the scheduled learning rate."""
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lr_factor
        norm = clip_grad_norm(self.args.max_grad_norm or float("inf"))
        optimizer.step()
        return norm.item()

    def _sft_update(self, batches, lr_factor: float, where: str) -> tuple[float, float]:
        """One step of the separate SFT optimizer on `batches` (`SFTBatch`es, each normalised by the whole update's
        tokens): alternating's SFT after its RL update, ReLIFT's on its buffer. Returns (loss, pre-clip grad norm)."""
        self.model.zero_grad(set_to_none=True)  # the RL gradient has been applied
        total = 0.0
        for batch in batches:
            compute = lambda b=batch: sft_loss(self.model_wrapped, b, self._fused_sft)  # noqa: E731
            loss = self._weighted_backward(compute, 1.0)
            total += self.accelerator.reduce(loss.float(), reduction="mean").item()
        if not math.isfinite(total):
            raise FloatingPointError(
                f"Non-finite {where} SFT loss at step {self.state.global_step}; stopping. The last saved "
                f"checkpoint in {self.args.output_dir} is intact."
            )
        params = [p for p in self.model.parameters() if p.requires_grad]
        clip = lambda max_norm: torch.nn.utils.clip_grad_norm_(params, max_norm)  # noqa: E731
        norm = self._extra_step(self.sft_optimizer, clip, lr_factor)
        self.model.zero_grad(set_to_none=True)
        return total, norm

    def create_optimizer(self, model=None):
        """θ (lr α) and w (lr β) as groups of one optimizer; θ̂ (lr α) and alternating's SFT (lr α_SFT) get their own."""
        if self.optimizer is not None:
            return self.optimizer
        decay = set(self.get_decay_parameter_names(self.model))
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)

        def make(named_groups, cls=optimizer_cls, kwargs=optimizer_kwargs):
            """[(named params, lr)] → an optimizer with a decay and a no-decay group per entry."""
            groups = []
            for named, lr in named_groups:
                for params, wd in (([p for n, p in named if n in decay], self.args.weight_decay),
                                   ([p for n, p in named if n not in decay], 0.0)):  # fmt: skip
                    if params:
                        groups.append({"params": params, "weight_decay": wd, "lr": lr, "initial_lr": lr})
            return cls(groups, **kwargs)

        base, adapter = split_parameters(self.model)
        args = self.args
        self.optimizer = make([(base, args.learning_rate), (adapter, args.adapter_learning_rate)])
        self._make_optimizer = make
        if self.shadow is not None:
            self._build_shadow_optimizer()
        if args.method == "relift":  # its reference's SFT AdamW decays like the actor's (`bridge_trl.relift`)
            self.sft_optimizer = make([(base + adapter, args.sft_learning_rate)])
        if args.method == "alternating":
            self.sft_optimizer = make([(base + adapter, args.sft_learning_rate)])
            # One step's worth of weight decay per step: the RL update (θ's optimizer) applies it; the SFT update
            # that follows at θ' (Algorithm 1, lines 9-11) does not decay θ a second time.
            for group in self.sft_optimizer.param_groups:
                group["weight_decay"] = 0.0
        # DeepSpeed steps its inner optimizer once per shard group: θ̂ steps in `_deepspeed_step` instead.
        if not self.is_deepspeed_enabled:
            self.optimizer.register_step_post_hook(self._after_optimizer_step)
        return self.optimizer

    @property
    def _zero3(self) -> bool:
        return self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3

    @property
    def _shadow_bypasses_engine(self) -> bool:
        """ZeRO-1/2: the shadow's pass runs on the bare module, outside the engine's gradient hooks.

        Decided by the backend, not by θ̂'s existence: θ̂ is built lazily in the first step, after that step's joint
        backwards have already asked which backward is the engine's last (the gradient-accumulation boundary)."""
        return self.args.method == "bridge" and self.is_deepspeed_enabled and not self._zero3

    def _build_shadow_optimizer(self) -> None:
        """θ̂'s optimizer: θ's class and hyper-parameters at lr α (`same`), or stateless SGD (`sgd`)."""
        shadow_named = list(zip(self.shadow.names, self.shadow.params, strict=True))
        stateless = {"cls": torch.optim.SGD, "kwargs": {}} if self.args.shadow_optimizer == "sgd" else {}
        self.shadow_optimizer = self._make_optimizer([(shadow_named, self.args.learning_rate)], **stateless)

    def _ensure_shadow(self):
        """θ̂; under DeepSpeed built on first use, from the engine's state of θ⁰, which exists once it is prepared.

        None before then (and for methods without θ̂): until the first step θ̂ = θ⁰ = θ.
        """
        engine_ready = getattr(self.accelerator, "deepspeed_engine_wrapped", None) is not None
        if (
            self.shadow is None
            and self.args.method == "bridge"
            and self.is_deepspeed_enabled
            and engine_ready
        ):
            base, adapter = split_parameters(self._unwrapped())
            shadow_cls = ZeroShadowWeights if self._zero3 else Zero2ShadowWeights
            self.shadow = shadow_cls(base, [p for _, p in adapter], offload=self.args.shadow_offload == "cpu")
            self._build_shadow_optimizer()
            self._log_shadow_size()
        return self.shadow

    def _log_shadow_size(self) -> None:
        """Start-up report of θ̂'s bytes on this rank; `bridge/shadow_mb` adds its optimizer state once it exists."""
        where = "CPU" if self.shadow.offload else "device"
        state = "none (sgd)" if self.args.shadow_optimizer == "sgd" else f"that of `{self.args.optim}`"
        logger.info("θ̂ on this rank: %.1f MB of weights in %s memory; optimizer state: %s",
                    self.shadow.num_bytes() / 2**20, where, state)  # fmt: skip
