"""θ̂, the shadow copy of the base weights, and the parameter bookkeeping of BRIDGE.

BRIDGE trains three sets of parameters (Algorithm 2):

- θ: the base weights of the causal LM (every non-adapter parameter of the `PeftModel`), trained in full;
- w: the LoRA adapter, shared by θ and θ̂;
- θ̂: a shadow copy of the base, initialised to θ⁰ and trained by RL only.

θ̂ never gets a model of its own. The live model's base parameters hold θ; `ShadowWeights.swapped_in()` exchanges
their storage (and their `.grad`) with θ̂'s for the shadow's forward/backward, then exchanges them back. The swap
moves pointers, not data: no copy, no second set of activations or buffers, and θ̂ has exactly θ's layout (dtype,
device). Tied weights are one `Parameter`, so they stay tied in θ̂. θ̂ is held by plain `nn.Parameter`s so that a
second optimizer keeps its own state for it. Under DeepSpeed ZeRO-3, `bridge_trl.zero.ZeroShadowWeights` does the
same through the engine's per-rank shards.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from peft import PeftModel, get_peft_model_state_dict
from torch import nn


def is_zero3_param(param: torch.Tensor) -> bool:
    """A parameter partitioned by DeepSpeed ZeRO-3 (its `.data` is a placeholder; `ds_tensor` is this rank's shard)."""
    return hasattr(param, "ds_id")


@contextmanager
def gathered(params: Iterable[torch.Tensor], modifier_rank: int | None = None) -> Iterator[None]:
    """Gather ZeRO-3 parameters in full for the block (collective: every rank must enter); a no-op otherwise.

    With `modifier_rank`, what that rank writes into the gathered tensors is kept (re-partitioned) on exit."""
    params = [p for p in params if is_zero3_param(p)]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


def _tuner_prefix(model) -> str | None:
    """The name fragment of adapter parameters (`lora_` for LoRA), or None for a model without an adapter."""
    return model.base_model.prefix if isinstance(model, PeftModel) else None


def unwrapped_base(model) -> nn.Module:
    """The causal LM under the adapter (the model itself when there is no adapter)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def split_parameters(model) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """Split a model's parameters into (θ, w): base parameters and adapter parameters, by name.

    Adapter parameters are those of the PEFT tuner (their names carry its prefix, `lora_` for LoRA); a model
    without an adapter is all θ. Shared (tied) parameters appear once, as in `named_parameters()`.
    """
    prefix = _tuner_prefix(model)
    base, adapter = [], []
    for name, param in model.named_parameters():
        (adapter if prefix is not None and prefix in name else base).append((name, param))
    return base, adapter


def base_state_dict(model) -> dict[str, torch.Tensor]:
    """The base weights keyed like the un-wrapped model's `state_dict()` (tied keys included), on the CPU.

    Under ZeRO-3 each parameter is gathered in turn (collective), so no rank holds more than one full tensor.
    """
    prefix = _tuner_prefix(model)
    base = unwrapped_base(model)
    params = dict(base.named_parameters(remove_duplicate=False))
    out = {}
    for key, value in base.state_dict().items():
        if prefix is not None and prefix in key:
            continue
        source = params.get(key, value)
        with gathered([source]):
            out[key.replace(".base_layer", "")] = source.detach().to("cpu", copy=True)
    return out


def adapter_state_dict(model) -> dict[str, torch.Tensor]:
    """The adapter w keyed like `peft.get_peft_model_state_dict`, on the CPU (empty without an adapter)."""
    if not isinstance(model, PeftModel):
        return {}
    with gathered(p for _, p in split_parameters(model)[1]):  # w is small: gathered at once under ZeRO-3
        return {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(model).items()}


class ShadowState:
    """What every form of θ̂ shares: `names`, `params` (θ̂'s tensors on this rank), and their bookkeeping."""

    names: list[str]
    params: list[nn.Parameter]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def num_bytes(self, optimizer: torch.optim.Optimizer | None = None) -> int:
        """Bytes held by θ̂ on this rank: its weights, plus `optimizer`'s state for them when given."""
        total = sum(p.numel() * p.element_size() for p in self.params)
        if optimizer is not None:
            for state in optimizer.state.values():
                total += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
        return total

    def state_dict(self) -> dict[str, torch.Tensor]:
        """θ̂ on this rank by parameter name (as in `named_parameters()` of the PEFT model), for checkpoints."""
        return {
            name: p.detach().to("cpu", copy=True) for name, p in zip(self.names, self.params, strict=True)
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.names) - set(state)
        if missing:
            raise KeyError(
                f"Shadow checkpoint is missing {len(missing)} tensors, e.g. {sorted(missing)[:3]}."
            )
        with torch.no_grad():
            for name, p in zip(self.names, self.params, strict=True):
                if state[name].shape != p.shape:
                    raise ValueError(
                        f"Shadow tensor {name!r} has shape {tuple(state[name].shape)}, expected {tuple(p.shape)}: "
                        "resume with the same number of processes and ZeRO stage."
                    )
                p.copy_(state[name].to(p.device))


class ShadowWeights(ShadowState):
    """θ̂ for a model whose base parameters hold θ, swapped in by pointer exchange.

    Args:
        base_params: the model's base parameters θ (name, parameter), as returned by `split_parameters`.
        adapter_params: the adapter parameters w. Their gradient from the shadow's backward is folded into their
            joint gradient with a weight (−λ, Eq. 11) when the shadow is swapped out.
        offload: keep θ̂ (and so its gradient and optimizer state) in CPU memory, pinned when CUDA is present.
            Swapping in then copies θ̂ to θ's device for the shadow's pass, and swapping out moves its gradient
            back; θ̂'s optimizer steps on the CPU. One copy of the base weights crosses the bus each way per
            micro-batch, and the device holds θ̂ only during its pass.
    """

    def __init__(
        self,
        base_params: list[tuple[str, nn.Parameter]],
        adapter_params: list[nn.Parameter],
        offload: bool = False,
    ):
        self.names = [name for name, _ in base_params]
        self.live = [param for _, param in base_params]
        self.offload = offload
        # θ̂⁰ = θ⁰ (Algorithm 2, line 1), with θ's dtype, and θ's device unless offloaded.
        self.params = [nn.Parameter(self._home(p.detach().clone()), requires_grad=True) for p in self.live]
        self.adapter = adapter_params
        self.active = False
        self._stash: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    def _home(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.offload:
            return tensor
        tensor = tensor.to("cpu")
        return tensor.pin_memory() if torch.cuda.is_available() else tensor

    def _exchange(self) -> None:
        if not self.offload:  # θ and θ̂ trade storage and gradient buffers: no copy at all
            for live, shadow in zip(self.live, self.params, strict=True):
                live.data, shadow.data = shadow.data, live.data
                live.grad, shadow.grad = shadow.grad, live.grad
        elif not self.active:  # in: θ̂ and its gradient so far to θ's device, θ and its gradient set aside
            # θ̂'s gradient accumulated over the step's earlier micro-batches goes in with it, as in the resident
            # case: DDP all-reduces the *accumulated* `.grad` at the step's last backward (earlier ones run under
            # no_sync), so a gradient kept aside on the CPU would stay rank-local and θ̂ would drift across ranks.
            self._stash = [(live.data, live.grad) for live in self.live]
            for live, shadow in zip(self.live, self.params, strict=True):
                live.data = shadow.data.to(live.device, non_blocking=True)
                live.grad = None if shadow.grad is None else shadow.grad.to(live.device, non_blocking=True)
        else:  # out: θ̂'s gradient (all micro-batches so far) home, θ back
            for live, shadow, (data, grad) in zip(self.live, self.params, self._stash, strict=True):
                shadow.grad = None if live.grad is None else live.grad.to("cpu")
                live.data, live.grad = data, grad
            self._stash = []
        self.active = not self.active

    @contextmanager
    def swapped_in(self, adapter_grad_scale: float | None = None) -> Iterator[None]:
        """Run the block with the model's base parameters holding θ̂ (and accumulating θ̂'s gradient).

        With `adapter_grad_scale = c`, the adapter's gradient after the block is `g_before + c * g_block`: the block's
        backward contributes `c ∇_w` of its loss without touching the joint gradient already in `w.grad`. With
        `None`, the adapter's gradients are left alone (e.g. for reading θ̂).
        """
        if self.active:
            raise RuntimeError("The shadow weights are already swapped in.")
        stash = None
        if adapter_grad_scale is not None:
            stash = [p.grad for p in self.adapter]
            for p in self.adapter:
                p.grad = None
        self._exchange()
        try:
            yield
        finally:
            self._exchange()
            if stash is not None:
                for p, before in zip(self.adapter, stash, strict=True):
                    if p.grad is None:
                        p.grad = before
                        continue
                    p.grad.mul_(adapter_grad_scale)
                    if before is not None:
                        p.grad.add_(before)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip θ̂'s gradient (whole on every rank: DDP has averaged it) to `max_norm`; returns its norm."""
        return torch.nn.utils.clip_grad_norm_(self.params, max_norm)
