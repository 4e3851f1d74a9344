"""Saving and loading what BRIDGE trains: the base θ, the adapter w, and (in checkpoints) the shadow θ̂.

Layout of a saved model directory (`save_model`, `push_to_hub`, every checkpoint):

    <dir>/config.json, model.safetensors   θ, loadable with `AutoModelForCausalLM.from_pretrained(<dir>)`
    <dir>/adapter/                           w, loadable with `PeftModel.from_pretrained(base, <dir>/adapter)`
    <dir>/merged/                            optional (`save_merged`): π(θ, w) as one plain model
    <dir>/bridge_state.pt                    checkpoints only: θ̂, extra optimizer states, counters
                                             (ZeRO-3: bridge_state_rank{r}.pt, one per rank's shards)

The adapter sits in a subfolder so that transformers' PEFT integration does not mistake the directory for an
adapter-only checkpoint of the original hub model.
"""

from __future__ import annotations

import json
import logging
import os

import torch
from peft import PeftModel, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

from .shadow import unwrapped_base

logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"
EXTRAS_FILE = "bridge_state.pt"


def merged_state_dict(model: PeftModel, base_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """π(θ, w) as plain weights: each LoRA-wrapped weight W becomes W + ΔW (PEFT's own `get_delta_weight`)."""
    merged = dict(base_sd)
    for name, module in model.get_base_model().named_modules():
        if isinstance(module, LoraLayer):
            for adapter_name in module.active_adapters:
                if adapter_name not in module.lora_A:
                    continue
                key = f"{name}.weight"
                delta = module.get_delta_weight(adapter_name).detach().to("cpu", merged[key].dtype)
                merged[key] = merged[key] + delta
    return merged


def save_policy(
    output_dir: str, model, base_sd: dict[str, torch.Tensor], tokenizer, save_merged: bool
) -> None:
    """Write θ at the top level of `output_dir`, w under `adapter/`, and optionally π(θ, w) under `merged/`."""
    os.makedirs(output_dir, exist_ok=True)
    base = unwrapped_base(model)
    base.save_pretrained(output_dir, state_dict=dict(base_sd))  # save_pretrained consumes the dict
    if not isinstance(model, PeftModel):
        save_merged = False  # θ is the whole policy
    else:
        model.save_pretrained(os.path.join(output_dir, ADAPTER_DIR))
    if save_merged:
        base.save_pretrained(
            os.path.join(output_dir, MERGED_DIR), state_dict=merged_state_dict(model, base_sd)
        )
        if tokenizer is not None:
            tokenizer.save_pretrained(os.path.join(output_dir, MERGED_DIR))
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    logger.info("Saved base weights to %s and the adapter to %s/%s", output_dir, output_dir, ADAPTER_DIR)


def _load_base_weights(directory: str) -> dict[str, torch.Tensor]:
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    weights = {}
    for name in files:
        weights.update(load_file(os.path.join(directory, name)))
    return weights


def load_policy(directory: str, model) -> None:
    """Load θ (and w, for a PEFT model) saved by `save_policy` into a model built like the one that saved them."""
    weights = _load_base_weights(directory)
    is_peft = isinstance(model, PeftModel)
    loaded = 0
    with torch.no_grad():
        # Tied weights are one parameter here and one tensor in the file (transformers saves it once).
        for name, param in unwrapped_base(model).named_parameters():
            if is_peft and model.base_model.prefix in name:
                continue
            key = name.replace(".base_layer", "")
            if key not in weights:
                raise KeyError(f"{directory} has no tensor {key!r} for the base weights.")
            param.copy_(weights[key])
            loaded += 1
    if not is_peft:
        logger.info("Loaded %d tensors from %s", loaded, directory)
        return
    adapter_file = os.path.join(directory, ADAPTER_DIR, "adapter_model.safetensors")
    result = set_peft_model_state_dict(model, load_file(adapter_file))
    if getattr(result, "unexpected_keys", None):
        raise KeyError(f"Unexpected adapter keys in {adapter_file}: {result.unexpected_keys[:3]}")
    logger.info("Loaded %d base tensors and the adapter from %s", loaded, directory)


def is_complete_checkpoint(path: str) -> bool:
    """A checkpoint is complete once the Trainer wrote `trainer_state.json`, its last file, in full.

    The Trainer writes a checkpoint in place (model, optimizers, RNG, then the state), so a process killed during a
    save leaves a folder without a parseable state; older checkpoints are only rotated away after that file exists.
    """
    try:
        with open(os.path.join(path, "trainer_state.json")) as f:
            json.load(f)
    except (OSError, ValueError):
        return False
    return True


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The highest-step complete `checkpoint-N` in `output_dir`, skipping (and logging) incomplete ones."""
    steps = []
    for name in os.listdir(output_dir) if os.path.isdir(output_dir) else []:
        if name.startswith("checkpoint-") and name.split("-")[-1].isdigit():
            steps.append(int(name.split("-")[-1]))
    for step in sorted(steps, reverse=True):
        path = os.path.join(output_dir, f"checkpoint-{step}")
        if is_complete_checkpoint(path):
            return path
        logger.warning("Skipping %s: it is incomplete (the run stopped while saving it).", path)
    return None


def _extras_path(directory: str, rank: int | None) -> str:
    return os.path.join(
        directory, EXTRAS_FILE if rank is None else EXTRAS_FILE.replace(".pt", f"_rank{rank}.pt")
    )


def save_trainer_extras(output_dir: str, state: dict, rank: int | None = None) -> None:
    """θ̂, the extra optimizers' states and the consumption counters, next to the Trainer's own files.

    With `rank` (ZeRO-3, where θ̂ is sharded) each rank writes its own file, `bridge_state_rank{rank}.pt`.
    """
    torch.save(state, _extras_path(output_dir, rank))


def load_trainer_extras(checkpoint: str, rank: int | None = None) -> dict | None:
    path = _extras_path(checkpoint, rank)
    if not os.path.exists(path):
        return None
    return torch.load(path, map_location="cpu", weights_only=True)
