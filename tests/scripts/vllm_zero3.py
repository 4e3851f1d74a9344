"""BridgeTrainer under ZeRO-3 with a colocated vLLM engine per rank, for `tests/test_vllm_distributed.py`:

    DS_ACCELERATOR=cpu accelerate launch --config_file tests/configs/zero3_cpu.yaml \\
        tests/scripts/vllm_zero3.py MODEL_PATH OUT [shared|own]

Every rank installs the test-side CPU sync workaround and the float32 engine (`tests/vllm_cpu.py`), trains 2 SGD
steps with real vLLM generation, and writes OUT/rank{r}.pt: after every sync of its engine, the step, whether θ̂
was swapped in, and the engine's prompt log-probs of fixed probes; during every `load_weights` call, the ZeRO-3
parameters of the training model that were gathered (AVAILABLE) at that moment, by name; and θ, θ̂, w read through
the public accessors (collective) at the start of each step.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))  # `tests.vllm_cpu`

from tests.vllm_cpu import PROBE_TEXTS, StateSnapshots, SyncRecorder, rl_and_sft_datasets, setup_process  # noqa: E402

setup_process()

import torch  # noqa: E402
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from bridge_trl import BridgeConfig, BridgeTrainer  # noqa: E402
from tests.conftest import toy_reward  # noqa: E402


def main(path: str, out: str, shadow_rollouts: str) -> None:
    os.makedirs(out, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(path)
    rl, sft = rl_and_sft_datasets()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    args = BridgeConfig(
        output_dir=out, per_device_train_batch_size=8 // world, num_generations=4, max_completion_length=6,
        per_device_sft_batch_size=2 // world, max_steps=2, optim="sgd", learning_rate=0.05, weight_decay=0.0,
        lr_scheduler_type="constant", shadow_rollouts=shadow_rollouts, use_cpu=True, bf16=False, report_to="none",
        save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0, use_vllm=True, vllm_mode="colocate",
        vllm_max_model_length=256, vllm_gpu_memory_utilization=0.3,
    )  # fmt: skip
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    trainer = BridgeTrainer(path, toy_reward, args=args, train_dataset=rl, sft_dataset=sft,
                            processing_class=tokenizer, peft_config=lora)  # fmt: skip
    assert trainer.is_deepspeed_enabled and trainer.accelerator.num_processes == world
    # The adapter is attached after `from_pretrained` (partitioned inside zero.Init): every parameter is partitioned
    # once `train()` has built the engine, which is before the first sync.
    params, loads = dict(trainer.model.named_parameters()), []

    def on_load(names):
        assert all(hasattr(p, "ds_id") for p in params.values())
        gathered = [n for n, p in params.items() if p.ds_status == ZeroParamStatus.AVAILABLE]
        loads.append({"step": trainer.state.global_step, "loaded": names, "gathered": gathered})

    probes = [tokenizer(t)["input_ids"] for t in PROBE_TEXTS]
    syncs = SyncRecorder(trainer, probes, on_load=on_load)
    states = StateSnapshots(trainer)
    trainer.train()
    rank = trainer.accelerator.process_index
    persistent = sum(getattr(p, "ds_persist", False) for p in params.values())
    torch.save({"syncs": syncs.records, "loads": loads, "states": states.steps, "final": states.final,
                "persistent": persistent, "log_history": trainer.state.log_history},
               os.path.join(out, f"rank{rank}.pt"))  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "shared")
