"""Saving and loading what BRIDGE trains: the base θ, the adapter w, and (in checkpoints) the shadow θ̂.

Layout of a saved model directory (`save_model`, `push_to_hub`, every checkpoint):

    <dir>/config.json, model.safetensors   θ, loadable with `AutoModelForCausalLM.from_pretrained(<dir>)`
    <dir>/adapter/                           w, loadable with `PeftModel.from_pretrained(base, <dir>/adapter)`
    <dir>/README.md                          the model card: the method run, and how to load π(θ, w) (`card.py`)
    <dir>/merged/                            optional (`save_merged`): π(θ, w) as one plain model
    <dir>/bridge_state.pt                    checkpoints only: θ̂, extra optimizer states, counters
                                             (ZeRO-3: bridge_state_rank{r}.pt, one per rank's shards)
    <dir>/bridge_reference.safetensors       cold start after its switch with β > 0: the KL reference π(θ_SFT, w)

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
from safetensors.torch import load_file, save_file

from .shadow import adapter_state_dict, base_state_dict, gathered, split_parameters, unwrapped_base
from .zero import parameters_state_dict, write_parameters

logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"
EXTRAS_FILE = "bridge_state.pt"
REFERENCE_FILE = (
    "bridge_reference.safetensors"  # cold start past its switch, β > 0: the SFT model, its KL reference
)


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


class BridgeCheckpointMixin:
    """`BridgeTrainer`'s state accessors and checkpoint hooks: θ, w and θ̂ in saved models and checkpoints.

    Hooks overridden: `save_model` (θ plus adapter, gathered under ZeRO-3), `train` (resumes only from complete
    checkpoints), `_load_from_checkpoint`, `_save_optimizer_and_scheduler` and `_load_optimizer_and_scheduler` (θ̂,
    the extra optimizers and the consumption counters; one file per rank under ZeRO-3, where θ̂ is sharded).
    """

    def _unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    def get_base_state_dict(self) -> dict[str, torch.Tensor]:
        """θ, keyed like the un-wrapped model's `state_dict()`, on the CPU."""
        return base_state_dict(self._unwrapped())

    def get_shadow_state_dict(self) -> dict[str, torch.Tensor]:
        """θ̂, keyed like the un-wrapped model's `state_dict()`, on the CPU (tied weights stay tied).

        Works before, during (e.g. from a callback; collective under ZeRO-3, like the other accessors) and after
        training, on every backend.
        """
        if self.args.method != "bridge":
            raise ValueError(f"method={self.args.method!r} has no shadow weights θ̂.")
        # Under DeepSpeed θ̂ is built from the engine, which `train()` creates; before that θ̂ = θ⁰ = θ (Alg. 2, l. 1).
        if self._ensure_shadow() is None:
            return self.get_base_state_dict()
        with self.shadow.swapped_in():
            return base_state_dict(self._unwrapped())

    def get_adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """w, keyed like `peft.get_peft_model_state_dict`, on the CPU (empty without an adapter)."""
        return adapter_state_dict(self._unwrapped())

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        output_dir = output_dir or self.args.output_dir
        base_sd = self.get_base_state_dict()
        adapter = [p for _, p in split_parameters(self._unwrapped())[1]]
        with gathered(adapter):  # w in full (ZeRO-3), for the adapter and merged files
            if self.args.should_save:
                save_policy(
                    output_dir, self._unwrapped(), base_sd, self.processing_class, self.args.save_merged
                )
                torch.save(self.args, f"{output_dir}/training_args.bin")
        # The model card (`bridge_trl.card`): the method run, and how to load π(θ, w) from this folder.
        self.create_model_card(output_dir=output_dir)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """`Trainer.train`, resuming only from complete checkpoints (a save cut short by a kill is skipped)."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No complete checkpoint to resume from in {self.args.output_dir}.")
        elif resume_from_checkpoint and not is_complete_checkpoint(resume_from_checkpoint):
            raise ValueError(
                f"{resume_from_checkpoint} is incomplete (no valid trainer_state.json): pick an earlier one."
            )
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        load_policy(resume_from_checkpoint, self._unwrapped())

    def _save_optimizer_and_scheduler(self, output_dir):
        super()._save_optimizer_and_scheduler(output_dir)
        sharded = self._zero3  # each rank writes its own θ̂ shards
        if self.args.should_save or sharded:
            extras = {"consumed": dict(self.consumed)}
            if self._ensure_shadow() is not None:
                extras.update(
                    shadow=self.shadow.state_dict(), shadow_optimizer=self.shadow_optimizer.state_dict()
                )
            if self.sft_optimizer is not None:
                extras["sft_optimizer"] = self.sft_optimizer.state_dict()
            if self.args.method == "relift":  # the buffer of failed prompts (`bridge_trl.relift`)
                extras["relift"] = self.relift_state_dict()
            if getattr(self, "cold_start_val", None) is not None:  # the measured switch (`cold_start`)
                extras["cold_start"] = self.cold_start_val.tracker.state_dict()
            save_trainer_extras(output_dir, extras, self.args.process_index if sharded else None)
        if self._reference_is_sft_model(self.state.global_step):  # collective under ZeRO-3
            reference = parameters_state_dict(self.ref_model)
            if self.args.should_save:
                save_file(reference, os.path.join(output_dir, REFERENCE_FILE))

    def _reference_is_sft_model(self, completed_steps: int) -> bool:
        """Cold start with a KL term, past the start of its RL phase: the reference is no longer θ⁰."""
        return (self.args.method == "cold_start" and self.beta != 0.0
                and completed_steps > self._cold_start_switch())  # fmt: skip

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        rank = self.args.process_index if self._zero3 else None
        if checkpoint is None:
            return
        with open(os.path.join(checkpoint, "trainer_state.json")) as f:
            completed_steps = json.load(f)["global_step"]
        extras = load_trainer_extras(checkpoint, rank)
        # cold start's measured switch, restored before the reference check (which reads the switch)
        measured = getattr(self, "cold_start_val", None)
        if extras is not None and measured is not None:
            self.cold_start_val.tracker.load_state_dict(extras["cold_start"])
        if self._reference_is_sft_model(completed_steps):
            path = os.path.join(checkpoint, REFERENCE_FILE)
            if not os.path.exists(path):
                raise FileNotFoundError(f"{checkpoint} is past cold start's switch with beta > 0 but has no "
                                        f"{REFERENCE_FILE} (the SFT model, its KL reference).")  # fmt: skip
            write_parameters(self.ref_model, load_file(path).items())
        if extras is None:
            # θ̂ / the SFT optimizer / relift's buffer / the measured switch cannot be recovered
            if self.args.method in ("bridge", "alternating", "relift") or measured is not None:
                raise FileNotFoundError(
                    f"{checkpoint} has no {EXTRAS_FILE if rank is None else f'rank-{rank} BRIDGE state'} file "
                    f"(θ̂ and the extra optimizer states): resume with the same method, ZeRO stage and number of "
                    "processes that wrote it."
                )
            logger.warning(
                "%s has no %s: the bridge/ consumption counters restart from 0.", checkpoint, EXTRAS_FILE
            )
            return
        self.consumed.update(extras["consumed"])
        if self._ensure_shadow() is not None:
            self.shadow.load_state_dict(extras["shadow"])
            self.shadow_optimizer.load_state_dict(extras["shadow_optimizer"])
        if self.sft_optimizer is not None:
            self.sft_optimizer.load_state_dict(extras["sft_optimizer"])
        if self.args.method == "relift":
            self.load_relift_state_dict(extras["relift"])
