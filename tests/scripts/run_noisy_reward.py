"""`NoisyReward` inside a real BridgeTrainer for the multi-process test (`tests/test_noisy_reward.py`):
`torchrun --nproc_per_node 2 run_noisy_reward.py OUT` (DDP over gloo on the CPU), or `python ... OUT`.

Rollouts are `run_bridge.deterministic_rollouts` (a function of the prompt, its index in the group and the step), so
the global batch is the same on any number of processes. Each rank writes OUT/noise_rank<r>.json: per reward call,
the step, this process's index, and the clean and noisy rewards of its slice, as the trainer passed them.
"""

import json
import os
import sys

from datasets import Dataset
from peft import LoraConfig

from bridge_trl import BridgeConfig, BridgeTrainer, NoisyReward
from bridge_trl.tiny import build_tiny_model, build_tokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run_bridge import GLOBAL_COMPLETIONS, GLOBAL_SFT, LENGTH, NUM_GENERATIONS, deterministic_rollouts  # noqa: E402

CALLS = []


def parity(completions, **kwargs):
    """A {0, 1} reward of the completion text."""
    return [float(sum(map(ord, c)) % 2) for c in completions]


def main(out: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    noisy = NoisyReward(parity, 0.5, seed=5)

    def reward(*args, **kwargs):
        clean, noisy_rewards = parity(*args, **kwargs), noisy(*args, **kwargs)
        trainer = kwargs["log_metric"].__self__
        CALLS.append({"step": kwargs["trainer_state"].global_step, "rank": trainer.accelerator.process_index,
                      "clean": clean, "noisy": noisy_rewards})  # fmt: skip
        return noisy_rewards

    reward.__name__ = "parity"
    tokenizer = build_tokenizer()
    rl = Dataset.from_dict({"prompt": [f"{i}+{i + 1}=" for i in range(32)]})
    sft = Dataset.from_dict(
        {"prompt": [f"{i}*2=" for i in range(12)], "completion": [f"{2 * i}" for i in range(12)]}
    )
    args = BridgeConfig(
        output_dir=out, per_device_train_batch_size=GLOBAL_COMPLETIONS // world, num_generations=NUM_GENERATIONS,
        max_completion_length=LENGTH, per_device_sft_batch_size=GLOBAL_SFT // world, max_steps=3, optim="sgd",
        learning_rate=0.1, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
        use_cpu=True, bf16=False,
    )  # fmt: skip
    trainer = BridgeTrainer(build_tiny_model(tokenizer), reward, args=args, train_dataset=rl, sft_dataset=sft,
                            processing_class=tokenizer, rollout_func=deterministic_rollouts,
                            peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))  # fmt: skip
    assert trainer.accelerator.num_processes == world
    trainer.train()
    with open(os.path.join(out, f"noise_rank{trainer.accelerator.process_index}.json"), "w") as f:
        json.dump({"world": world, "calls": CALLS, "flips": noisy.flips, "flippable": noisy.flippable}, f)


if __name__ == "__main__":
    main(sys.argv[1])
