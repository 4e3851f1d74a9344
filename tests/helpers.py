"""Helpers for building a BridgeTrainer on the tiny model in tests."""

import shutil
import socket
import sys
from pathlib import Path

import torch

from bridge_trl import BridgeConfig, BridgeTrainer

from .conftest import toy_reward

# GRPOConfig fields shared by every test run; BridgeConfig adds output_dir and BRIDGE's own fields.
GRPO_DEFAULTS = {
    "per_device_train_batch_size": 8,
    "num_generations": 4,
    "max_completion_length": 6,
    "max_steps": 1,
    "learning_rate": 1e-3,
    "logging_steps": 1,
    "report_to": "none",
    "use_cpu": True,
    "save_strategy": "no",
    "seed": 0,
    "disable_tqdm": True,
    "bf16": False,  # numerical checks run in fp32 (TRL defaults to bf16 autocast where supported, CPU included)
}


def make_config(tmp_path, **overrides) -> BridgeConfig:
    return BridgeConfig(**{"output_dir": str(tmp_path / "out"), **GRPO_DEFAULTS, **overrides})


def make_trainer(tmp_path, model, tokenizer, rl_dataset, sft_dataset, peft_config=None, **overrides):
    return BridgeTrainer(
        model,
        toy_reward,
        args=make_config(tmp_path, **overrides),
        train_dataset=rl_dataset,
        sft_dataset=sft_dataset,
        processing_class=tokenizer,
        # Omitted, BRIDGE attaches the paper's LoRA and a baseline none; None means "no adapter" (as in TRL).
        **({} if peft_config is None else {"peft_config": peft_config}),
    )


def snapshot(trainer):
    """(θ, θ̂, w) as CPU state dicts."""
    return trainer.get_base_state_dict(), trainer.get_shadow_state_dict(), trainer.get_adapter_state_dict()


def diff(after: dict, before: dict) -> dict:
    return {k: after[k].double() - before[k].double() for k in before}


def max_abs(d: dict) -> float:
    return max(v.abs().max().item() for v in d.values())


def assert_dicts_close(a: dict, b: dict, atol=1e-6, rtol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(
            a[k].double(), b[k].double(), atol=atol, rtol=rtol, msg=lambda m, k=k: f"{k}: {m}"
        )


def free_port() -> int:
    """A free TCP port on this machine, for a multi-process launcher's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(script: Path, *args, nproc: int = 2) -> list[str]:
    """`torchrun` from this interpreter's environment: `nproc` CPU processes (gloo) running `script *args`."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    return [
        torchrun,
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        str(free_port()),
        str(script),
        *map(str, args),
    ]


# The head of a torchrun test script (hpt, relift): rollouts as a function of (prompt, global row, step), so that
# 1 process, 2 processes and gradient accumulation sample the same completions; argv[1] output dir, argv[2] GA.
ROLLOUTS_SCRIPT_HEAD = '''
import json, os, sys, zlib
import torch
from datasets import Dataset
from trl import GRPOTrainer
from bridge_trl import BridgeConfig, BridgeTrainer
from bridge_trl.tiny import build_tiny_model, build_tokenizer

def single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
    """Rollouts as a function of (prompt, global row, step): the same on any process count and accumulation."""
    offset = self.accelerator.process_index * len(prompt_ids)
    out = []
    for i, ids in enumerate(prompt_ids):
        key = f"{self.processing_class.decode(ids)}|{(offset + i) % 4}|{self.state.global_step}"
        out.append(torch.randint(32, 127, (6,), generator=torch.Generator().manual_seed(zlib.crc32(key.encode()))).tolist())
    return out, None

GRPOTrainer._generate_single_turn = single_turn
world, ga = int(os.environ.get("WORLD_SIZE", "1")), int(sys.argv[2])
tok = build_tokenizer()
'''
