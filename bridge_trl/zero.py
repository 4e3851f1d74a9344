"""θ̂ under DeepSpeed: ZeRO-3 (`ZeroShadowWeights`) and ZeRO-1/2 (`Zero2ShadowWeights`), DESIGN.md §5.

ZeRO-3: θ̂ is partitioned like θ and swapped in through the engine's local shards.

Under ZeRO-3 a parameter's `.data` is an empty placeholder. Each rank owns one flat shard of it (`param.ds_tensor`,
compute dtype), the optimizer's fp32 master of that shard, and the shard of its reduced gradient. The engine
gathers full weights layer by layer inside forward/backward and reduce-scatters gradients into the shards.

`ZeroShadowWeights` keeps θ̂ as this rank's fp32 shard of every base parameter (the same layout as θ's fp32
master), so θ̂ and its optimizer state are partitioned exactly like θ's and no rank ever holds a full copy of θ̂
(except inside `BridgeTrainer.get_shadow_state_dict`, which gathers one tensor at a time). For the shadow's pass:

- the shards: θ̂ (cast to the compute dtype) is copied into `ds_tensor`, and θ's shard is copied back afterwards;
  any gathered (persistent or cached) full copies are released and re-gathered, so the engine sees θ̂;
- the gradients: the engine accumulates every backward of a step into the same gradient shards, so θ's shards are
  set aside (and zeroed) before the shadow's backward; afterwards the shards hold g_θ̂, which is moved to θ̂'s
  gradient, and θ's are restored. w's shards get `before + c · (shadow's ∇_w)`, c = −λ (Eq. 11).

Gradients and the fp32 master go through DeepSpeed's public per-rank accessors (`safe_{get,set}_local_grad`,
`safe_get_local_fp32_param`); the shards through each parameter's `ds_tensor`, `ds_status`, `partition` and
`all_gather` (hence the pin to DeepSpeed 0.19.x). The accessors need the ZeRO optimizer's gradient shards on the
device, so the optimizer must not be offloaded (`offload_optimizer`); θ̂ itself may live in CPU memory
(`shadow_offload="cpu"`).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from trl.trainer.utils import create_model_from_path

from .shadow import ShadowState, gathered, is_zero3_param

logger = logging.getLogger(__name__)


def _dp_average(tensors: list[torch.Tensor], group, device: torch.device) -> None:
    """Average tensors in place over the data-parallel group, one tensor at a time on `device`.

    On the compute device because NCCL reduces CUDA tensors only (θ̂ may live in CPU memory), and per tensor so that
    no second full copy of θ̂'s gradient is ever allocated.
    """
    import deepspeed.comm as dist

    world = dist.get_world_size(group=group)
    for t in tensors:
        buffer = t.to(device)
        dist.all_reduce(buffer, group=group)
        t.copy_(buffer.div_(world))


def check_backend(method: str, accelerator, deepspeed: bool, fsdp: bool, args=None, model=None) -> None:
    """BRIDGE runs on one device, DDP or DeepSpeed ZeRO-1/2/3; say clearly what is not supported, and why."""
    if fsdp:
        raise NotImplementedError(
            "BridgeTrainer does not support FSDP; use DeepSpeed ZeRO-3, DDP or one device."
        )
    if not deepspeed:
        # Without DeepSpeed there is no fp32 master: the optimizer would update bf16/fp16 weights in place, and an
        # update below half a unit in the last place (~0.4% of the weight in bf16) rounds away, so at lr ~5e-7 θ
        # and θ̂ barely move (20 AdamW steps changed ~1% of the weights). DeepSpeed keeps an fp32 master.
        params = model.parameters() if model is not None else ()  # θ is trained in full by every method
        half = sorted({str(p.dtype) for p in params if p.dtype in (torch.bfloat16, torch.float16)})
        if half:
            raise ValueError(
                f"The trained weights are {', '.join(half)}, and without DeepSpeed nothing keeps an fp32 master "
                "copy: small updates round away. Load the model in float32 (`dtype: float32`, i.e. "
                "model_init_kwargs={'dtype': 'float32'}) and train with `bf16: true` (autocast), or run under "
                "DeepSpeed (configs/accelerate/zero2.yaml or zero3.yaml), which keeps fp32 master weights."
            )
        return
    plugin = accelerator.state.deepspeed_plugin
    if method == "alternating":
        raise NotImplementedError(
            "method='alternating' needs a second optimizer on θ; it is not supported under DeepSpeed. Use DDP."
        )
    if method != "bridge":
        return
    config = plugin.deepspeed_config
    zero = config.get("zero_optimization", {})
    if zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None):
        raise NotImplementedError(
            "method='bridge' reads and writes the engine's gradients, which `offload_optimizer` moves off the "
            "device: set offload_optimizer_device: none (θ̂ can still live on the CPU: shadow_offload='cpu')."
        )
    if zero.get("offload_param", {}).get("device") == "nvme":
        raise NotImplementedError("method='bridge' copies θ̂ into the engine's shards: offload_param to NVMe is "
                                  "not supported (use none or cpu).")  # fmt: skip
    if "optimizer" in config:
        raise ValueError(
            "method='bridge' builds its optimizers itself (θ at `learning_rate`, w at `adapter_learning_rate`, θ̂ "
            "like θ): remove the 'optimizer' block from the DeepSpeed config and set `optim` instead."
        )
    if (getattr(args, "max_grad_norm", 0) or 0) > 0:
        logger.warning(
            "Under DeepSpeed the engine clips θ and w with one joint gradient norm (`gradient_clipping`); on one "
            "device or DDP BRIDGE clips θ, w and θ̂ each on its own norm. θ̂ is clipped on its own here too."
        )
    reentrant = args is not None and (args.gradient_checkpointing_kwargs or {}).get("use_reentrant")
    if plugin.zero_stage < 3 and args is not None and args.gradient_checkpointing and reentrant:
        raise ValueError(
            "Under ZeRO-1/2 θ̂'s backward uses torch.autograd.grad, which reentrant gradient checkpointing does "
            "not support: drop `use_reentrant: true` from `gradient_checkpointing_kwargs`."
        )


def initial_reference(model: nn.Module, model_init_kwargs: dict | None) -> nn.Module:
    """A frozen copy of θ⁰ for the KL term. A model partitioned at load (ZeRO-3) is reloaded instead, as TRL does."""
    if not any(is_zero3_param(p) for p in model.parameters()):
        return copy.deepcopy(model)
    init_kwargs = {**(model_init_kwargs or {}), "device_map": None, "dtype": model.dtype}
    return create_model_from_path(model.config._name_or_path, **init_kwargs)


def _bare(model: nn.Module) -> nn.Module:
    while hasattr(model, "module"):  # DDP, a DeepSpeed engine
        model = model.module
    return model


@torch.no_grad()
def write_parameters(model: nn.Module, named_tensors) -> None:
    """Copy (name, tensor) pairs into `model`'s parameters of those names, one at a time; under ZeRO-3 each is
    gathered (collective), written on every rank and kept from rank 0. Cold start's KL reference takes π(θ_SFT, w)
    this way (`vllm_sync.iter_policy_weights`), and a resumed run the saved reference."""
    params = dict(_bare(model).named_parameters())
    for name, tensor in named_tensors:
        if name not in params:
            raise KeyError(f"{type(_bare(model)).__name__} has no parameter {name!r} to write.")
        with gathered([params[name]], modifier_rank=0):
            params[name].data.copy_(tensor)


def parameters_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter of `model` in full, on the CPU (gathered one at a time under ZeRO-3: collective)."""
    out = {}
    for name, param in _bare(model).named_parameters():
        with gathered([param]):
            out[name] = param.data.detach().cpu().clone()
    return out


def _release(params: list[nn.Parameter]) -> None:
    """Free any gathered full copy, so that the next use gathers the shards as they are now."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    available = [p for p in params if p.ds_status == ZeroParamStatus.AVAILABLE]
    if available:
        available[0].partition(param_list=available)


def _regather_persistent(params: list[nn.Parameter]) -> None:
    """Small ("persistent") parameters are expected gathered outside forward, as the engine does after a step."""
    persistent = [p for p in params if getattr(p, "ds_persist", False)]
    if persistent:
        persistent[0].all_gather(param_list=persistent)
    optimizer = getattr(params[0], "_z3_optimizer", None)
    if hasattr(optimizer, "invalidate_secondary_tensor"):  # ZeRO++ hpZ keeps a second copy of the shards
        optimizer.invalidate_secondary_tensor()


class ZeroShadowWeights(ShadowState):
    """θ̂ as this rank's ZeRO-3 shards; the same interface as `bridge_trl.shadow.ShadowWeights`.

    Args:
        base_params: the model's base parameters θ (name, parameter), partitioned by an initialised ZeRO-3 engine.
        adapter_params: the adapter parameters w.
        offload: keep θ̂ (its shards, their gradient and its optimizer state) in CPU memory between uses.
    """

    def __init__(self, base_params: list[tuple[str, nn.Parameter]], adapter_params: list[nn.Parameter],
                 offload: bool = False):  # fmt: skip
        from deepspeed.utils import safe_get_local_fp32_param

        self.names = [name for name, _ in base_params]
        self.live = [param for _, param in base_params]
        if not all(is_zero3_param(p) for p in self.live):
            raise ValueError("ZeroShadowWeights needs parameters partitioned by a ZeRO-3 engine.")
        self.offload = offload
        self.device = self.live[0].ds_tensor.device
        # θ̂⁰ = θ⁰ (Algorithm 2, line 1): a copy of this rank's fp32 master shard, flat, shape (partition numel,).
        self.params = [
            nn.Parameter(self._home(safe_get_local_fp32_param(p).detach().float().clone().view(-1)))
            for p in self.live
        ]
        self.adapter = adapter_params
        self.active = False

    def _home(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.offload:
            return tensor
        tensor = tensor.to("cpu")
        return tensor.pin_memory() if torch.cuda.is_available() else tensor

    def _write_shards(self, shards: list[torch.Tensor]) -> list[torch.Tensor]:
        """Put `shards` in the engine's `ds_tensor`s and return what they held."""
        _release(self.live)
        previous = []
        with torch.no_grad():
            for live, shard in zip(self.live, shards, strict=True):
                previous.append(live.ds_tensor.detach().clone())
                live.ds_tensor.copy_(shard.view(-1).to(live.ds_tensor.device, live.ds_tensor.dtype))
        _regather_persistent(self.live)
        return previous

    @contextmanager
    def swapped_in(self, adapter_grad_scale: float | None = None) -> Iterator[None]:
        """Run the block with the engine's base shards holding θ̂ (and its gradient shards collecting θ̂'s gradient).

        Collective: every rank must enter. `adapter_grad_scale` as in `ShadowWeights.swapped_in`.
        """
        from deepspeed.utils import safe_get_local_grad, safe_set_local_grad

        if self.active:
            raise RuntimeError("The shadow weights are already swapped in.")
        track = adapter_grad_scale is not None
        if track:  # set aside the step's g_θ and joint g_w so far; the shadow's backward starts from zero
            theta_grads = [safe_get_local_grad(p).clone() for p in self.live]
            adapter_grads = [safe_get_local_grad(p).clone() for p in self.adapter]
            for p, g in zip(self.live + self.adapter, theta_grads + adapter_grads, strict=True):
                safe_set_local_grad(p, torch.zeros_like(g))
        theta_shards = self._write_shards([p.detach() for p in self.params])
        self.active = True
        try:
            yield
        finally:
            self._write_shards(theta_shards)
            self.active = False
            if track:
                for live, shadow, before in zip(self.live, self.params, theta_grads, strict=True):
                    grad = safe_get_local_grad(live).to(shadow.device, copy=True)  # (partition numel,), g_θ̂
                    shadow.grad = grad if shadow.grad is None else shadow.grad.add_(grad)
                    safe_set_local_grad(live, before)
                for p, before in zip(self.adapter, adapter_grads, strict=True):
                    safe_set_local_grad(p, before.add_(safe_get_local_grad(p), alpha=adapter_grad_scale))

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """`torch.nn.utils.clip_grad_norm_` over θ̂'s gradient, whose shards are spread over the ranks (collective)."""
        import deepspeed.comm as dist

        grads = [p.grad for p in self.params if p.grad is not None]
        squares = torch.zeros(1, dtype=torch.float32, device=self.device)
        for g in grads:
            squares += g.to(self.device).float().pow(2).sum()
        dist.all_reduce(squares, group=self.live[0].ds_process_group)
        norm = squares.sqrt()[0].cpu()
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.to(g.device))
        return norm


class Zero2ShadowWeights(ShadowState):
    """θ̂ under ZeRO-1/2, where every rank holds θ whole (in the compute dtype) and its optimizer state is sharded.

    θ̂ is kept whole too, as an fp32 master with its own optimizer (like θ's bf16 copy, it is not partitioned; use
    `shadow_offload="cpu"` or `shadow_optimizer="sgd"` to keep it off the device or stateless). ZeRO-2 reduces each
    parameter's gradient from a hook that fires when autograd accumulates it into `.grad`, and keeps the reduced
    shards internally until the step. So the shadow's pass stays outside the engine:

    - forward on the bare module with θ̂ (cast to the compute dtype) in the base parameters' `.data`;
    - backward with `torch.autograd.grad`, which returns gradients without accumulating them, so no hook fires;
      g_θ̂ and the shadow's ∇_w are accumulated locally over the step's micro-batches;
    - at the step (`reduce_and_inject`), both are averaged over the ranks, and c·∇_w (c = −λ, Eq. 11) is added to
      w's reduced gradient through DeepSpeed's `safe_{get,set}_full_grad`, before the engine steps.
    """

    def __init__(self, base_params: list[tuple[str, nn.Parameter]], adapter_params: list[nn.Parameter],
                 offload: bool = False):  # fmt: skip
        self.names = [name for name, _ in base_params]
        self.live = [param for _, param in base_params]
        self.offload = offload
        home = "cpu" if offload else self.live[0].device
        # θ̂⁰ = θ⁰ (Algorithm 2, line 1), as an fp32 master.
        self.params = [nn.Parameter(p.detach().to(home, torch.float32, copy=True)) for p in self.live]
        self.adapter = adapter_params
        self.adapter_grads: list[torch.Tensor | None] = [None] * len(adapter_params)
        self.adapter_grad_scale = 0.0
        self.active = False
        self._stash: list[torch.Tensor] = []

    @contextmanager
    def swapped_in(self, adapter_grad_scale: float | None = None) -> Iterator[None]:
        """Run the block with the base parameters holding θ̂; call `backward` for the shadow's loss inside it."""
        if self.active:
            raise RuntimeError("The shadow weights are already swapped in.")
        if adapter_grad_scale is not None:
            self.adapter_grad_scale = adapter_grad_scale
        self._stash = [live.data for live in self.live]
        for live, shadow in zip(self.live, self.params, strict=True):
            live.data = shadow.detach().to(live.device, live.dtype)
        self.active = True
        try:
            yield
        finally:
            for live, data in zip(self.live, self._stash, strict=True):
                live.data = data
            self._stash, self.active = [], False

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate ∇_θ̂ and ∇_w of the shadow's loss locally, without the engine's gradient hooks."""
        grads = torch.autograd.grad(loss, self.live + self.adapter, allow_unused=True)
        for shadow, g in zip(self.params, grads[: len(self.live)], strict=True):
            if g is not None:
                g = g.to(shadow.device, torch.float32)
                shadow.grad = g if shadow.grad is None else shadow.grad.add_(g)
        for i, g in enumerate(grads[len(self.live) :]):
            if g is not None:
                g = g.float()
                self.adapter_grads[i] = g if self.adapter_grads[i] is None else self.adapter_grads[i].add_(g)

    def reduce_and_inject(self) -> None:
        """At the step (collective): average g_θ̂ and the shadow's ∇_w over the ranks; add c·∇_w to w's gradient."""
        from deepspeed.utils import safe_get_full_grad, safe_set_full_grad

        # Every rank takes part in the same collectives, whichever parameters its batch left without a gradient.
        group, device = getattr(self.live[0], "_dp_group", None), self.live[0].device
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        _dp_average([p.grad for p in self.params], group, device)
        adapter_grads = [torch.zeros_like(p, dtype=torch.float32) if g is None else g
                         for p, g in zip(self.adapter, self.adapter_grads, strict=True)]  # fmt: skip
        _dp_average(adapter_grads, group, device)
        for p, g in zip(self.adapter, adapter_grads, strict=True):
            joint = safe_get_full_grad(p)  # w's reduced joint gradient, (1-λ)∇L_SFT + λ∇L_RL
            safe_set_full_grad(p, joint + self.adapter_grad_scale * g.to(joint.device, joint.dtype))
        self.adapter_grads = [None] * len(self.adapter)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """θ̂'s gradient is whole and identical on every rank after `reduce_and_inject`."""
        return torch.nn.utils.clip_grad_norm_(self.params, max_norm)
