"""`shadow_rollouts="own"` (θ̂ samples its own rollouts) and the cooperative-gain meter (`bridge_trl.gain`)."""

import itertools
import zlib

import pytest
import torch

from bridge_trl import BridgeConfig, BridgeTrainer
from bridge_trl.gain import gain_terms, reward_advantages

from .conftest import toy_reward
from .helpers import GRPO_DEFAULTS, assert_dicts_close, snapshot
from .test_algorithm import SGD, lora


def same_rollouts(prompts, trainer):
    """Completions that depend only on (prompt, occurrence, step): θ's and θ̂'s generations coincide."""
    tokenizer, seen, completions = trainer.processing_class, {}, []
    for prompt in prompts:
        j = seen[prompt] = seen.get(prompt, -1) + 1
        g = torch.Generator().manual_seed(zlib.crc32(f"{prompt}|{j}|{trainer.state.global_step}".encode()))
        completions.append(torch.randint(32, 127, (6,), generator=g).tolist())
    return {"prompt_ids": [tokenizer(p)["input_ids"] for p in prompts], "completion_ids": completions,
            "logprobs": [[0.0] * 6] * len(prompts)}  # fmt: skip


def run(
    tmp_path, make_model, tokenizer, rl_dataset, sft_dataset, name, steps=1, rollout_func=None, **overrides
):
    args = BridgeConfig(**{"output_dir": str(tmp_path / name), **GRPO_DEFAULTS, **SGD, "max_steps": steps,
                           **overrides})  # fmt: skip
    trainer = BridgeTrainer(make_model(), toy_reward, args=args, train_dataset=rl_dataset, sft_dataset=sft_dataset,
                            processing_class=tokenizer, peft_config=lora(),
                            rollout_func=rollout_func)  # fmt: skip
    calls = []
    generate = trainer._generate_and_score_completions
    trainer._generate_and_score_completions = lambda batch: calls.append(1) or generate(batch)
    trainer.train()
    return trainer, len(calls)


def test_own_rollouts_equal_shared_when_the_samples_coincide(tmp_path, make_model, tokenizer, rl_dataset,
                                                             sft_dataset):  # fmt: skip
    """With identical samples, 'own' (θ̂ generates, scores, and takes its own old log-probs: on policy, no ratio) is
    'shared' without θ̂'s ratio exactly. With the ratio (the default), 'shared' reweights the samples to π(θ̂, w) as
    though they came from π(θ, w), so at step 2 (θ̂ ≠ θ) it moves θ̂ elsewhere; θ is the same either way."""
    common = (tmp_path, make_model, tokenizer, rl_dataset, sft_dataset)
    shared, shared_calls = run(*common, "shared", steps=2)
    own, own_calls = run(*common, "own", steps=2, shadow_rollouts="own")
    assert (shared_calls, own_calls) == (2, 4)  # one generation per step, two with 'own'
    del shared, own
    shared, _ = run(
        *common, "shared_det", steps=2, rollout_func=same_rollouts, shadow_importance_sampling="none"
    )
    own, _ = run(*common, "own_det", steps=2, shadow_rollouts="own", rollout_func=same_rollouts)
    for a, b in zip(snapshot(shared), snapshot(own), strict=True):
        assert_dicts_close(a, b, atol=1e-6, rtol=1e-5)
    fast = dict(steps=2, rollout_func=same_rollouts, learning_rate=0.2)  # θ̂ drifts from θ at step 1
    weighted, _ = run(*common, "shared_is", **fast)
    own, _ = run(*common, "own_fast", shadow_rollouts="own", **fast)
    (theta_w, shadow_w, _), (theta_o, shadow_o, _) = snapshot(weighted), snapshot(own)
    assert_dicts_close(theta_w, theta_o, atol=1e-6, rtol=1e-5)
    assert max((shadow_w[k] - shadow_o[k]).abs().max() for k in shadow_w) > 1e-5
    logs = [h for h in own.state.log_history if "bridge/shadow_reward" in h]
    assert len(logs) == 2
    for h in logs:  # both policies were scored on the same samples
        assert h["bridge/shadow_reward"] == pytest.approx(h["reward"])
        assert h["bridge/cooperative_gain"] == pytest.approx(0.0, abs=1e-7)


def test_own_rollouts_train_the_shadow_on_its_own_samples(tmp_path, make_model, tokenizer, rl_dataset,
                                                          sft_dataset):  # fmt: skip
    """Sampled rollouts: θ's update is unchanged (its rollouts come first), θ̂'s differs, the gain is a reward gap."""
    common = (tmp_path, make_model, tokenizer, rl_dataset, sft_dataset)
    shared, _ = run(*common, "shared")
    own, _ = run(*common, "own", shadow_rollouts="own")
    (theta_s, shadow_s, _), (theta_o, shadow_o, _) = snapshot(shared), snapshot(own)
    assert_dicts_close(theta_s, theta_o, atol=0, rtol=0)
    assert max((shadow_s[k] - shadow_o[k]).abs().max() for k in shadow_s) > 1e-6
    h = next(h for h in own.state.log_history if "bridge/shadow_reward" in h)
    assert h["bridge/cooperative_gain"] == pytest.approx(h["reward"] - h["bridge/shadow_reward"])
    assert len(own._logs["prompt"]) == 8  # the shadow's completions stay out of the completions table
    assert shared.gain.logps == {} and own.gain.logps == {}  # nothing captured is left behind


def tiny_policy(seed: int) -> torch.Tensor:
    """An autoregressive policy over V = 3 tokens, length 2: log p(y1) and log p(y2 | y1), as (V + 1, V) rows."""
    return torch.log_softmax(
        torch.randn(4, 3, generator=torch.Generator().manual_seed(seed)).double() * 1.5, -1
    )


def sequence_logps(policy: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """(N, 2) per-token log-probs of sequences ys (N, 2)."""
    return torch.stack([policy[0, ys[:, 0]], policy[1 + ys[:, 0], ys[:, 1]]], dim=1)


def test_gain_is_exact_j_difference_in_expectation():
    """Exact enumeration on a tiny vocabulary: E over every group of G = 3 completions from π(θ) of the meter's
    estimate equals J(θ) − J(θ̂) = Σ_y (π_θ(y) − π_θ̂(y)) R(y), in reward units."""
    theta, shadow = tiny_policy(0), tiny_policy(1)
    seqs = torch.tensor(list(itertools.product(range(3), repeat=2)))  # all 9 sequences
    reward = torch.tensor([3.0, -1.0, 0.5, 2.0, 0.0, 7.0, -2.0, 1.0, 4.0], dtype=torch.float64)
    p_theta, p_shadow = sequence_logps(theta, seqs).sum(1).exp(), sequence_logps(shadow, seqs).sum(1).exp()
    exact = ((p_theta - p_shadow) * reward).sum().item()

    group = 3
    groups = torch.tensor(list(itertools.product(range(9), repeat=group)))  # all 729 groups, (729, G)
    weight = p_theta[groups].prod(dim=1)  # probability of each group under π(θ)
    ys = seqs[groups.view(-1)]
    advantages = reward_advantages(reward[groups.view(-1)], group)
    terms = gain_terms(
        sequence_logps(theta, ys), sequence_logps(shadow, ys), torch.ones(len(ys), 2), advantages
    )
    expectation = (weight * terms.view(-1, group).mean(dim=1)).sum().item()
    assert abs(exact) > 0.1
    assert expectation == pytest.approx(exact, rel=1e-9, abs=1e-12)


def test_trainer_batches_carry_raw_reward_advantages(
    tmp_path, make_model, tokenizer, rl_dataset, sft_dataset
):
    """`reward_advantages` are the rewards (toy_reward of the decoded completions) minus the other completions'
    mean, in reward units; GRPO's `advantages` are those divided by the group's std, up to (G−1)/G."""
    args = BridgeConfig(**{"output_dir": str(tmp_path / "o"), **GRPO_DEFAULTS, **SGD})
    trainer = BridgeTrainer(make_model(), toy_reward, args=args, train_dataset=rl_dataset, sft_dataset=sft_dataset,
                            processing_class=tokenizer, peft_config=lora())  # fmt: skip
    seen = []
    generate = trainer._generate_and_score_completions
    trainer._generate_and_score_completions = lambda batch: seen.append(generate(batch)) or seen[-1]
    trainer.train()
    out = seen[0]
    rows = zip(out["completion_ids"], out["completion_mask"].bool(), strict=True)
    texts = [tokenizer.decode(ids[mask], skip_special_tokens=True) for ids, mask in rows]
    rewards = torch.tensor(toy_reward(texts), dtype=torch.float64).view(-1, 4)
    others = (rewards.sum(1, keepdim=True) - rewards) / 3
    torch.testing.assert_close(
        out["reward_advantages"].double(), (rewards - others).view(-1), atol=1e-6, rtol=0
    )
