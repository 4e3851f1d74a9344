"""`shadow_rollouts="own"` (θ̂ samples its own rollouts) and the cooperative-gain meter (`bridge_trl.gain`)."""

import math
import zlib

import pytest
import torch
from accelerate import Accelerator

from bridge_trl import BridgeConfig, BridgeTrainer
from bridge_trl.gain import GainMeter

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
    """With identical samples, 'own' (θ̂ generates, scores, and takes its own old log-probs) is 'shared' exactly."""
    common = (tmp_path, make_model, tokenizer, rl_dataset, sft_dataset)
    shared, shared_calls = run(*common, "shared", steps=2)
    own, own_calls = run(*common, "own", steps=2, shadow_rollouts="own")
    assert (shared_calls, own_calls) == (2, 4)  # one generation per step, two with 'own'
    del shared, own
    shared, _ = run(*common, "shared_det", steps=2, rollout_func=same_rollouts)
    own, _ = run(*common, "own_det", steps=2, shadow_rollouts="own", rollout_func=same_rollouts)
    for a, b in zip(snapshot(shared), snapshot(own), strict=True):
        assert_dicts_close(a, b, atol=1e-6, rtol=1e-5)
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


def test_gain_meter_matches_an_explicit_computation():
    """E[A (1 − π(θ̂)/π(θ))] over completion tokens, accumulated over two micro-batches, against a direct loop."""
    g = torch.Generator().manual_seed(0)
    meter, expected_num, expected_den = GainMeter(), 0.0, 0.0
    for _ in range(2):
        joint, shadow = -torch.rand(3, 5, generator=g) * 3, -torch.rand(3, 5, generator=g) * 3
        mask, adv = (torch.rand(3, 5, generator=g) > 0.3).long(), torch.randn(3, generator=g)
        meter.logps = {"joint": joint, "shadow": shadow}
        meter.add_shared({"completion_mask": mask, "advantages": adv})
        for i in range(3):
            for t in range(5):
                if mask[i, t]:
                    p_joint, p_shadow = math.exp(joint[i, t].item()), math.exp(shadow[i, t].item())
                    expected_num += adv[i].item() * (1 - p_shadow / p_joint)
                    expected_den += 1
    result = meter.result(Accelerator(cpu=True), own_rollouts=False)
    assert result["bridge/cooperative_gain"] == pytest.approx(expected_num / expected_den, rel=1e-5)
    assert meter.terms.abs().sum() == 0  # reset for the next step
