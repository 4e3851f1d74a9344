"""How BRIDGE's gradients reach its parameters: backward routing and the optimizers of θ, w and θ̂.

`BridgeOptimizersMixin` is the part of `BridgeTrainer` that depends on the backend (one device, DDP, DeepSpeed
ZeRO-1/2/3) rather than on the algorithm:

- `_backward` sends each backward of a step where it belongs: DDP (all-reducing θ's gradient once per micro-step),
  DeepSpeed's engine (told which backward ends the accumulation), or θ̂'s own pass under ZeRO-1/2;
- `create_optimizer` builds θ (lr α) and w (lr β) as groups of one optimizer, θ̂'s optimizer and alternating's SFT
  optimizer; `_extra_step` steps the last two like the main one (clipped, on its schedule);
- `_ensure_shadow` builds θ̂ from the engine's state once DeepSpeed has prepared the model;
- `_deepspeed_step` takes the engine's step once per optimizer step, then θ̂'s.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext

import torch

from .shadow import split_parameters
from .zero import Zero2ShadowWeights, ZeroShadowWeights

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

    def _lr_factor(self) -> float:
        """Where the learning-rate schedule stands: θ's current learning rate over its initial one."""
        group = self.optimizer.param_groups[0]
        return group["lr"] / group["initial_lr"]

    def _extra_step(self, optimizer, clip_grad_norm, lr_factor: float) -> float:
        """Step θ̂'s or alternating's SFT optimizer like the main one: clipped, at the scheduled learning rate."""
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lr_factor
        norm = clip_grad_norm(self.args.max_grad_norm or float("inf"))
        optimizer.step()
        return norm.item()

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
        if args.method == "alternating":
            self.sft_optimizer = make([(base + adapter, args.sft_learning_rate)])
        # DeepSpeed steps its inner optimizer once per shard group: θ̂ steps in `_deepspeed_step` instead.
        if not self.is_deepspeed_enabled:
            self.optimizer.register_step_post_hook(self._after_optimizer_step)
        return self.optimizer

    @property
    def _zero3(self) -> bool:
        return self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3

    @property
    def _shadow_bypasses_engine(self) -> bool:
        """ZeRO-1/2: the shadow's pass runs on the bare module, outside the engine's gradient hooks."""
        return isinstance(self.shadow, Zero2ShadowWeights)

    def _build_shadow_optimizer(self) -> None:
        """θ̂'s optimizer: θ's class and hyper-parameters at lr α (`same`), or stateless SGD (`sgd`)."""
        shadow_named = list(zip(self.shadow.names, self.shadow.params, strict=True))
        stateless = {"cls": torch.optim.SGD, "kwargs": {}} if self.args.shadow_optimizer == "sgd" else {}
        self.shadow_optimizer = self._make_optimizer([(shadow_named, self.args.learning_rate)], **stateless)

    def _ensure_shadow(self):
        """θ̂; under DeepSpeed built on first use, from the engine's state of θ⁰, which exists once it is prepared."""
        if self.shadow is None and self.args.method == "bridge" and self.is_deepspeed_enabled:
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
