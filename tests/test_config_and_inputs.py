"""λ schedules, SFT data formats, and the clear errors on bad input."""

import math
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset

from bridge_trl import BridgeConfig
from bridge_trl.zero import check_backend

from .helpers import make_config, make_trainer


def test_constant_schedule(tmp_path):
    cfg = make_config(tmp_path, bridge_lambda=0.3)
    assert [cfg.lambda_at(k, 10) for k in (0, 5, 9)] == [0.3, 0.3, 0.3]


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_annealed_schedules(tmp_path, schedule):
    cfg = make_config(
        tmp_path, lambda_schedule=schedule, lambda_start=0.1, bridge_lambda=0.5, lambda_warmup_ratio=0.4
    )
    # 10 steps, ramp over ceil(0.4 * 10) = 4 steps, then flat at the final value.
    shape = (lambda t: t) if schedule == "linear" else (lambda t: (1 - math.cos(math.pi * t)) / 2)
    expected = [0.1 + 0.4 * shape(min(1.0, k / 4)) for k in range(10)]
    assert [cfg.lambda_at(k, 10) for k in range(10)] == pytest.approx(expected)
    assert cfg.lambda_at(0, 10) == pytest.approx(0.1)
    assert cfg.lambda_at(2, 10) == pytest.approx(0.3)  # halfway, for both shapes
    assert cfg.lambda_at(4, 10) == cfg.lambda_at(9, 10) == pytest.approx(0.5)


def test_logged_lambda_follows_schedule(tmp_path, make_model, tokenizer, rl_dataset, sft_dataset):
    trainer = make_trainer(tmp_path, make_model(), tokenizer, rl_dataset, sft_dataset, max_steps=3,
                           lambda_schedule="linear", lambda_start=0.0, bridge_lambda=0.6)  # fmt: skip
    trainer.train()
    logged = [h["bridge/lambda"] for h in trainer.state.log_history if "bridge/lambda" in h]
    assert logged == pytest.approx([0.0, 0.2, 0.4])
    gains = [
        h["bridge/cooperative_gain"] for h in trainer.state.log_history if "bridge/cooperative_gain" in h
    ]
    assert gains[0] == 0.0  # θ̂⁰ = θ⁰: the two policies agree on every token
    assert all(math.isfinite(g) for g in gains) and any(g != 0.0 for g in gains[1:])


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("bridge_lambda", 1.5, "bridge_lambda"),
        ("bridge_lambda", -0.1, "bridge_lambda"),
        ("lambda_start", 2.0, "lambda_start"),
        ("lambda_schedule", "exponential", "lambda_schedule"),
        ("lambda_warmup_ratio", 0.0, "lambda_warmup_ratio"),
        ("per_device_sft_batch_size", 0, "per_device_sft_batch_size"),
        ("shadow_rollouts", "mine", "shadow_rollouts"),
    ],
)
def test_bad_config_values(tmp_path, field, value, match):
    with pytest.raises(ValueError, match=match):
        BridgeConfig(output_dir=str(tmp_path), use_cpu=True, **{field: value})


def test_defaults(tmp_path):
    cfg = BridgeConfig(output_dir=str(tmp_path), use_cpu=True, learning_rate=3e-6, per_device_train_batch_size=8,
                       num_generations=4)  # fmt: skip
    assert cfg.adapter_learning_rate == 3e-6  # β defaults to α
    assert cfg.bridge_lambda == 0.5 and cfg.lambda_schedule == "constant"
    assert cfg.per_device_sft_batch_size == 2  # one trace per RL prompt


@pytest.mark.parametrize(
    ("data", "exc", "match"),
    [
        (None, ValueError, "`sft_dataset` is required"),
        (Dataset.from_dict({"prompt": [], "completion": []}), ValueError, "empty"),
        (
            Dataset.from_dict({"prompt": ["a"], "trace": ["b"]}),
            ValueError,
            r"no `completion` column.*\['prompt', 'trace'\]",
        ),
        (
            Dataset.from_dict({"prompt": ["a", "b", "c"], "completion": ["x", " ", "z"]}),
            ValueError,
            "Row 1 .*empty completion",
        ),
        (
            Dataset.from_dict({"messages": [[{"role": "user", "content": "hi"}]]}),
            ValueError,
            "Row 0 .*assistant",
        ),
    ],
)
def test_bad_sft_dataset(tmp_path, make_model, tokenizer, rl_dataset, data, exc, match):
    with pytest.raises(exc, match=match):
        make_trainer(tmp_path, make_model(), tokenizer, rl_dataset, data)


def test_iterable_sft_dataset_is_rejected(tmp_path, make_model, tokenizer, rl_dataset, sft_dataset):
    with pytest.raises(TypeError, match="map-style"):
        make_trainer(tmp_path, make_model(), tokenizer, rl_dataset, sft_dataset.to_iterable_dataset())


def test_conversational_sft_prompts_render_like_rl_prompts(tmp_path, make_model, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+3="}]
    rl = Dataset.from_dict({"prompt": [messages] * 8, "answer": ["5"] * 8})
    sft_pc = Dataset.from_dict(
        {"prompt": [messages], "completion": [[{"role": "assistant", "content": "\\boxed{5}"}]]}
    )
    sft_msgs = Dataset.from_dict({"messages": [[*messages, {"role": "assistant", "content": "\\boxed{5}"}]]})
    rows = []
    for i, data in enumerate((sft_pc, sft_msgs)):
        trainer = make_trainer(tmp_path / str(i), make_model(), tokenizer, rl, data)
        rows.append(trainer.sft_dataset[0])
    rl_prompt_ids = trainer._tokenize_prompts([messages])[0][0]
    assert rows[0] == rows[1]
    assert rows[0]["prompt_ids"] == list(rl_prompt_ids)
    # The completion is the assistant turn up to its end-of-turn token, which stops generation.
    assert tokenizer.decode(rows[0]["completion_ids"]) == "\\boxed{5}<|im_end|>"
    assert rows[0]["completion_ids"][-1] in trainer.eos_token_ids


def test_plain_sft_completion_gets_eos_and_truncation(tmp_path, make_model, tokenizer, rl_dataset):
    data = Dataset.from_dict({"prompt": ["1+1="], "completion": ["2. \\boxed{2}"]})
    trainer = make_trainer(tmp_path, make_model(), tokenizer, rl_dataset, data)
    row = trainer.sft_dataset[0]
    assert row["prompt_ids"] == tokenizer("1+1=")["input_ids"]
    assert row["completion_ids"] == tokenizer("2. \\boxed{2}", add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id
    ]
    short = make_trainer(tmp_path / "t", make_model(), tokenizer, rl_dataset, data, max_sft_length=7)
    assert short.sft_dataset[0]["completion_ids"] == row["completion_ids"][:3]


@pytest.mark.parametrize(
    ("method", "stage", "config", "checkpointing", "match"),
    [
        (
            "bridge",
            2,
            {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}},
            None,
            "offload_optimizer",
        ),
        (
            "bridge",
            3,
            {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}},
            None,
            "offload_optimizer",
        ),
        ("bridge", 3, {"zero_optimization": {"offload_param": {"device": "nvme"}}}, None, "NVMe"),
        ("bridge", 3, {"optimizer": {"type": "AdamW"}}, None, "'optimizer' block"),
        ("bridge", 2, {}, {"use_reentrant": True}, "use_reentrant"),
        ("alternating", 3, {}, None, "alternating"),
    ],
)
def test_unsupported_deepspeed_setups_are_refused(method, stage, config, checkpointing, match):
    plugin = SimpleNamespace(zero_stage=stage, deepspeed_config=config)
    accelerator = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin))
    args = SimpleNamespace(
        gradient_checkpointing=checkpointing is not None, gradient_checkpointing_kwargs=checkpointing
    )
    with pytest.raises((NotImplementedError, ValueError), match=match):
        check_backend(method, accelerator, deepspeed=True, fsdp=False, args=args)
    check_backend(
        "mix", accelerator, deepspeed=True, fsdp=False, args=args
    )  # baselines but alternating: anywhere
    plugin.deepspeed_config = {"zero_optimization": {"offload_optimizer": {"device": "none"}}}
    args.gradient_checkpointing_kwargs = {"use_reentrant": False}
    check_backend("bridge", accelerator, deepspeed=True, fsdp=False, args=args)  # ZeRO-1/2/3 without those
    if stage == 3:  # the engine's own backward: reentrant checkpointing is fine (TRL forces it for PEFT)
        args.gradient_checkpointing_kwargs = {"use_reentrant": True}
        check_backend("bridge", accelerator, deepspeed=True, fsdp=False, args=args)


@pytest.mark.parametrize("method", ["bridge", "rl"])
def test_half_precision_weights_without_deepspeed_are_refused(tmp_path, make_model, tokenizer, rl_dataset,
                                                              sft_dataset, method):  # fmt: skip
    """No fp32 master outside DeepSpeed: bf16 weights would barely move at lr 5e-7; the error names the fix."""
    model = make_model().to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"float32.*bf16: true.*DeepSpeed"):
        make_trainer(tmp_path, model, tokenizer, rl_dataset, sft_dataset, method=method)


def test_bf16_update_rounds_away():
    """Why: an AdamW step of lr 5e-7 on bf16 weights of size ~0.02 changes almost none of them."""
    w = (torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    updated = (w.float() - 5e-7 * torch.sign(torch.randn(4096))).to(torch.bfloat16)
    assert (updated != w).float().mean() < 0.05
