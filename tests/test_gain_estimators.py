"""The cooperative-gain meter's three metrics (`bridge_trl.gain`) against exact enumeration on a tiny vocabulary.

A prompt's policies are autoregressive over V = 3 tokens, length 2 (9 sequences), θ̂'s logits θ's plus δ·noise;
rewards are 0/1. Enumerating every batch (one group of G completions per prompt, sampled from π(θ)) gives each
estimate's exact expectation, spread and range. Measured here (truth J(θ) − J(θ̂) = −0.0442, δ = 0.3, one prompt):
SNIS reads −0.0333 / −0.0379 / −0.0390 at N = 2 / 4 / 5 sequences (bias +0.0109 / +0.0063 / +0.0052, ≈ 0.025/N,
toward 0) with standard deviation 0.090 / 0.069 / 0.063, against the IS estimate's exact −0.0442 and 0.128 / 0.085
/ 0.075. At δ = 1 (θ̂ far from θ) the IS estimate leaves [−1, 1] in 11% of batches (up to 10.4) and SNIS never.
"""

import itertools
import math
import zlib

import pytest
import torch
from accelerate import Accelerator

from bridge_trl.gain import GainMeter, gain_estimates, gain_sums, log_ratios, reward_advantages

from .conftest import toy_reward
from .helpers import make_trainer
from .test_algorithm import SGD, lora

SEQS = torch.tensor(list(itertools.product(range(3), repeat=2)))  # all 9 sequences


def prompt(seed: int, delta: float):
    """(log π(θ), log π(θ̂)) as (V + 1, V) rows (first token, then second given the first), and 0/1 rewards."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, 3, generator=g).double() * 1.5
    noise = torch.randn(4, 3, generator=g).double()
    reward = torch.rand(9, generator=torch.Generator().manual_seed(seed + 7), dtype=torch.float64).round()
    return torch.log_softmax(logits, -1), torch.log_softmax(logits + delta * noise, -1), reward


def token_logps(policy: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    return torch.stack([policy[0, ys[..., 0]], policy[1 + ys[..., 0], ys[..., 1]]], dim=-1)


def enumerate_batches(prompts, group: int):
    """The truth (mean over prompts of J(θ) − J(θ̂)), each batch's probability and the meter's estimates."""
    k = len(prompts)
    picks = torch.tensor(list(itertools.product(range(9), repeat=group * k)))  # (M, K·G) sequence indices
    weight = torch.ones(len(picks), dtype=torch.float64)
    ratios, advantages, truth = [], [], 0.0
    for i, (theta, shadow, reward) in enumerate(prompts):
        cols = picks[:, i * group : (i + 1) * group]
        p_theta, p_shadow = token_logps(theta, SEQS).sum(1).exp(), token_logps(shadow, SEQS).sum(1).exp()
        truth += ((p_theta - p_shadow) * reward).sum().item() / k
        weight = weight * p_theta[cols].prod(1)
        ys = SEQS[cols]
        ratios.append(log_ratios(token_logps(theta, ys), token_logps(shadow, ys), torch.ones(2)))
        advantages.append(reward_advantages(reward[cols].reshape(-1), group).view(-1, group))
    estimates = gain_estimates(gain_sums(torch.cat(ratios, 1), torch.cat(advantages, 1)))
    return truth, weight, estimates


def moments(weight, values):
    mean = (weight * values).sum().item()
    return mean, (weight * (values - mean) ** 2).sum().item() ** 0.5


@pytest.mark.parametrize("delta", [0.3, 1.0])
def test_is_unbiased_snis_bounded_and_less_variable(delta):
    """Two prompts, G = 2: E[IS] is the truth to 1e-9; SNIS stays in [−1, 1] for 0/1 rewards on every batch,
    with a smaller spread and a bias that is a fraction of the truth's scale."""
    truth, weight, est = enumerate_batches([prompt(0, delta), prompt(1, delta)], group=2)
    assert weight.sum().item() == pytest.approx(1.0, abs=1e-12)
    is_mean, is_sd = moments(weight, est["bridge/cooperative_gain_is"])
    snis_mean, snis_sd = moments(weight, est["bridge/cooperative_gain"])
    assert is_mean == pytest.approx(truth, rel=1e-9, abs=1e-12)
    assert est["bridge/cooperative_gain"].abs().max() <= 1.0
    assert math.hypot(snis_mean - truth, snis_sd) < (0.9 if delta < 1 else 0.5) * is_sd  # smaller RMS error
    assert abs(snis_mean - truth) < 0.15 * max(abs(truth), is_sd)
    ess = est["bridge/gain_ess"]
    assert ((ess > 0) & (ess <= 1 + 1e-12)).all()
    if delta == 1.0:  # θ̂ far from θ: the unbiased estimate leaves the reward range, SNIS does not
        assert (weight * (est["bridge/cooperative_gain_is"].abs() > 1)).sum() > 0.05


def test_snis_bias_shrinks_with_the_number_of_sequences():
    """One prompt, δ = 0.3: SNIS lies between 0 and the truth in expectation, closer as N grows (≈ 0.025/N here)."""
    biases = []
    for group in (2, 3, 4, 5):
        truth, weight, est = enumerate_batches([prompt(0, 0.3)], group)
        mean, _ = moments(weight, est["bridge/cooperative_gain"])
        assert min(0.0, truth) < mean < max(0.0, truth)  # shrunk toward 0
        biases.append(abs(mean - truth))
    assert biases == sorted(biases, reverse=True)
    assert biases[0] == pytest.approx(0.0109, abs=2e-4) and biases[-1] < 0.55 * biases[0]


def meter_result(batches):
    """The meter over micro-batches of (joint logps, shadow logps, mask, reward_advantages), one process."""
    meter = GainMeter()
    for joint, shadow, mask, advantages in batches:
        meter.logps = {"joint": joint, "shadow": shadow}
        meter.add_shared({"completion_mask": mask, "reward_advantages": advantages})
    return meter.result(Accelerator(cpu=True), own_rollouts=False), meter


def test_meter_by_hand_over_micro_batches():
    """IS = mean (R − b)(1 − ρ), SNIS = mean A − Σ ρA / Σ ρ, ESS = (Σ ρ)² / (N Σ ρ²), ρ = Π_t π̂_t / π_t over masked
    tokens, over the sequences of every micro-batch; the meter resets after each step."""
    g = torch.Generator().manual_seed(0)
    batches, rho, adv = [], [], []
    for _ in range(2):
        joint, shadow = -torch.rand(4, 5, generator=g) * 3, -torch.rand(4, 5, generator=g) * 3
        mask, rewards = (torch.rand(4, 5, generator=g) > 0.3).long(), torch.rand(4, generator=g)
        mask[:, 0] = 1
        batches.append((joint, shadow, mask, reward_advantages(rewards, 2)))
        for i in range(4):
            other = rewards[i + 1 if i % 2 == 0 else i - 1].item()  # the other completion of the prompt
            rho.append(math.prod(math.exp(shadow[i, t] - joint[i, t]) for t in range(5) if mask[i, t]))
            adv.append(rewards[i].item() - other)
    result, meter = meter_result(batches)
    n = len(rho)
    assert result["bridge/cooperative_gain_is"] == pytest.approx(
        sum(a * (1 - r) for a, r in zip(adv, rho, strict=True)) / n, rel=1e-5
    )
    snis = sum(adv) / n - sum(a * r for a, r in zip(adv, rho, strict=True)) / sum(rho)
    assert result["bridge/cooperative_gain"] == pytest.approx(snis, rel=1e-5, abs=1e-7)
    assert result["bridge/gain_ess"] == pytest.approx(sum(rho) ** 2 / (n * sum(r * r for r in rho)), rel=1e-5)
    assert meter.sums.abs().sum() == 0  # reset for the next step


def test_unmeasured_rows_are_as_if_never_sampled():
    """A row GRPO masks out of its loss (all-zero mask, as `mask_truncated_completions` leaves it) or with a NaN
    advantage counts in no numerator and no denominator: the meter reads what it reads without those rows."""
    g = torch.Generator().manual_seed(1)
    joint, shadow = -torch.rand(6, 4, generator=g) * 3, -torch.rand(6, 4, generator=g) * 3
    mask, advantages = torch.ones(6, 4, dtype=torch.long), torch.randn(6, generator=g).double()
    mask[2] = 0  # a masked truncated completion
    advantages[4] = float("nan")  # an unscored one
    keep = torch.tensor([0, 1, 3, 5])
    full, _ = meter_result([(joint, shadow, mask, advantages)])
    kept, _ = meter_result([(joint[keep], shadow[keep], mask[keep], advantages[keep])])
    assert (
        full.keys()
        == kept.keys()
        == {"bridge/cooperative_gain", "bridge/cooperative_gain_is", "bridge/gain_ess"}
    )
    for key in full:
        assert full[key] == pytest.approx(kept[key], rel=1e-6)
    none, _ = meter_result([(joint[:1], shadow[:1], mask[2:3], advantages[:1])])
    assert none == {}  # nothing measured: nothing logged


def some_truncated(prompts, trainer):
    """Completions of 3 random tokens, then EOS on the prompt's rows where a coin says so (else a 4th token)."""
    tokenizer, seen, completions = trainer.processing_class, {}, []
    for prompt in prompts:
        j = seen[prompt] = seen.get(prompt, -1) + 1
        g = torch.Generator().manual_seed(zlib.crc32(f"{prompt}|{j}".encode()))
        ids = torch.randint(32, 127, (4,), generator=g).tolist()
        completions.append(ids[:3] + [tokenizer.eos_token_id] if ids[3] % 2 else ids)
    return {"prompt_ids": [tokenizer(p)["input_ids"] for p in prompts], "completion_ids": completions,
            "logprobs": [[0.0] * 4] * len(prompts)}  # fmt: skip


def test_trainer_leaves_masked_truncated_completions_out_of_the_baselines(
    tmp_path, make_model, tokenizer, rl_dataset, sft_dataset
):
    """`mask_truncated_completions`: a truncated completion's `reward_advantages` is NaN, and the others' baseline
    is the mean reward of the other *finished* completions of their prompt. Step 0 (θ̂ = θ) logs gain 0, ESS 1."""
    trainer = make_trainer(tmp_path, make_model(), tokenizer, rl_dataset, sft_dataset, peft_config=lora(),
                           mask_truncated_completions=True, learning_rate=0.1, **SGD)  # fmt: skip
    trainer.rollout_func = some_truncated
    seen, generate = [], trainer._generate_and_score_completions
    trainer._generate_and_score_completions = lambda batch: seen.append(generate(batch)) or seen[-1]
    trainer.train()
    out = seen[0]
    finished = out["completion_mask"].sum(1) > 0
    assert 0 < finished.sum() < len(finished)  # both kinds present
    rows = zip(out["completion_ids"], out["completion_mask"].bool(), strict=True)
    texts = [tokenizer.decode(ids[m], skip_special_tokens=True) for ids, m in rows]
    rewards = torch.tensor(toy_reward(texts), dtype=torch.float64)
    rewards[~finished] = float("nan")
    expected = []
    for i in range(len(rewards)):
        others = [rewards[j].item() for j in range(i // 4 * 4, i // 4 * 4 + 4) if j != i and finished[j]]
        if not finished[i]:
            expected.append(float("nan"))
        else:
            expected.append(rewards[i].item() - sum(others) / len(others) if others else 0.0)
    torch.testing.assert_close(out["reward_advantages"].double(), torch.tensor(expected, dtype=torch.float64),
                               atol=1e-6, rtol=0, equal_nan=True)  # fmt: skip
    log = trainer.state.log_history[0]
    assert log["bridge/cooperative_gain"] == log["bridge/cooperative_gain_is"] == 0.0
    assert log["bridge/gain_ess"] == 1.0
