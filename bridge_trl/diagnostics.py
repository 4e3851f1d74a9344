"""Upper-level diagnostics: is BRIDGE's w learning anything, and does it reach the policy? (issue 27)

BRIDGE's upper level (Eq. 11) updates the adapter w on

    g_w = (1-λ) ∇_w L_SFT(θ,w) + λ ∇_w L_RL(θ,w) − λ ∇_w L_RL(θ̂,w) = S + G,

S = (1-λ)∇_w L_SFT(θ,w) the SFT term and G = λ(∇_w L_RL(θ,w) − ∇_w L_RL(θ̂,w)) the cooperative-gain term, which is
all that separates BRIDGE from "mix with a LoRA" (w trained on the joint loss). Logged once per optimizer step:

- `bridge/gain_grad_ratio` = ‖G‖/‖S‖ and `bridge/gain_grad_cos` = cos(G, S), from the gradients the step computes
  anyway: w's `.grad` after all of the step's backwards is S + G, and S is w's `.grad` difference across each SFT
  backward, summed over micro-steps. They are the *pre-clip* gradients (read before `_clip_grad_norm` and the
  optimizer step), summed over the step's micro-batches and, under DDP, averaged over the ranks (S is all-reduced
  once per step, as DDP did for S + G). 0 at step 0, where θ̂ = θ makes G vanish (up to rounding). A ratio ≪ 1 means
  the gain term is negligible beside SFT's pull on w; ≳ 1 with cos ≈ −1 means it cancels it. Not logged when S = 0
  (λ = 1); the cosine reads 0 when G = 0. bridge only; not under DeepSpeed (see below).
- `bridge/shadow_drift` = ‖θ − θ̂‖/‖θ‖ at the point the step's gradients are taken (0 at step 0; every base tensor,
  tied ones once). How far apart the joint and RL-only policies are: G vanishes with it.
- `bridge/adapter_share` = ‖ΔW_w‖/‖W_θ‖ over the adapted layers, ΔW = scaling·B A per LoRA layer (Frobenius norms,
  squares summed over layers; ‖BA‖² = Σ (BᵀB)⊙(AAᵀ), r×r products, never the full matrix), W_θ the base layer's
  weight. How much of the policy is the adapter: 0 at step 0 (B = 0).
- `bridge/adapter_update` = ‖w_{k+1} − w_k‖/‖w_k‖ (w is small: copied before the step) and
  `bridge/theta_update` = ‖θ_{k+1} − θ_k‖/‖θ_k‖, the main optimizer's update of θ (alternating's later SFT update
  not included). θ is never copied: the update is recovered exactly (up to rounding) from the optimizer's state right
  after its step, one tensor at a time: Adam/AdamW (fused, foreach, amsgrad, decoupled decay) and SGD (plain,
  momentum, Nesterov). Other optimizers: not logged. A w that barely moves (adapter_update ≪ theta_update, share
  flat) cannot carry whatever the gain term asks of it to the policy.

Adapter metrics are logged for every method run with an adapter (e.g. `mix` with a `peft_config`), gain and drift
for bridge only. Backends: one device and DDP: all of them. DeepSpeed ZeRO-1/2/3: `shadow_drift` (sharded squares
summed over the data-parallel group under ZeRO-3), `adapter_share` and `adapter_update` (w gathered); *not*
`gain_grad_*` (the engine reduces each backward's gradient into its partitions, so S cannot be isolated without a
gradient reduction of w per backward) nor `theta_update` (the update lives in the engine's flat fp32 partitions).
"""

from __future__ import annotations

import logging
from collections import defaultdict

import torch
from peft.tuners.lora import LoraLayer

from .shadow import gathered, is_zero3_param, split_parameters

logger = logging.getLogger(__name__)


def _sq(t: torch.Tensor) -> torch.Tensor:
    """‖t‖² as a float64 scalar on t's device: fp32 arithmetic (no float64 copy), no host sync."""
    t = t.detach()
    return torch.linalg.vector_norm(t, dtype=torch.promote_types(t.dtype, torch.float32)).double().square()


def lora_factors(model) -> list[tuple[torch.Tensor, torch.Tensor, float, torch.Tensor]]:
    """(A, B, scaling, W_base) per LoRA linear layer and adapter: ΔW = scaling · B @ A."""
    out = []
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for name, a in module.lora_A.items():
            if name in module.lora_B and a.weight.dim() == 2:
                out.append(
                    (
                        a.weight,
                        module.lora_B[name].weight,
                        module.scaling[name],
                        module.get_base_layer().weight,
                    )
                )
        # fmt: skip
    return out


def squared_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Per-tensor ‖t‖² (float64, on their device), by one fused `_foreach_norm` in fp32: no copies, no host sync."""
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    return torch.stack(torch._foreach_norm([t.detach() for t in tensors], 2, torch.float32)).double().square()


def lora_delta_squares(factors) -> torch.Tensor:
    """Σ ‖scaling·BA‖² over layers, as Σ (BᵀB)⊙(AAᵀ): r×r products, never the out×in matrix; layers of one shape
    are batched (a few `bmm`s per step, whatever the depth)."""
    delta, groups = 0.0, defaultdict(list)
    with gathered([t for a, b, _, _ in factors for t in (a, b)]):  # w is small: gathered at once under ZeRO-3
        for a, b, scaling, _ in factors:
            groups[(a.shape, b.shape, a.device)].append((a, b, scaling))
        for items in groups.values():
            a = torch.stack([x[0].detach() for x in items]).double()  # (n, r, in), small
            b = torch.stack([x[1].detach() for x in items]).double()  # (n, out, r)
            scale = torch.tensor([x[2] ** 2 for x in items], dtype=torch.float64, device=a.device)
            delta = delta + ((b.mT @ b) * (a @ a.mT)).sum((1, 2)).mul(scale).sum()
    return torch.as_tensor(delta)


def _grads(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.zeros_like(p) if p.grad is None else p.grad.detach() for p in params]


def _chunks(n_bytes: list[int], limit: int = 64 * 2**20) -> list[range]:
    """Consecutive index ranges of at most `limit` bytes (or one tensor): bounded temporaries for `_foreach` ops."""
    out, start, size = [], 0, 0
    for i, n in enumerate(n_bytes):
        if i > start and size + n > limit:
            out.append(range(start, i))
            start, size = i, 0
        size += n
    return out + ([range(start, len(n_bytes))] if n_bytes else [])


def optimizer_update_square(optimizer, params: set[int]) -> float | None:
    """‖Δθ‖² over `params` (ids) of the step `optimizer` just took, from its state and θ_after, a tensor at a time.

    None if some parameter's update cannot be recovered exactly (an optimizer not handled here)."""
    delta = 0.0  # a float64 scalar on θ's device once a tensor is added: one host sync at the end
    for group in optimizer.param_groups:
        lr, wd = float(group["lr"]), float(group.get("weight_decay", 0.0))
        for p in group["params"]:
            if id(p) not in params or p.grad is None:
                continue  # a parameter without gradient was not stepped
            minus = _minus_delta(optimizer, group, p, lr, wd)  # θ_before − θ_after = c·x
            if minus is None:
                return None
            delta = delta + _sq(minus[0]) * minus[1] ** 2
    return torch.as_tensor(delta).item()


@torch.no_grad()
def _minus_delta(optimizer, group, p, lr: float, wd: float) -> tuple[torch.Tensor, float] | None:
    """(x, c) with θ_before − θ_after = c·x (the scalar applied to the norm, not to the tensor: one pass fewer)."""
    # In θ's dtype (at least fp32), one tensor at a time; the decay is folded in algebraically, not by subtracting θ
    # from a recovered θ_before (which would cancel catastrophically in fp32).
    dtype = torch.promote_types(p.dtype, torch.float32)
    state, theta = optimizer.state.get(p, {}), p.detach().to(dtype)
    if isinstance(optimizer, torch.optim.Adam) and "exp_avg" in state:  # AdamW is an Adam
        if group.get("amsgrad") and "max_exp_avg_sq" not in state:
            return None
        beta1, beta2 = group["betas"]
        step = float(state["step"])
        v = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
        # θ' − θ_after = lr/c1 · m/(√v/c2 + ε) = (lr·c2/c1) · m/(√v + ε·c2), c_i = √(1 − β_i^t) for i = 2
        c1, c2 = 1 - beta1**step, (1 - beta2**step) ** 0.5
        denom = v.to(dtype).sqrt().add_(group["eps"] * c2)
        decoupled = isinstance(optimizer, torch.optim.AdamW) or group.get("decoupled_weight_decay", False)
        if not (decoupled and wd != 0.0):  # coupled decay is inside the moments
            return torch.div(state["exp_avg"], denom), lr * c2 / c1
        # θ' = θ_before (1 − lr·wd), applied before the Adam step: θ_before − θ_after = (lr·wd θ_after + (θ' − θ_after))
        # / (1 − lr·wd), in two passes
        keep = 1 - lr * wd
        return torch.addcdiv(theta, state["exp_avg"], denom, value=c2 / (c1 * wd)), lr * wd / keep
    if type(optimizer) is torch.optim.SGD:
        sign = -1.0 if group.get("maximize") else 1.0
        grad = p.grad.detach().to(dtype) * sign
        momentum = group.get("momentum", 0.0)
        if momentum == 0.0:  # θ_after = θ_before − lr (g + wd θ_before)
            return grad.add_(theta, alpha=wd), lr / (1 - lr * wd)
        buf = state["momentum_buffer"].to(dtype)  # built from the (sign-flipped, decayed) gradient
        if not group.get("nesterov"):
            return buf, lr
        # θ_after = θ_before − lr (g + wd θ_before + μ buf)
        return grad.add_(buf, alpha=momentum).add_(theta, alpha=wd), lr / (1 - lr * wd)
    return None


class UpperLevelDiagnostics:
    """The per-step bookkeeping: `before_sft`/`after_sft` around each SFT backward, `pre_step` once all of the
    step's backwards are done (before clipping), `post_step` right after the optimizer's step."""

    def __init__(self, model, method: str, deepspeed: bool):
        base, adapter = split_parameters(model)
        self.theta = [p for _, p in base]
        self.w = [p for _, p in adapter]
        self.theta_ids = {id(p) for p in self.theta}
        self.factors = lora_factors(model) if self.w else []
        index = {id(p): i for i, p in enumerate(self.theta)}
        self.adapted = torch.tensor(
            [index[id(f[3])] for f in self.factors if id(f[3]) in index], dtype=torch.long
        )
        self._theta_sq = 0.0
        self.enabled = bool(self.w)  # adapter metrics wherever there is an adapter
        self.gain = method == "bridge" and not deepspeed and bool(self.w)
        self.deepspeed = deepspeed
        self.sft: list[torch.Tensor] | None = None  # S, summed over the step's micro-batches (this rank's)
        self._before: list[torch.Tensor] | None = None
        self._w_before: list[torch.Tensor] | None = None
        self._warned = False

    # -- S, from w's gradient across each SFT backward
    # (w is small: its tensors are handled all at once with `_foreach` ops, a few kernel launches per call)
    def before_sft(self) -> None:
        if self.gain:
            present = any(p.grad is not None for p in self.w)
            self._before = torch._foreach_mul(_grads(self.w), 1.0) if present else None

    def after_sft(self) -> None:
        if not self.gain:
            return
        grads = _grads(self.w)
        terms = (
            torch._foreach_mul(grads, 1.0)
            if self._before is None
            else torch._foreach_sub(grads, self._before)
        )
        if self.sft is None:
            self.sft = terms
        else:
            torch._foreach_add_(self.sft, terms)
        self._before = None

    # -- before the step
    @torch.no_grad()
    def pre_step(self, trainer, lam: float, metrics) -> None:
        if not self.enabled:
            return
        if self.gain and self.sft is not None:
            self._gain(trainer, lam, metrics)
        self.sft = None
        # ‖θ_k‖² per tensor (ZeRO-3: this rank's shards), once: the drift's and theta_update's denominators and the
        # share's ‖W_θ‖² (the adapted layers' base weights are among them)
        norms = squared_norms([p.ds_tensor if is_zero3_param(p) else p for p in self.theta])
        base, theta = norms[self.adapted].sum(), norms.sum()
        if self._zero3:
            base, theta = self._reduce_sum(base), self._reduce_sum(theta)
        self._theta_sq = theta.item()
        shadow = trainer._ensure_shadow() if trainer.args.method == "bridge" else None
        if shadow is not None:
            metrics["bridge/shadow_drift"].append(self._drift(shadow, theta))
        delta, base = lora_delta_squares(self.factors).item(), base.item()
        metrics["bridge/adapter_share"].append((delta / base) ** 0.5 if base > 0 else 0.0)
        with gathered(self.w):
            self._w_before = torch._foreach_mul([p.detach() for p in self.w], 1.0)  # copies

    def _gain(self, trainer, lam: float, metrics) -> None:
        sft = self.sft
        accelerator = trainer.accelerator
        if accelerator.num_processes > 1:  # DDP averaged S + G over the ranks: average S the same way
            flat = accelerator.reduce(torch.cat([s.reshape(-1) for s in sft]), reduction="mean")
            sft = list(flat.split([s.numel() for s in sft]))
        sft = [s.view_as(p) for p, s in zip(self.w, sft, strict=True)]
        total = _grads(self.w)  # S + G
        gain = torch._foreach_sub(total, sft)
        norms = [squared_norms(x).sum() for x in (sft, gain, total)]
        s_sq, g_sq, t_sq = torch.stack(norms).tolist()  # one host sync
        dot = (t_sq - s_sq - g_sq) / 2  # ⟨G, S⟩ from ‖G + S‖² = ‖G‖² + 2⟨G, S⟩ + ‖S‖²
        if lam == 0.0:  # G = λ(…) = 0; the joint gradient then holds no RL term to separate
            g_sq = dot = 0.0
        if s_sq == 0.0:
            return
        metrics["bridge/gain_grad_ratio"].append((g_sq / s_sq) ** 0.5)
        metrics["bridge/gain_grad_cos"].append(dot / (g_sq * s_sq) ** 0.5 if g_sq > 0 else 0.0)

    def _drift(self, shadow, norm: torch.Tensor) -> float:
        """‖θ − θ̂‖/‖θ‖; `norm` is ‖θ‖² (reduced), recomputed here from the fp32 master under ZeRO-3."""
        diff = 0.0  # a float64 scalar on θ's device: one host sync at the end
        if self._zero3:  # θ's fp32 master shard against θ̂'s shard, same layout
            from deepspeed.utils import safe_get_local_fp32_param

            norm = 0.0
            for live, hat in zip(shadow.live, shadow.params, strict=True):
                theta = safe_get_local_fp32_param(live).detach().reshape(-1)
                diff = diff + _sq(theta - hat.to(theta.device))
                norm = norm + _sq(theta)
            diff, norm = self._reduce_sum(diff), self._reduce_sum(norm)
        else:  # in chunks of ≤ 64 MiB: no full copy of θ, a few kernel launches per chunk
            for chunk in _chunks([p.numel() * 4 for p in shadow.live]):
                theta = [shadow.live[i].detach().float() for i in chunk]
                hat = [
                    shadow.params[i].detach().to(t.device, torch.float32)
                    for i, t in zip(chunk, theta, strict=True)
                ]
                diff = diff + squared_norms(torch._foreach_sub(theta, hat)).sum()
        diff, norm = torch.as_tensor(diff).item(), torch.as_tensor(norm).item()
        return (diff / norm) ** 0.5 if norm > 0 else 0.0

    @property
    def _zero3(self) -> bool:
        return self.deepspeed and any(is_zero3_param(p) for p in self.theta[:1])

    def _reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum over the data-parallel group (ZeRO-3's shards)."""
        import deepspeed.comm as dist

        buffer = torch.as_tensor(value).to(self.theta[0].ds_tensor.device, torch.float64)
        dist.all_reduce(buffer, group=self.theta[0].ds_process_group)
        return buffer.cpu()

    # -- after the step
    @torch.no_grad()
    def post_step(self, trainer, metrics) -> None:
        if not self.enabled or self._w_before is None:
            return
        with gathered(self.w):
            delta = squared_norms(torch._foreach_sub([p.detach() for p in self.w], self._w_before)).sum()
        delta, before = torch.stack([delta, squared_norms(self._w_before).sum()]).tolist()
        self._w_before = None
        metrics["bridge/adapter_update"].append((delta / before) ** 0.5 if before > 0 else 0.0)
        if self.deepspeed:
            return
        optimizer = trainer.optimizer
        while hasattr(optimizer, "optimizer"):  # accelerate's wrapper
            optimizer = optimizer.optimizer
        square = optimizer_update_square(optimizer, self.theta_ids)
        if square is None:
            if not self._warned:
                logger.info("bridge/theta_update: not logged, %s's update is not recovered exactly from its state.",
                            type(optimizer).__name__)  # fmt: skip
                self._warned = True
            return
        theta_sq = self._theta_sq  # ‖θ_k‖², from `pre_step` (nothing moves θ between the two)
        metrics["bridge/theta_update"].append((square / theta_sq) ** 0.5 if theta_sq > 0 else 0.0)
