"""HF generation from π(θ, w) with the adapter merged in, and θ restored bit for bit afterwards.

An unmerged LoRA layer runs three more kernels per linear layer (A, B, the scaled add) at every decoding step. A
decode step is launch-bound on a GPU, so with `target_modules="all-linear"` HF generation from an unmerged
adapter is the largest cost BRIDGE adds over GRPO that is not in the algorithm (`benchmarks/step_cost.py`, the
`adapter` column; `benchmarks/README.md` has the GPU measurement). vLLM already samples from merged weights
(`bridge_trl.vllm_sync`).

Merging in place and unmerging again (`peft`'s `merge`/`unmerge`) would leave θ off by a rounding error at every
step, so the adapted weights are copied before the merge and copied back after generation: θ is untouched, the
policy sampled is π(θ, w) (W + s·BA instead of Wx + s·B(Ax): the same function, summed in another order), and the
copies live only while generating (one copy of the adapted weights, freed before the training passes, whose
activations set the step's peak). Under ZeRO-3 the parameters are partitioned outside generation, so nothing is
merged there (generation gathers them itself); the field `merge_adapter_for_generation` turns it off.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from accelerate.utils import is_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear


@contextmanager
def adapter_merged(model: torch.nn.Module):
    """Inside: every LoRA linear layer of `model` holds W + s·BA in its base weight (and bias); outside: W."""
    saved = []
    try:
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, LoraLinear) and not module.merged and not module.disable_adapters:
                    base = module.get_base_layer()
                    tensors = [t for t in (base.weight, getattr(base, "bias", None)) if t is not None]
                    saved.append((module, base, [t.data.clone() for t in tensors]))
                    module.merge()
        yield model
    finally:
        with torch.no_grad():
            for module, base, copies in saved:
                tensors = [t for t in (base.weight, getattr(base, "bias", None)) if t is not None]
                for tensor, copy in zip(tensors, copies, strict=True):
                    tensor.data.copy_(copy)
                module.merged_adapters.clear()  # the base weights are W again: nothing is merged


class MergedGenerationMixin:
    """Overrides `_generate_single_turn`: HF generation (not vLLM) samples from the merged adapter."""

    def _generate_single_turn(
        self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False
    ):
        merge = (
            getattr(self.args, "merge_adapter_for_generation", False)
            and not self.use_vllm
            and is_peft_model(self.model)
            and not self._zero3
        )
        with adapter_merged(self.model) if merge else nullcontext():
            return super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )
