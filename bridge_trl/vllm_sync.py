"""The weights sent to vLLM: the policy π(θ, w), each LoRA-wrapped weight as W + ΔW, computed out of place.

With `use_vllm=True`, TRL 1.16's `VLLMGeneration.sync_weights()` loads whatever `_iter_named_params()`
yields. For a PEFT model that iterator gathers *every* parameter at once under ZeRO-3, calls
`model.merge_adapter()`, yields the merged weights, then calls `model.unmerge_adapter()`. That suits plain
LoRA, whose base is frozen, but not BRIDGE:

- θ is trained, and the in-place round trip W + ΔW − ΔW is not exact in bf16, so every sync would perturb θ
  (behind its optimizer's back) by rounding noise;
- gathering the whole model at once defeats ZeRO-3, which exists so that no rank holds a full copy.

`iter_policy_weights` instead computes W + ΔW into a new tensor, one weight at a time, gathering only that
weight and its own adapter matrices, and never writes to a parameter. `install_vllm_sync` puts it in TRL's
place.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from .shadow import gathered

# Name fragments that vLLM does not know, removed as TRL's `_fix_param_name_to_vllm` removes them.
_DROPPED_FRAGMENTS = ("_checkpoint_wrapped_module.", ".base_layer", "modules_to_save.default.")


def _vllm_name(name: str) -> str:
    for fragment in _DROPPED_FRAGMENTS:
        name = name.replace(fragment, "")
    return name


def _adapters(module: LoraLayer) -> list[str]:
    """The adapters whose ΔW the module's forward adds to its base weight (those merge_adapter merges)."""
    if module.disable_adapters:
        return []
    # A merged weight already holds ΔW. BRIDGE never merges: merging in place is what this module avoids.
    if module.merged:
        raise NotImplementedError("iter_policy_weights needs unmerged adapters: call unmerge_adapter().")
    adapters = [a for a in module.active_adapters if a in module.lora_A or a in module.lora_embedding_A]
    for adapter in adapters:
        if module.lora_bias.get(adapter, False):  # ΔW would also change the base layer's bias
            raise NotImplementedError("Syncing a LoRA adapter with lora_bias=True to vLLM is not supported.")
        # DoRA and other variants: their W' is not W + ΔW (PEFT keeps `use_dora`, now `lora_variant`).
        if module.use_dora.get(adapter, False) or adapter in getattr(module, "lora_variant", {}):
            raise NotImplementedError("Syncing a LoRA variant (e.g. DoRA) to vLLM is not supported.")
    return adapters


@torch.no_grad()  # a plain function, not the generator: no_grad must not stay entered across a `yield`
def _merged(weight: torch.Tensor, module: LoraLayer, adapters: list[str]) -> torch.Tensor:
    out = weight.detach().clone()  # out of place: the parameter itself is never written
    for adapter in adapters:
        out += module.get_delta_weight(adapter).to(out.dtype)
    return out


def iter_policy_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (vLLM name, tensor) for every weight of π(θ, w), one at a time.

    Names are those TRL's `_iter_named_params` yields: the causal LM's `named_parameters()` (so a tied weight
    comes once, as vLLM requires) without PEFT's wrapper fragments; adapter parameters are not yielded. Under
    ZeRO-3 each tensor is gathered (collective: every rank must iterate) only while it is being consumed, and
    the consumer must copy it before asking for the next one, as with TRL's own iterator. A plain causal LM
    (no adapter) yields its parameters as they are.
    """
    if not isinstance(model, PeftModel):
        for name, param in model.named_parameters():
            with gathered([param]):
                yield _vllm_name(name), param.data
        return
    base = model.get_base_model()  # names without PeftModel's `base_model.model.`, which TRL strips
    prefix = model.base_model.prefix  # `lora_`
    lora_layers = {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}
    for name, param in base.named_parameters():
        if prefix in name or "original_module" in name:
            continue  # w itself, and the frozen original of a `modules_to_save` module: not in vLLM
        # ΔW applies to the weight of a LoRA layer's wrapped `base_layer` (lora_bias, which would also change
        # its bias, is refused in `_adapters`).
        owner = name.removesuffix(".base_layer.weight") if name.endswith(".base_layer.weight") else None
        module = lora_layers.get(owner)
        adapters = _adapters(module) if module is not None else []
        if not adapters:
            with gathered([param]):
                yield _vllm_name(name), param.data
            continue
        own = [p for n, p in module.named_parameters() if prefix in n]  # this layer's A and B only
        with gathered([param, *own]):
            yield _vllm_name(name), _merged(param.data, module, adapters)


def install_vllm_sync(vllm_generation, model) -> None:
    """Make `vllm_generation.sync_weights()` send `iter_policy_weights(model)` instead of merging in place.

    This replaces, on the instance, TRL 1.16's private `VLLMGeneration._iter_named_params` (a zero-argument
    generator method read by `sync_weights`, in colocate and server mode alike). It is private API: trl is
    pinned to 1.16.x, and `tests/test_vllm.py` runs the real `sync_weights` against it.
    """
    vllm_generation._iter_named_params = functools.partial(iter_policy_weights, model)
