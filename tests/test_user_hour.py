"""A TRL user's first hour, through the installed console command: own reward (dotted path), own jsonl data, 2 steps,
the model card's snippet run to reload the policy; the README's Quick start; and the CLI's errors on bad input."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from bridge_trl.tiny import build_tiny_model, build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
REWARDS = '''
def exact(completions, answer, **kwargs):
    """1 when the completion states the answer."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [float(a in t) for t, a in zip(texts, answer)]


def brevity(completions, **kwargs):
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [-len(t) / 100 for t in texts]
'''


def console() -> str:
    """The `bridge-trl` command that `pip install -e .` put next to this interpreter."""
    path = shutil.which("bridge-trl", path=str(Path(sys.executable).parent))
    assert path, "bridge-trl is not installed: run `pip install -e . --no-deps` in the venv"
    return path


@pytest.fixture
def user_dir(tmp_path):
    """What the user has: a small local model, a reward module, an RL and an SFT jsonl file, and a recipe."""
    tokenizer = build_tokenizer()
    build_tiny_model(tokenizer).save_pretrained(tmp_path / "my-model")
    tokenizer.save_pretrained(tmp_path / "my-model")
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "my_rewards.py").write_text(REWARDS)
    sums = [(a, b) for a in range(1, 5) for b in range(1, 5)]
    with open(tmp_path / "rl.jsonl", "w") as f:
        for a, b in sums:
            f.write(json.dumps({"question": f"What is {a} + {b}?", "target": str(a + b)}) + "\n")
    with open(tmp_path / "sft.jsonl", "w") as f:
        for a, b in sums:
            f.write(json.dumps({"question": f"What is {a} + {b}?", "worked": f"{a} + {b} = {a + b}"}) + "\n")
    recipe = {
        "model_name_or_path": str(tmp_path / "my-model"), "dtype": "float32", "lora_r": 4, "lora_alpha": 8,
        "rl_datasets": [str(tmp_path / "rl.jsonl")], "rl_question_column": "question", "rl_answer_column": "target",
        "sft_dataset": str(tmp_path / "sft.jsonl"), "sft_format": "solutions", "sft_prompt_column": "question",
        "sft_completion_column": "worked", "output_dir": str(tmp_path / "out"), "max_steps": 2,
        "per_device_train_batch_size": 4, "num_generations": 2, "max_completion_length": 8, "use_cpu": True,
        "report_to": ["none"], "save_strategy": "no", "logging_steps": 1, "learning_rate": 1e-3,
    }  # fmt: skip
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return tmp_path


def run(user_dir: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(user_dir / "code")}  # fmt: skip
    result = subprocess.run(
        [console(), *args], capture_output=True, text=True, env=env, timeout=600, cwd=user_dir
    )
    assert (result.returncode == 0) == ok, result.stderr[-3000:]
    return result


def merged_by_hand(out: Path) -> AutoModelForCausalLM:
    """π(θ, w) rebuilt without PEFT: W + (α/r) B A for every adapted weight, from the saved tensors."""
    model = AutoModelForCausalLM.from_pretrained(out)
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, a in adapter.items():
            if ".lora_A." in key:
                b = adapter[key.replace(".lora_A.", ".lora_B.")]
                name = key.replace("base_model.model.", "").replace(".lora_A.weight", ".weight")
                params[name] += scale * b @ a
    return model


def test_first_hour(user_dir):
    result = run(user_dir, "train", "--config", "recipe.yaml", "--reward_funcs", "my_rewards.exact",
                 "my_rewards.brevity", "--reward_weights", "1.0", "0.5")  # fmt: skip
    logs = result.stdout + result.stderr
    assert "'rewards/exact/mean'" in logs and "'rewards/brevity/mean'" in logs  # the user's own rewards ran
    out = user_dir / "out"
    assert (
        json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 4
    )  # lora_r passed through
    card = (out / "README.md").read_text()
    assert "This model was trained with BRIDGE, a method introduced in [Beyond Two-Stage Training" in card
    assert "fine-tuned version of a local model on `rl.jsonl` (local), `sft.jsonl` (local)." in card
    assert "LoRA rank r / alpha / target modules | 4 / 8 /" in card
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert f'PeftModel.from_pretrained(model, "{out}", subfolder="adapter")' in snippet
    scope = {}
    exec(snippet, scope)  # as pasted from the card: loads θ + w, generates, prints
    ids = scope["tokenizer"](["What is 2 + 3?", "1 + 1 = 2"], return_tensors="pt", padding=True)
    with torch.no_grad():
        policy = scope["model"].eval()(**ids).logits
        by_hand = merged_by_hand(out).eval()(**ids).logits
        base = AutoModelForCausalLM.from_pretrained(user_dir / "my-model").eval()(**ids).logits
    torch.testing.assert_close(policy, by_hand, atol=1e-5, rtol=1e-5)
    assert (policy - base).abs().max() > 1e-3  # two steps at lr 1e-3 moved the policy


def test_help_shows_bridge_fields_first():
    help_text = subprocess.run(
        [console(), "train", "--help"], capture_output=True, text=True, check=True
    ).stdout
    lines = help_text.splitlines()
    first = {flag: next(i for i, line in enumerate(lines) if line.strip().startswith(flag))
             for flag in ("--reward_funcs", "--bridge_lambda", "--method", "--lora_r", "--per_device_train_batch_size",
                          "--chord_mu_peak")}  # fmt: skip
    assert first["--reward_funcs"] < first["--method"] < first["--bridge_lambda"] < 200
    # the peers' fields (`PeerMethodsConfig`) in their own group, after BRIDGE's and before the inherited ones
    assert first["--bridge_lambda"] < first["--chord_mu_peak"] < first["--per_device_train_batch_size"]
    assert first["--bridge_lambda"] < first["--lora_r"] < first["--per_device_train_batch_size"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--reward_funcs", "exactly"], r"unknown reward 'exactly'.*dotted import path"),
        (["--reward_funcs", "my_rewards.missing"], r"could not import 'my_rewards.missing'"),
        (["--use_peft", "false"], r"method='bridge' needs a LoRA adapter w"),
        (["--learning_rate", "-1"], r"`learning_rate` must be >= 0, got -1"),
        (["--method", "cold_start", "--cold_start_sft_steps", "2"], r"at step 2, but the run has 2 .*never run RL"),
        (["--sft_format", "trl", "--sft_prompt_column", "question", "--sft_completion_column", "worked"],
         r"RL prompts .* message lists .* SFT examples .* plain strings"),
    ],
)  # fmt: skip
def test_cli_errors_name_the_field(user_dir, flags, message, monkeypatch):
    """The console command's `main`, in process (each case stops before any step; a subprocess each is slow)."""
    from bridge_trl.cli import main

    monkeypatch.chdir(user_dir)
    monkeypatch.syspath_prepend(str(user_dir / "code"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ValueError, match=message):
        main(["train", "--config", "recipe.yaml", "--reward_funcs", "my_rewards.exact", *flags])


def test_baseline_without_adapter_and_without_sft(user_dir):
    """`method: rl` loads no SFT data; `use_peft: false` means no adapter, as in TRL; the card says GRPO."""
    run(user_dir, "train", "--config", "recipe.yaml", "--reward_funcs", "my_rewards.exact", "--method", "rl",
        "--sft_dataset", "does-not-exist.jsonl", "--use_peft", "false", "--max_steps", "1")  # fmt: skip
    out = user_dir / "out"
    assert not (out / "adapter").exists()
    card = (out / "README.md").read_text()
    assert "trained with GRPO alone (the RL-only baseline of BRIDGE)" in card and "`rl.jsonl` (local)" in card
    assert "sft.jsonl" not in card and "does-not-exist" not in card


def test_readme_quick_start_runs_as_written(tmp_path, monkeypatch):
    """The README's Quick start, with only the Hub model id pointed at a local tiny model (no network here)."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start\n\n```python\n(.*?)```", readme, re.S).group(1)
    hub_id = re.search(r'model="([^"]+)"', block).group(1)
    tokenizer = build_tokenizer()
    build_tiny_model(tokenizer).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(textwrap.dedent(block).replace(hub_id, str(tmp_path / "model")), scope)
    out = tmp_path / "out"
    assert (out / "model.safetensors").exists() and (out / "adapter" / "adapter_config.json").exists()
    assert "This model was trained with BRIDGE" in (out / "README.md").read_text()
    assert scope["trainer"].state.global_step == scope["trainer"].args.max_steps
