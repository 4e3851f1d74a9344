"""A tiny BRIDGE run for the multi-process tests: `python run_bridge.py OUT`, `torchrun --nproc_per_node 2 ...` or
`accelerate launch --config_file tests/configs/zero3_cpu.yaml ...` (DeepSpeed ZeRO-3 on the CPU).

Environment (defaults in brackets):
- BRIDGE_TEST_MAX_STEPS [2], BRIDGE_TEST_GA: gradient accumulation [1], the global batch staying the same;
- BRIDGE_TEST_OPTIM [sgd], BRIDGE_TEST_SHADOW_ROLLOUTS [shared], BRIDGE_TEST_METHOD [bridge], BRIDGE_TEST_BETA [0];
- BRIDGE_TEST_SHADOW_OFFLOAD [none], BRIDGE_TEST_MAX_GRAD_NORM [0];
- BRIDGE_TEST_MODEL: a saved model's path, loaded with from_pretrained [the same model, built in memory];
- BRIDGE_TEST_SAVE: checkpoint every step; BRIDGE_TEST_RESUME: resume from the last complete checkpoint;
- BRIDGE_TEST_STALL_AT: hang inside that step's save; BRIDGE_TEST_BF16=1: bf16 (DeepSpeed: its bf16 mode).
- BRIDGE_TEST_CUDA=1: on the GPU (`tests/test_gpu.py`; DeepSpeed over NCCL); BRIDGE_TEST_GC=1: non-reentrant
  gradient checkpointing.
- chord runs with μ = 0, then 0.9 (warm-up 1 step); luffy's SFT set holds traces for every other RL prompt, and
  its rollouts come from `_generate_single_turn` (luffy substitutes traces there; it does not take a rollout_func).

states.pt holds (θ, θ̂, w) after training, then the same three read before `train()` and from a callback at the end
of step 1, through the public accessors (which must work at all three times on every backend).

Rollouts come from a deterministic `rollout_func` (a function of the prompt text and the sample's index), so one
process and two processes train on exactly the same completions and their results can be compared.
"""

import json
import os
import sys
import time
import zlib

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import TrainerCallback
from trl import GRPOTrainer

from bridge_trl import BridgeConfig, BridgeTrainer
from bridge_trl.tiny import build_tiny_model, build_tokenizer

GLOBAL_COMPLETIONS, GLOBAL_SFT, NUM_GENERATIONS, LENGTH = 16, 4, 4, 6


def reward(completions, **kwargs):
    return [float(sum(map(ord, c)) % 7) / 6.0 for c in completions]


def deterministic_rollouts(prompts, trainer):
    """Completions as a function of (prompt, its occurrence index in the group): the same on any process count."""
    tokenizer = trainer.processing_class
    seen, prompt_ids, completion_ids = {}, [], []
    for prompt in prompts:
        j = seen[prompt] = seen.get(prompt, -1) + 1
        g = torch.Generator().manual_seed(zlib.crc32(f"{prompt}|{j}|{trainer.state.global_step}".encode()))
        prompt_ids.append(tokenizer(prompt)["input_ids"])
        completion_ids.append(torch.randint(32, 127, (LENGTH,), generator=g).tolist())
    return {
        "prompt_ids": prompt_ids,
        "completion_ids": completion_ids,
        "logprobs": [[0.0] * LENGTH] * len(prompts),
    }


def deterministic_single_turn(
    self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False
):
    """`deterministic_rollouts` at GRPOTrainer's generation hook, below luffy's trace substitution."""
    prompts = [self.processing_class.decode(ids) for ids in prompt_ids]
    return deterministic_rollouts(prompts, self)["completion_ids"], None


class StallingTrainer(BridgeTrainer):
    """Stalls inside the save of checkpoint `BRIDGE_TEST_STALL_AT`, after announcing it, so a test can kill it."""

    def _save_optimizer_and_scheduler(self, output_dir):
        super()._save_optimizer_and_scheduler(output_dir)
        if str(self.state.global_step) == os.environ.get("BRIDGE_TEST_STALL_AT"):
            open(os.path.join(os.path.dirname(output_dir), "stalled"), "w").close()
            time.sleep(600)


def accessor_states(trainer, method):
    shadow = trainer.get_shadow_state_dict() if method == "bridge" else {}
    return trainer.get_base_state_dict(), shadow, trainer.get_adapter_state_dict()


class ReadDuringTraining(TrainerCallback):
    """The accessors called from a callback (collectively, on every rank) at the end of step 1."""

    states = ()

    def __init__(self, method):
        self.method, self.trainer = method, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            ReadDuringTraining.states = accessor_states(self.trainer, self.method)


class CountSteps(TrainerCallback):
    """Counts the optimizer steps this process ran (a resumed run runs only the remaining ones)."""

    steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        CountSteps.steps += 1


def main(out: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    accumulation = int(os.environ.get("BRIDGE_TEST_GA", "1"))
    method = os.environ.get("BRIDGE_TEST_METHOD", "bridge")
    tokenizer = build_tokenizer()
    rl = Dataset.from_dict({"prompt": [f"{i}+{i + 1}=" for i in range(32)]})
    sft = Dataset.from_dict(
        {
            "prompt": [f"{i}*2=" for i in range(12)],
            "completion": [f"{2 * i}" * (1 + i % 3) for i in range(12)],
        }
    )
    rollout_func = deterministic_rollouts
    if method == "luffy":
        sft = Dataset.from_dict(
            {"prompt": rl["prompt"][::2], "completion": [f"{4 * i + 1}." for i in range(16)]}
        )
        GRPOTrainer._generate_single_turn, rollout_func = deterministic_single_turn, None
    args = BridgeConfig(
        output_dir=out, per_device_train_batch_size=GLOBAL_COMPLETIONS // world // accumulation,
        gradient_accumulation_steps=accumulation, num_generations=NUM_GENERATIONS, max_completion_length=LENGTH,
        per_device_sft_batch_size=GLOBAL_SFT // world // accumulation, max_steps=int(os.environ.get("BRIDGE_TEST_MAX_STEPS", "2")), optim=os.environ.get("BRIDGE_TEST_OPTIM", "sgd"),
        shadow_rollouts=os.environ.get("BRIDGE_TEST_SHADOW_ROLLOUTS", "shared"), method=method,
        beta=float(os.environ.get("BRIDGE_TEST_BETA", "0")),
        learning_rate=0.1, lr_scheduler_type="linear", weight_decay=0.0,
        use_cpu=os.environ.get("BRIDGE_TEST_CUDA") != "1", gradient_checkpointing=os.environ.get("BRIDGE_TEST_GC") == "1",
        gradient_checkpointing_kwargs={"use_reentrant": False},
        max_grad_norm=float(os.environ.get("BRIDGE_TEST_MAX_GRAD_NORM", "0")),
        shadow_offload=os.environ.get("BRIDGE_TEST_SHADOW_OFFLOAD", "none"),
        chord_mu_warmup_steps=1, chord_mu_decay_steps=1, chord_mu_peak=0.9, chord_mu_valley=0.05,
        bf16=os.environ.get("BRIDGE_TEST_BF16") == "1", report_to="none", save_strategy="steps" if "BRIDGE_TEST_SAVE" in os.environ else "no", save_steps=1, logging_steps=1, disable_tqdm=True, seed=0,
    )  # fmt: skip
    model = os.environ.get("BRIDGE_TEST_MODEL") or build_tiny_model(tokenizer)  # a saved path loads for real
    trainer = StallingTrainer(
        model, reward, args=args, train_dataset=rl, sft_dataset=sft, processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
        rollout_func=rollout_func, callbacks=[CountSteps(), during := ReadDuringTraining(method)],
    )  # fmt: skip
    during.trainer = trainer
    assert trainer.accelerator.num_processes == world
    before = accessor_states(trainer, method)
    trainer.train(resume_from_checkpoint=True if "BRIDGE_TEST_RESUME" in os.environ else None)
    states = (*accessor_states(trainer, method), *before, *ReadDuringTraining.states)
    if trainer.accelerator.is_main_process:
        torch.save(states, os.path.join(out, "states.pt"))
        with open(os.path.join(out, "log.json"), "w") as f:
            json.dump(trainer.state.log_history, f)
        # How the run was partitioned: ZeRO-3 parameters that stay gathered outside forward ("persistent").
        params = list(trainer.model.parameters())
        inner = trainer.optimizer
        while hasattr(inner, "optimizer"):  # accelerate's and DeepSpeed's wrappers
            inner = inner.optimizer
        meta = {
            "optimizer_steps": sorted({int(s["step"]) for s in inner.state.values() if "step" in s}),
            "steps_run": CountSteps.steps,
            "zero3": sum(hasattr(p, "ds_id") for p in params),
            "persistent": sum(getattr(p, "ds_persist", False) for p in params),
        }
        with open(os.path.join(out, "meta.json"), "w") as f:
            json.dump(meta, f)


if __name__ == "__main__":
    main(sys.argv[1])
