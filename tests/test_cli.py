"""`bridge-trl train` (the console command; `examples/train_bridge.py` wraps it) end to end on a tiny local model and
local data, and logging to wandb offline."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bridge_trl.tiny import build_tiny_model, build_tokenizer

from .helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def write_recipe(tmp_path: Path, method: str, **overrides) -> Path:
    model_dir = tmp_path / "tiny-model"
    if not model_dir.exists():
        tokenizer = build_tokenizer()
        build_tiny_model(tokenizer).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    # The shipped recipe, shrunk: the same fields, pointed at local files and sized for a CPU.
    recipe = yaml.safe_load((ROOT / "configs/recipes/Qwen2.5-3B" / f"{method}.yaml").read_text())
    recipe.update(
        model_name_or_path=str(model_dir), dtype="float32", rl_datasets=[str(FIXTURES / "rl_tiny.jsonl")],
        sft_dataset=str(FIXTURES / "deepmath_tiny.jsonl"), output_dir=str(tmp_path / "out"), max_steps=2,
        num_train_epochs=1, per_device_train_batch_size=4, gradient_accumulation_steps=1, num_generations=2,
        per_device_sft_batch_size=1, max_completion_length=8, use_vllm=False, bf16=False, use_cpu=True,
        gradient_checkpointing=False, report_to=["none"], save_strategy="no", lora_r=4, lora_alpha=4,
        learning_rate=1e-3, reward_timeout_s=5.0,
    )  # fmt: skip
    recipe.update(overrides)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def run_cli(recipe: Path, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env_extra or {})}
    command = shutil.which("bridge-trl", path=str(Path(sys.executable).parent))
    assert command, "bridge-trl is not installed: run `pip install -e . --no-deps` in the venv"
    result = subprocess.run(
        [command, "train", "--config", str(recipe)], capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.parametrize("method", ["bridge", "rl"])
def test_recipe_runs_end_to_end(tmp_path, method):
    bench = tmp_path / "bench" / "math500"
    bench.mkdir(parents=True)
    bench.joinpath("test.jsonl").write_text(
        '{"problem": "1+1?", "answer": "2"}\n{"problem": "2+2?", "answer": "4"}\n'
    )
    eval_args = f"--data_dir {tmp_path / 'bench'} --benchmarks math500 --max_new_tokens 4 --backend hf"
    run_cli(write_recipe(tmp_path, method, eval_after_training=True, eval_args=eval_args))
    out = tmp_path / "out"
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    assert (out / "adapter" / "adapter_config.json").exists() == (method == "bridge")
    if method == "bridge":  # the recipe's lora_r / lora_alpha reach the adapter
        config = json.loads((out / "adapter" / "adapter_config.json").read_text())
        assert (config["r"], config["lora_alpha"]) == (4, 4)
    card = (out / "README.md").read_text()
    assert ("trained with BRIDGE," if method == "bridge" else "trained with GRPO alone") in card
    assert "`rl_tiny.jsonl` (local)" in card and ("`deepmath_tiny.jsonl` (local)" in card) == (
        method == "bridge"
    )
    # The trained policy (θ, plus w for BRIDGE) was scored on the benchmark: one verdict per problem.
    assert "math500" in (out / "eval" / "results.md").read_text().lower().replace(" ", "")
    assert (out / "eval" / "results.json").exists()


def test_reward_flip_prob_trains_on_a_noisy_reward(tmp_path):
    """`reward_flip_prob` wraps the training reward in NoisyReward: the run logs its realised flip rate."""
    result = run_cli(write_recipe(tmp_path, "rl", reward_flip_prob=0.5, logging_steps=1, log_level="info"))
    logs = result.stdout + result.stderr
    assert "Training reward flipped with probability 0.5" in logs and "flip_rate" in logs


def test_shipped_recipes_parse():
    from bridge_trl.cli.parser import make_parser
    from bridge_trl.cli.train import ScriptArguments

    recipes = sorted((ROOT / "configs/recipes").glob("*/*.yaml"))
    cpu_recipes = [
        r for r in recipes if r.parent.name == "SmolLM2-135M-Instruct"
    ]  # tests/test_real.py and tests/test_real_logic.py run them
    paper = [r for r in recipes if r not in cpu_recipes]
    # The paper's three models × eleven methods (its eight, HPT, ReLIFT and cold start with the val-loss switch), for
    # maths; × four for logic.
    maths = sorted({r.stem for r in paper if not r.stem.startswith("logic_")})
    assert maths == sorted(["bridge", "mix", "alternating", "rl", "sft", "cold_start", "chord", "luffy", "hpt",
                            "relift", "cold_start_val_loss"])  # fmt: skip
    assert sum(not r.stem.startswith("logic_") for r in paper) == 3 * len(maths)
    logic = sorted(r.stem for r in paper if r.stem.startswith("logic_"))
    assert logic == sorted(f"logic_{m}" for m in ("bridge", "rl", "cold_start", "mix") for _ in range(3))
    assert sorted(r.stem for r in cpu_recipes) == ["bridge", "logic_bridge", "rl"]
    for recipe in recipes:
        parser = make_parser(ScriptArguments)
        script, training, model = parser.parse_args_and_config(["--config", str(recipe), "--use_cpu", "true"])
        method = recipe.stem.removeprefix("logic_").removesuffix("_val_loss")
        assert training.method == method
        assert (training.cold_start_switch == "val_loss") == recipe.stem.endswith("_val_loss")
        assert model.use_peft == (method == "bridge")
        assert script.task == ("logic" if recipe.stem.startswith("logic_") else "maths")
        if recipe not in cpu_recipes:
            assert training.learning_rate == 5e-7 and training.num_generations in (5, 8)
        elif script.task == "maths":
            assert script.sft_format == "solutions" and training.report_to == ["tensorboard"]
        else:
            assert training.report_to == ["tensorboard"] and training.max_steps > 0
    # A logic recipe is its maths recipe but for the data, where it writes, and the epochs (commented there).
    data_fields = {"rl_datasets", "sft_dataset", "pair_sft_with_rl", "prompt_template", "think", "task",
                   "logic_data_dir", "output_dir", "num_train_epochs"}  # fmt: skip
    for recipe in (r for r in paper if r.stem.startswith("logic_")):
        ours = yaml.safe_load(recipe.read_text())
        maths = yaml.safe_load((recipe.parent / f"{recipe.stem.removeprefix('logic_')}.yaml").read_text())
        assert {k: v for k, v in ours.items() if k not in data_fields} == {
            k: v for k, v in maths.items() if k not in data_fields
        }, recipe
        assert "num_train_epochs: 2  #" in recipe.read_text()


def test_wandb_offline_run_holds_bridge_metrics(tmp_path):
    pytest.importorskip("wandb")
    recipe = write_recipe(tmp_path, "bridge", report_to=["wandb"], run_name="tiny")
    run_cli(recipe, {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_PROJECT": "bridge-test"})
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    data = runs[0].read_bytes()
    for key in (b"bridge/sft_loss", b"bridge/cooperative_gain", b"bridge/lambda", b"bridge/rl_samples"):
        assert key in data


@pytest.mark.distributed
def test_recipe_runs_under_zero3_on_two_processes(tmp_path):
    """`accelerate launch --config_file <ZeRO-3> examples/train_bridge.py --config <recipe>`: the model loads inside
    `zero.Init` (partitioned as it loads), gradient checkpointing is on (TRL makes it reentrant for PEFT + ZeRO-3),
    and checkpoints hold each rank's θ̂ shards."""
    pytest.importorskip("deepspeed")
    recipe = write_recipe(tmp_path, "bridge", per_device_train_batch_size=2, gradient_checkpointing=True,
                          save_strategy="steps", save_steps=1)  # fmt: skip
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    result = subprocess.run(
        [accelerate, "launch", "--config_file", str(ROOT / "tests/configs/zero3_cpu.yaml"), "--main_process_port",
         str(free_port()), str(ROOT / "examples/train_bridge.py"), "--config", str(recipe)],
        capture_output=True, text=True, env=env, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "out"
    assert (out / "model.safetensors").exists() and (out / "adapter" / "adapter_config.json").exists()
    shards = sorted(p.name for p in (out / "checkpoint-2").glob("bridge_state_rank*.pt"))
    assert shards == ["bridge_state_rank0.pt", "bridge_state_rank1.pt"]
    assert "'bridge/sft_loss'" in result.stdout + result.stderr
