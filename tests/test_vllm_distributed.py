"""ZeRO-3 on 2 CPU processes with one colocated vLLM engine per rank (`make test-vllm`), the recipes' own path.

`tests/scripts/vllm_zero3.py` trains BridgeTrainer 2 steps under `tests/configs/zero3_cpu.yaml` (every parameter
partitioned, none persistent) and records, on each rank, what its engine held after every sync and which ZeRO-3
parameters were gathered during every `load_weights` call.

The documented bound (`bridge_trl/vllm_sync.py`): the sync gathers one weight at a time, with that layer's own
adapter matrices, so at most 3 parameters are gathered at once (a LoRA layer's W, A and B), and exactly those of
the module whose weight is being loaded. TRL's own PEFT path gathers the whole model at once.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .helpers import free_port
from .test_vllm import SCALING
from .vllm_cpu import (
    PROBE_TEXTS,
    hf_policy,
    hf_token_logprobs,
    logprob_tolerance,
    max_logprob_gap,
    merged_state_dict,
    requires_vllm,
    save_tiny_model,
    subprocess_env,
)

pytestmark = [pytest.mark.vllm, pytest.mark.distributed, requires_vllm]
ROOT = Path(__file__).resolve().parents[1]
MAX_GATHERED = 3  # W, lora_A, lora_B of one LoRA layer


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


def launch(path: str, out: Path, shadow_rollouts: str) -> list[dict]:
    pytest.importorskip("deepspeed")
    env = subprocess_env(DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    command = [accelerate, "launch", "--config_file", str(ROOT / "tests/configs/zero3_cpu.yaml"),
               "--main_process_port", str(free_port()), str(ROOT / "tests/scripts/vllm_zero3.py"), path, str(out),
               shadow_rollouts]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def vllm_name(name: str) -> str:
    return name.removeprefix("base_model.model.").replace(".base_layer", "")


def assert_gathering_bounded(loads: list[dict]) -> None:
    assert loads
    for load in loads:
        (loaded,) = load["loaded"]  # one tensor per `load_weights` call (TRL's colocate sync)
        gathered = load["gathered"]
        assert 1 <= len(gathered) <= MAX_GATHERED, load
        weights = [n for n in gathered if "lora_" not in n]
        assert [vllm_name(n) for n in weights] == [loaded], load  # only the weight being loaded ...
        owner = weights[0].removesuffix(".weight").removesuffix(".base_layer")
        adapters = sorted(n for n in gathered if "lora_" in n)
        assert all(n.startswith(owner + ".lora_") for n in adapters), load  # ... and its own A and B
        assert len(adapters) in (0, 2)
    assert max(len(load["gathered"]) for load in loads) == MAX_GATHERED  # LoRA layers: W, A, B together


def assert_engines_hold(records: list[dict], path: str, expected_order: list[tuple]) -> None:
    """Every rank's engine held, after each sync, the policy that sync was for; both ranks' engines agree."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    probes = [tokenizer(t)["input_ids"] for t in PROBE_TEXTS]
    tol = logprob_tolerance()
    states = records[0]["states"]
    for rank_record in records[1:]:  # the accessors give every rank the same full tensors
        for a, b in zip(states, rank_record["states"], strict=True):
            assert all(torch.equal(a["theta"][k], b["theta"][k]) for k in a["theta"])
    for rank, record in enumerate(records):
        assert record["persistent"] == 0
        assert [(r["step"], r["shadow"]) for r in record["syncs"]] == expected_order, rank
        assert_gathering_bounded(record["loads"])
        for sync in record["syncs"]:
            state = states[sync["step"]]
            which, other = ("shadow", "theta") if sync["shadow"] else ("theta", "shadow")
            model = hf_policy(path, merged_state_dict(state[which], state["w"], SCALING))
            assert max_logprob_gap(sync["logps"], [hf_token_logprobs(model, p) for p in probes]) < tol, (
                rank,
                sync,
            )
            theta_only = hf_policy(path, state["theta"])
            assert max_logprob_gap(sync["logps"], [hf_token_logprobs(theta_only, p) for p in probes]) > 0.1
            if sync["step"] == 1:  # θ̂¹ ≠ θ¹: the other policy is rejected
                model = hf_policy(path, merged_state_dict(state[other], state["w"], SCALING))
                assert max_logprob_gap(sync["logps"], [hf_token_logprobs(model, p) for p in probes]) > 0.1
    for a, b in zip(records[0]["syncs"], records[1]["syncs"], strict=True):
        assert max_logprob_gap(a["logps"], b["logps"]) < 1e-6


def test_zero3_shared_rollouts_every_engine_holds_the_policy(tiny_path, tmp_path):
    records = launch(tiny_path, tmp_path / "shared", "shared")
    assert_engines_hold(records, tiny_path, [(0, False), (1, False)])


def test_zero3_own_rollouts_every_engine_holds_each_policy_in_turn(tiny_path, tmp_path):
    records = launch(tiny_path, tmp_path / "own", "own")
    assert_engines_hold(records, tiny_path, [(0, False), (0, True), (1, False), (1, True)])
