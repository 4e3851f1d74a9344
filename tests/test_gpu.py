"""The CUDA path, checked against independent computations (`make gpu-check`; skipped without a CUDA GPU).

Every test here runs where users train: on a CUDA device, in bf16 autocast where the check allows it, DeepSpeed over
NCCL. On a machine without CUDA they are collected and skipped, so `make gpu-check` there still proves they import.
Deterministic algorithms are switched on (cuBLAS workspace config set before CUDA starts), so that two runs that
should agree can be compared at fp32 rounding, not at the noise of atomics.
"""

import os

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest  # noqa: E402
import torch  # noqa: E402
from peft import LoraConfig, PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from .helpers import assert_dicts_close, diff, make_trainer, max_abs, snapshot  # noqa: E402
from .test_algorithm import SGD, lora, train_step0  # noqa: E402
from .test_distributed import launch  # noqa: E402
from .test_persistence import completion_logps  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make gpu-check)"),
]
CUDA = {"use_cpu": False}
# bf16 keeps 8 significant bits: unit roundoff u = 2^-8 ≈ 3.9e-3. A gradient of the tiny model passes through about
# ten rounded matrix products (forward and backward of 2 layers and the head); relative errors of √10·u ≈ 1.2% are
# typical, so 5% (13u) bounds them. A wrong formula (λ or β misapplied, a missing term) is off by ≥ 20%.
BF16_RTOL = 0.05


@pytest.fixture(autouse=True)
def deterministic():
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(False)


def relative_error(got: dict, expected: dict) -> float:
    num = sum((got[k].double() - expected[k].double()).pow(2).sum() for k in expected)
    den = sum(expected[k].double().pow(2).sum() for k in expected)
    return (num / den).sqrt().item()


def test_step0_identity_under_bf16_autocast(tmp_path, make_model, tokenizer, rl_dataset, sft_dataset):
    """Δθ − λΔθ̂ = −α(1−λ)∇_θ L_SFT and Δw = −β(1−λ)∇_w L_SFT at step 0 (DESIGN.md §1), on the GPU in bf16
    autocast, against the gradients computed in float64 on the CPU."""
    alpha, beta, lam = 0.2, 0.07, 0.3
    trainer = make_trainer(tmp_path, make_model(), tokenizer, rl_dataset, sft_dataset, peft_config=lora(),
                           learning_rate=alpha, adapter_learning_rate=beta, bridge_lambda=lam, bf16=True,
                           per_device_sft_batch_size=len(sft_dataset), **SGD, **CUDA)  # fmt: skip
    assert trainer.accelerator.device.type == "cuda"
    step = train_step0(trainer, make_model, tokenizer, sft_dataset, alpha, beta, lam)
    err_theta = relative_error(step["theta_combination"], step["theta_expected"])
    err_w = relative_error(step["w_step"], step["w_expected"])
    assert err_theta < BF16_RTOL and err_w < BF16_RTOL, (err_theta, err_w)
    # The same formula with λ mistaken for 0.5 misses by far more than the bf16 bound: the check can fail.
    d_theta, d_shadow = step["theta_step"], step["shadow_step"]
    wrong = {k: d_theta[k] - 0.5 * d_shadow[k] for k in d_theta}
    assert relative_error(wrong, {k: -alpha * 0.5 * step["g_theta"][k] for k in d_theta}) > 4 * BF16_RTOL


def test_bridge_with_beta_zero_equals_mix(tmp_path, make_model, tokenizer, rl_dataset, sft_dataset):
    """w frozen (β = 0, B = 0) makes π(θ, w) = π(θ): θ after 2 steps is mix's, on the GPU in float32.

    Not under bf16 autocast: PEFT adds the LoRA branch's float32 zeros to the layer's bf16 output, which promotes
    it to float32, so the adapted model rounds differently from the bare one; measured on an H200 (2026-12-04),
    θ then differed from mix's by up to 0.028 after 2 steps, the rollouts having diverged at the first one."""
    common = dict(max_steps=2, learning_rate=1e-2, **CUDA)
    zero_b = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")  # B = 0 at start
    bridge = make_trainer(tmp_path / "b", make_model(), tokenizer, rl_dataset, sft_dataset, peft_config=zero_b,
                          adapter_learning_rate=0.0, **common)  # fmt: skip
    bridge.train()
    mix = make_trainer(
        tmp_path / "m", make_model(), tokenizer, rl_dataset, sft_dataset, method="mix", **common
    )
    mix.train()
    theta_b, theta_m = bridge.get_base_state_dict(), mix.get_base_state_dict()
    assert max_abs(diff(theta_m, make_model().state_dict())) > 1e-4  # θ moved
    assert_dicts_close(theta_b, theta_m, atol=1e-6, rtol=0)
    assert all((v == 0).all() for k, v in bridge.get_adapter_state_dict().items() if "lora_B" in k)


def test_resume_is_exact(tmp_path, make_model, tokenizer, rl_dataset, sft_dataset):
    kw = dict(max_steps=4, save_strategy="steps", save_steps=2, optim="adamw_torch", learning_rate=1e-2,
              peft_config=lora(), bf16=True, **CUDA)  # fmt: skip
    full = make_trainer(tmp_path / "full", make_model(), tokenizer, rl_dataset, sft_dataset, **kw)
    full.train()
    resumed = make_trainer(tmp_path / "resumed", make_model(seed=7), tokenizer, rl_dataset, sft_dataset, **kw)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "out" / "checkpoint-2"))
    for a, b in zip(snapshot(full), snapshot(resumed), strict=True):
        assert_dicts_close(a, b, atol=1e-6, rtol=0)
    late = [v for t in (full, resumed) for h in t.state.log_history if "bridge/sft_loss" in h and h["step"] > 2
            for v in (h["bridge/sft_loss"], h["reward"])]  # fmt: skip
    assert len(late) == 8 and late[:4] == pytest.approx(late[4:], abs=1e-6)


def test_cpu_offloaded_shadow_is_pinned_and_gives_the_same_shadow(
    tmp_path, make_model, tokenizer, rl_dataset, sft_dataset
):
    states = []
    for offload in ("none", "cpu"):
        trainer = make_trainer(tmp_path / offload, make_model(), tokenizer, rl_dataset, sft_dataset, peft_config=lora(),
                               max_steps=2, learning_rate=1e-2, shadow_offload=offload, **CUDA)  # fmt: skip
        trainer.train()
        on = {p.device.type for p in trainer.shadow.params}
        assert on == ({"cpu"} if offload == "cpu" else {"cuda"}), on
        if offload == "cpu":
            assert all(p.is_pinned() for p in trainer.shadow.params)
        states.append(snapshot(trainer))
    # AdamW stepped on the CPU against on the GPU: the same arithmetic up to fp32 rounding (measured on an H200:
    # at most 1.5e-6 after 2 steps at lr 1e-2; a step at the wrong point or rate would move θ̂ by ~1e-2).
    for a, b in zip(*states, strict=True):
        assert_dicts_close(a, b, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_changes_nothing(tmp_path, make_model, tokenizer, rl_dataset, sft_dataset):
    states = []
    for checkpointing in (False, True):
        trainer = make_trainer(tmp_path / str(checkpointing), make_model(), tokenizer, rl_dataset, sft_dataset,
                               peft_config=lora(), max_steps=2, learning_rate=1e-2, gradient_checkpointing=checkpointing,
                               gradient_checkpointing_kwargs={"use_reentrant": False}, **CUDA)  # fmt: skip
        trainer.train()
        states.append(snapshot(trainer))
    for a, b in zip(*states, strict=True):
        assert_dicts_close(a, b, atol=1e-6, rtol=1e-5)


def test_merged_policy_saves_and_reloads(tmp_path, make_model, tokenizer, rl_dataset, sft_dataset):
    trainer = make_trainer(tmp_path, make_model(), tokenizer, rl_dataset, sft_dataset, peft_config=lora(),
                           max_steps=2, save_merged=True, bf16=True, **CUDA)  # fmt: skip
    trainer.train()
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    trainer.model.eval()
    trained = completion_logps(trainer.model.cpu().float(), tokenizer)
    merged = completion_logps(AutoModelForCausalLM.from_pretrained(out / "merged"), tokenizer)
    torch.testing.assert_close(merged, trained, atol=1e-4, rtol=0)
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out), out / "adapter")
    torch.testing.assert_close(completion_logps(policy, tokenizer), trained, atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def plain_gpu_run(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("plain"), "python", cuda=True)


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_on_one_gpu_matches_plain(tmp_path, stage, plain_gpu_run):
    """ZeRO-2 and ZeRO-3 in one process over NCCL give the θ, θ̂, w of a plain GPU run (2 steps, same rollouts)."""
    zero = launch(tmp_path, stage, num_processes=1, cuda=True)
    for a, b in zip(plain_gpu_run[0], zero[0], strict=True):
        assert_dicts_close(a, b, atol=1e-5, rtol=1e-5)
    theta, shadow = zero[0][0], zero[0][1]
    assert max((theta[k] - shadow[k]).abs().max() for k in theta) > 1e-4  # θ̂ took its own path
    losses = [[h["bridge/sft_loss"] for h in run[1]] for run in (plain_gpu_run, zero)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
