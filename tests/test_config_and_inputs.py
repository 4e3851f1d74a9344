"""λ schedules, SFT data formats, and the clear errors on bad input."""

import math
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset

from bridge_trl import BridgeConfig, BridgeTrainer
from bridge_trl.shadow import split_parameters
from bridge_trl.zero import check_backend

from .conftest import toy_reward
from .helpers import diff, make_config, make_trainer, max_abs


def test_constant_schedule(tmp_path):
    cfg = make_config(tmp_path, bridge_lambda=0.3)
    assert [cfg.lambda_at(k, 10) for k in (0, 5, 9)] == [0.3, 0.3, 0.3]


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_annealed_schedules(tmp_path, schedule):
    cfg = make_config(
        tmp_path, lambda_schedule=schedule, lambda_start=0.1, bridge_lambda=0.5, lambda_warmup_ratio=0.4
    )
    # 10 steps, ramp over ceil(0.4 * 10) = 4 steps (0..3, the end value at the last of them), then flat.
    shape = (lambda t: t) if schedule == "linear" else (lambda t: (1 - math.cos(math.pi * t)) / 2)
    expected = [0.1 + 0.4 * shape(min(1.0, k / 3)) for k in range(10)]
    assert [cfg.lambda_at(k, 10) for k in range(10)] == pytest.approx(expected)
    assert cfg.lambda_at(0, 10) == pytest.approx(0.1)
    assert cfg.lambda_at(3, 10) == cfg.lambda_at(9, 10) == pytest.approx(0.5)


def test_logged_lambda_follows_schedule(tmp_path, make_model, tokenizer, rl_dataset, sft_dataset):
    trainer = make_trainer(tmp_path, make_model(), tokenizer, rl_dataset, sft_dataset, max_steps=3,
                           lambda_schedule="linear", lambda_start=0.0, bridge_lambda=0.6)  # fmt: skip
    trainer.train()
    logged = [h["bridge/lambda"] for h in trainer.state.log_history if "bridge/lambda" in h]
    assert logged == pytest.approx([0.0, 0.3, 0.6])  # the ramp ends at bridge_lambda on its last step
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
    if data is not None and "messages" in data.column_names:  # conversational SFT goes with conversational RL
        rl_dataset = Dataset.from_dict(
            {"prompt": [[{"role": "user", "content": p}] for p in rl_dataset["prompt"]]}
        )
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


# ---------------------------------------------------------------- issue 25: errors that name the real field and cause
def _build(tmp_path, model, tokenizer, rl, sft, reward=toy_reward, **overrides):
    """A BridgeTrainer as a user builds one: `peft_config` omitted unless given in `overrides`."""
    peft = {"peft_config": overrides.pop("peft_config")} if "peft_config" in overrides else {}
    return BridgeTrainer(model, reward, args=make_config(tmp_path, **overrides), train_dataset=rl, sft_dataset=sft,
                         processing_class=tokenizer, **peft)  # fmt: skip


def test_negative_learning_rate_names_learning_rate(tmp_path):
    with pytest.raises(ValueError, match=r"^`learning_rate` must be >= 0, got -0.001"):
        make_config(tmp_path, learning_rate=-1e-3)
    with pytest.raises(ValueError, match=r"^`sft_learning_rate` must be >= 0"):
        make_config(tmp_path, sft_learning_rate=-1e-3)


def test_rl_needs_no_sft_data_and_sft_no_reward(tmp_path, make_model, tokenizer, rl_dataset, sft_dataset):
    rl = _build(tmp_path / "rl", make_model(), tokenizer, rl_dataset, None, method="rl")
    rl.train()
    assert rl.sft_dataset is None and rl.consumed["rl_samples"] == 8 and rl.consumed["sft_samples"] == 0
    sft = _build(
        tmp_path / "sft", make_model(), tokenizer, rl_dataset, sft_dataset, reward=None, method="sft"
    )
    before = sft.get_base_state_dict()
    sft.train()
    assert sft.consumed["sft_samples"] == 2 and max_abs(diff(sft.get_base_state_dict(), before)) > 0
    with pytest.raises(
        ValueError, match=r"method='mix' trains on \(prompt, reasoning trace\) pairs as well as RL"
    ):
        _build(tmp_path / "mix", make_model(), tokenizer, rl_dataset, None, method="mix")
    with pytest.raises(
        ValueError, match="method='bridge' samples rollouts and scores them: pass `reward_funcs`"
    ):
        _build(tmp_path / "b", make_model(), tokenizer, rl_dataset, sft_dataset, reward=None)


def test_adapter_switches(tmp_path, make_model, tokenizer, rl_dataset, sft_dataset):
    """Omitted: the paper's LoRA for bridge, none for baselines; None: no adapter, which BRIDGE refuses."""
    assert split_parameters(_build(tmp_path / "r", make_model(), tokenizer, rl_dataset, sft_dataset, method="rl",
                                   peft_config=None).model)[1] == []  # fmt: skip
    assert split_parameters(_build(tmp_path / "m", make_model(), tokenizer, rl_dataset, sft_dataset,
                                   method="mix").model)[1] == []  # fmt: skip
    bridge = _build(tmp_path / "b", make_model(), tokenizer, rl_dataset, sft_dataset)
    assert (
        bridge.model.peft_config["default"].r == 16 and bridge.model.peft_config["default"].lora_alpha == 16
    )
    with pytest.raises(
        ValueError, match=r"method='bridge' needs a LoRA adapter w.*cooperative gain.*Eq\. 11"
    ):
        _build(tmp_path / "n", make_model(), tokenizer, rl_dataset, sft_dataset, peft_config=None)


def test_luffy_without_matching_traces_says_how_many(tmp_path, make_model, tokenizer, rl_dataset):
    other = Dataset.from_dict({"prompt": ["7*7=", "8*8="], "completion": ["49", "64"]})
    with pytest.raises(ValueError, match=r"0 of 32 RL prompts have an expert trace.*plain GRPO.*rendered"):
        _build(tmp_path, make_model(), tokenizer, rl_dataset, other, method="luffy", loss_type="dapo")
    some = Dataset.from_dict({"prompt": ["0+1=", "1+2=", "7*7="], "completion": ["1", "3", "49"]})
    with pytest.raises(ValueError, match=r"2 of 32 RL prompts .*below `luffy_min_trace_coverage`=0.5"):
        _build(tmp_path, make_model(), tokenizer, rl_dataset, some, method="luffy", loss_type="dapo",
               luffy_min_trace_coverage=0.5)  # fmt: skip
    trainer = _build(tmp_path, make_model(), tokenizer, rl_dataset, some, method="luffy", loss_type="dapo")
    assert len(trainer.luffy.traces) == 3  # 2 of 32 is enough when no coverage is asked for


def test_cold_start_that_never_switches_is_refused(tmp_path, make_model, tokenizer, rl_dataset, sft_dataset):
    with pytest.raises(
        ValueError, match=r"switches from SFT to GRPO at step 3, but the run has 3 .*never run RL"
    ):
        make_config(tmp_path, method="cold_start", max_steps=3, cold_start_sft_steps=3)
    with pytest.raises(ValueError, match=r"`cold_start_sft_ratio`=1.0"):
        make_config(tmp_path, method="cold_start", max_steps=3, cold_start_sft_ratio=1.0)
    # With epochs, the length is known once train() starts: refused there, before any step.
    trainer = _build(
        tmp_path,
        make_model(),
        tokenizer,
        rl_dataset,
        sft_dataset,
        method="cold_start",
        max_steps=-1,
        num_train_epochs=1,
        cold_start_sft_steps=4,
    )  # 32 prompts x 4 rollouts / 8 = 16 steps
    trainer.args.cold_start_sft_steps = 40
    with pytest.raises(ValueError, match="at step 40, but the run has 16 optimizer steps"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_string_rl_prompts_with_conversational_sft_are_refused(tmp_path, make_model, tokenizer, rl_dataset):
    chat = Dataset.from_dict(
        {"messages": [[{"role": "user", "content": "1+2="}, {"role": "assistant", "content": "3"}]]}
    )
    with pytest.raises(ValueError, match=r"RL prompts .* plain strings .* SFT examples .* message lists"):
        _build(tmp_path, make_model(), tokenizer, rl_dataset, chat)


def test_quick_start_config_runs_on_this_machine(tmp_path):
    """TRL defaults bf16 on wherever torch runs; unset, BridgeConfig turns it on only where a GPU supports it."""
    cfg = BridgeConfig(
        output_dir=str(tmp_path), learning_rate=5e-7, adapter_learning_rate=5e-7, bridge_lambda=0.5
    )
    assert cfg.bf16 == (torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    assert BridgeConfig(
        output_dir=str(tmp_path), use_cpu=True
    ).bf16  # TRL's own default when asked for the CPU


@pytest.mark.parametrize(
    ("value", "exc", "match"),
    [
        (
            math.inf,
            FloatingPointError,
            r"Reward function 'bad_reward' returned inf for row 0 .*prompt: '\d+\+\d+='",
        ),
        ("1.0", TypeError, r"Reward function 'bad_reward' returned '1.0' \(str\) for row 0"),
    ],
)
def test_bad_reward_stops_before_any_step(tmp_path, make_model, tokenizer, rl_dataset, sft_dataset, value, exc,
                                          match):  # fmt: skip
    def bad_reward(completions, **kwargs):
        return [value] + [0.5] * (len(completions) - 1)

    trainer = _build(
        tmp_path, make_model(), tokenizer, rl_dataset, sft_dataset, reward=bad_reward, method="rl"
    )
    before = trainer.get_base_state_dict()
    with pytest.raises(exc, match=match):
        trainer.train()
    assert trainer.state.global_step == 0 and max_abs(diff(trainer.get_base_state_dict(), before)) == 0
