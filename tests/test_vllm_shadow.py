"""θ̂ with the real vLLM engine (`make test-vllm`): its own rollouts, and its importance-sampling ratio.

Each run trains BridgeTrainer for 2 SGD steps with vLLM colocated (float32 engine, `tests/vllm_cpu.py`). At step 2
θ̂ ≠ θ (θ also took the SFT gradient), so π(θ̂, w) and π(θ, w) are told apart. The reference for every check is a
plain HF model loaded with θ + (α/r)·B·A or θ̂ + (α/r)·B·A, computed from the trainer's public accessors.
"""

import math

import pytest
import torch

from .helpers import make_trainer
from .test_vllm import SCALING, lora_config
from .vllm_cpu import (
    PROBE_TEXTS,
    StateSnapshots,
    SyncRecorder,
    hf_policy,
    hf_token_logprobs,
    logprob_tolerance,
    max_logprob_gap,
    merged_state_dict,
    requires_vllm,
    rl_and_sft_datasets,
    save_tiny_model,
    setup_process,
    vllm_trainer_kwargs,
)

pytestmark = [pytest.mark.vllm, requires_vllm]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    setup_process()
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


def run_bridge(root, path, tokenizer, generations=None, **overrides):
    """2 steps; returns the trainer, its sync records, its state snapshots and every batch the losses saw. With a
    list `generations`, every generated batch is appended to it, in generation order."""
    rl, sft = rl_and_sft_datasets()
    trainer = make_trainer(root, path, tokenizer, rl, sft, peft_config=lora_config(), max_steps=2, optim="sgd",
                           learning_rate=0.05, **vllm_trainer_kwargs(), **overrides)  # fmt: skip
    if generations is not None:
        generate = trainer._generate_and_score_completions
        trainer._generate_and_score_completions = lambda b: generations.append(generate(b)) or generations[-1]
    probes = [tokenizer(t)["input_ids"] for t in PROBE_TEXTS]
    syncs, states = SyncRecorder(trainer, probes), StateSnapshots(trainer)
    batches, compute_loss = [], trainer._compute_loss

    def recording(model, inputs):
        loss = compute_loss(model, inputs)  # after it: θ̂'s ratio is written into its inputs by its forward
        batches.append((trainer.state.global_step, trainer.shadow.active, dict(inputs)))
        return loss

    trainer._compute_loss = recording
    trainer.train()
    return trainer, probes, syncs.records, states, batches


def rows(inputs):
    """(prompt tokens, completion tokens, completion mask) of each row, padding removed."""
    for row in range(len(inputs["prompt_ids"])):
        prompt = inputs["prompt_ids"][row][inputs["prompt_mask"][row].bool()].tolist()
        mask = inputs["completion_mask"][row].bool()
        yield prompt, inputs["completion_ids"][row][mask].tolist(), mask


def completion_logprobs(model, inputs) -> torch.Tensor:
    """(B, T) log-probs of the batch's completion tokens under `model`, 0 on padding (float64)."""
    out = torch.zeros(inputs["completion_ids"].shape, dtype=torch.float64)
    for row, (prompt, completion, mask) in enumerate(rows(inputs)):
        out[row, mask] = hf_token_logprobs(model, prompt, completion)
    return out


def test_own_rollouts_come_from_each_policy_in_turn(tmp_path, tiny_path, tokenizer):
    """`shadow_rollouts: own`: each step syncs π(θᵏ, wᵏ) for the joint generation, then π(θ̂ᵏ, wᵏ) for θ̂'s, and
    the next step's joint generation is from π(θᵏ⁺¹, wᵏ⁺¹) again. Checked on what vLLM holds after each sync and on
    the log-probs vLLM reported for the tokens it sampled."""
    trainer, probes, syncs, states, batches = run_bridge(
        tmp_path, tiny_path, tokenizer, shadow_rollouts="own"
    )
    tol = logprob_tolerance()
    assert [(r["step"], r["shadow"]) for r in syncs] == [(0, False), (0, True), (1, False), (1, True)]

    def policy(k, which):
        state = states.steps[k]
        return hf_policy(tiny_path, merged_state_dict(state[which], state["w"], SCALING))

    for record in syncs:
        k, which = record["step"], "shadow" if record["shadow"] else "theta"
        other = "theta" if record["shadow"] else "shadow"
        held = record["logps"]
        assert max_logprob_gap(held, [hf_token_logprobs(policy(k, which), p) for p in probes]) < tol
        if k == 1:  # θ̂¹ ≠ θ¹: the other policy is rejected
            assert max_logprob_gap(held, [hf_token_logprobs(policy(k, other), p) for p in probes]) > 0.1
    assert [(k, shadow) for k, shadow, _ in batches] == [(0, False), (0, True), (1, False), (1, True)]
    for k, shadow, inputs in batches:
        model = policy(k, "shadow" if shadow else "theta")
        mask = inputs["completion_mask"].bool()
        expected = completion_logprobs(model, inputs)
        torch.testing.assert_close(
            inputs["sampling_per_token_logps"].double()[mask], expected[mask], atol=tol, rtol=0
        )
    # θ̂ generated its own completions: the shadow's batch is not the joint one.
    joint, shadow = batches[2][2], batches[3][2]
    assert not torch.equal(joint["completion_ids"], shadow["completion_ids"])
    logs = [h for h in trainer.state.log_history if "bridge/shadow_reward" in h]
    assert len(logs) == 2 and all(math.isfinite(h["bridge/shadow_rl_loss"]) for h in logs)


@pytest.mark.parametrize("mode", ["token_truncate", "sequence_mask"])
def test_shadow_ratio_uses_vllm_sampling_logprobs(tmp_path, tiny_path, tokenizer, mode):
    """Shared rollouts, correction on: θ̂'s ratio is π(θ̂, w)/μ with μ the log-probs vLLM reported while sampling
    (which are π(θ, w)'s), per token (token_truncate) or per sequence (sequence_mask), truncated at C_max = 1 in
    both (`shadow_importance_sampling='truncate'` truncates whatever TRL's mode does to θ's ratio) so that the bound
    is active on some tokens or sequences and not on others; finite everywhere."""
    trainer, _, syncs, states, batches = run_bridge(
        tmp_path, tiny_path, tokenizer, vllm_importance_sampling_correction=True,
        vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_max=1.0,
    )  # fmt: skip
    tol = logprob_tolerance()
    assert [(r["step"], r["shadow"]) for r in syncs] == [
        (0, False),
        (1, False),
    ]  # shared: one generation a step
    (_, _, joint), (_, _, shadow) = [(k, s, i) for k, s, i in batches if k == 1]
    state = states.steps[1]
    mu = joint["sampling_per_token_logps"].double()
    mask = joint["completion_mask"].double()
    assert torch.isfinite(mu[mask.bool()]).all()
    # μ is vLLM's own: it equals π(θ¹, w¹) on the sampled tokens, to the engine's float32 agreement.
    theta_policy = hf_policy(tiny_path, merged_state_dict(state["theta"], state["w"], SCALING))
    torch.testing.assert_close(mu * mask, completion_logprobs(theta_policy, joint), atol=tol, rtol=0)

    shadow_policy = hf_policy(tiny_path, merged_state_dict(state["shadow"], state["w"], SCALING))
    diff = (completion_logprobs(shadow_policy, shadow) - mu) * mask
    if mode == "token_truncate":
        raw = torch.exp(diff)
        expected = torch.clamp(raw, max=1.0)
        ratio = shadow["importance_sampling_ratio"].double()
        on = mask.bool()
    else:
        raw = torch.exp(diff.sum(-1, keepdim=True))
        expected = torch.clamp(raw, max=1.0)
        ratio = shadow["importance_sampling_ratio"].double()
        on = torch.ones_like(raw, dtype=torch.bool)
    assert torch.isfinite(ratio).all()
    # The bound is active on some entries and not on others, away from the boundary (so that a 1e-5 change in
    # log-probs cannot flip an entry across it).
    assert ((raw > 1.0 + 1e-3) & on).any() and ((raw < 1.0 - 1e-3) & on).any()
    torch.testing.assert_close(ratio[on], expected[on], atol=1e-4, rtol=1e-4)
    # ... and it is not the joint pass's ratio π(θ, w)/μ, which is ≈ 1 everywhere with a float32 engine.
    joint_diff = (completion_logprobs(theta_policy, joint) - mu) * mask
    joint_raw = torch.exp(joint_diff if mode.startswith("token") else joint_diff.sum(-1, keepdim=True))
    assert (joint_raw[on] - 1).abs().max() < 1e-4 and (raw[on] - joint_raw[on]).abs().max() > 1e-2
    assert all(
        math.isfinite(h["bridge/shadow_rl_loss"])
        for h in trainer.state.log_history
        if "bridge/shadow_rl_loss" in h
    )


def replay(generations):
    """A `rollout_func` that returns, call by call, the completions (and log-probs) another run generated."""
    calls = iter(generations)

    def rollout_func(prompts, trainer):
        out = next(calls)
        prompt_ids, completion_ids, logprobs = [], [], []
        for row, (prompt, completion, mask) in enumerate(rows(out)):
            prompt_ids.append(prompt)
            completion_ids.append(completion)
            logprobs.append(out["sampling_per_token_logps"][row][mask].tolist())
        assert [trainer.processing_class.decode(p) for p in prompt_ids] == list(prompts)  # the same prompts
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": logprobs}

    return rollout_func


def test_hf_and_vllm_take_the_same_shadow_step(tmp_path, tiny_path, tokenizer):
    """One rule on both backends: 2 steps with vLLM (correction on, per-token ratios truncated at C = 1), and 2
    steps with HF generation replaying vLLM's completions, end at the same θ̂ (and θ, w), to the engine's float32
    agreement. θ̂'s ratio is π(θ̂, w)/μ on both, μ being vLLM's reported log-probs there and the joint pass's
    π(θ, w) here. The old HF rule (no ratio, `shadow_importance_sampling='none'`) ends ≥ 10× farther away."""
    settings = dict(vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_max=1.0)
    generations = []
    vllm_run, *_ = run_bridge(tmp_path / "vllm", tiny_path, tokenizer, generations=generations, **settings)
    assert len(generations) == 2  # shared rollouts: one generation per step
    rl, sft = rl_and_sft_datasets()
    gaps = {}
    for rule in ("truncate", "none"):
        hf = make_trainer(tmp_path / rule, tiny_path, tokenizer, rl, sft, peft_config=lora_config(), max_steps=2,
                          optim="sgd", learning_rate=0.05, use_cpu=not torch.cuda.is_available(),
                          shadow_importance_sampling=rule, **settings)  # fmt: skip
        hf.rollout_func = replay(generations)
        hf.train()
        gaps[rule] = [
            max((a[k].double() - b[k].double()).abs().max().item() for k in a)
            for a, b in zip(
                (hf.get_base_state_dict(), hf.get_shadow_state_dict(), hf.get_adapter_state_dict()),
                (
                    vllm_run.get_base_state_dict(),
                    vllm_run.get_shadow_state_dict(),
                    vllm_run.get_adapter_state_dict(),
                ),
                strict=True,
            )
        ]
    tol = 10 * logprob_tolerance() * 0.05  # lr · (gradient change from a log-prob error of the engine's size)
    assert max(gaps["truncate"]) < tol, gaps
    assert gaps["none"][1] > 10 * max(gaps["truncate"][1], tol / 10), gaps
