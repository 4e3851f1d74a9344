"""NoisyReward: flip rate, determinism, independence from the process split, levels, None and other values, the
argument checks, the name TRL logs under, async functions, and BridgeTrainer runs: noisy training reward and flip
rate logged, clean evaluation, the stream continued across a resume, two DDP processes flipping what one would, and
LUFFY's expert traces left clean."""

import asyncio
import copy
import functools
import json
import logging
import math
import os
import pickle
import subprocess
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from trl.trainer.utils import get_callable_name, is_async_callable

from bridge_trl import BridgeTrainer, NoisyReward

from .helpers import make_config, torchrun_command

LOGGER = "bridge_trl.noisy_reward"


def score_reward(completions, score, **kwargs):
    """Returns the dataset column `score` (TRL passes dataset columns to reward functions as kwargs)."""
    return list(score)


class FakeTrainer:
    """What a reward function can see of a GRPOTrainer in TRL 1.16: `log_metric` is the bound `_log_metric`."""

    def __init__(self, rank=0, training=True):
        self.accelerator = SimpleNamespace(process_index=rank)
        self.model = SimpleNamespace(training=training)
        self.metrics = defaultdict(list)

    def _log_metric(self, name, value):
        self.metrics[name].append(value)


def call(noisy, score, state=None, trainer=None):
    """Calls `noisy` as TRL's `_calculate_rewards` calls a synchronous reward function."""
    kwargs = {"score": list(score), "log_extra": lambda column, values: None}
    if state is not None:
        kwargs["trainer_state"] = state
    if trainer is not None:
        kwargs["log_metric"] = trainer._log_metric
    n = len(score)
    return noisy(prompts=["p"] * n, completions=["c"] * n, completion_ids=[[0]] * n, **kwargs)


def flip_mask(clean, noisy):
    return [a != b for a, b in zip(clean, noisy, strict=True)]


def binary(n, period=3):
    return [float(i % period == 0) for i in range(n)]


@pytest.mark.parametrize("p", [0.1, 0.2, 0.4])
def test_flip_rate_within_binomial_bound(p):
    n = 10_000
    clean = binary(n)
    noisy = call(NoisyReward(score_reward, p, seed=3), clean, SimpleNamespace(global_step=0))
    flips = flip_mask(clean, noisy)
    assert all(b == 1 - a for a, b, f in zip(clean, noisy, flips, strict=True) if f)  # r -> 1 - r
    # Binomial(n, p) within 5 standard deviations (a false alarm ~6e-7), overall and on each value: the flip
    # does not depend on the reward it flips.
    for subset in (range(n), [i for i in range(n) if clean[i] == 0], [i for i in range(n) if clean[i] == 1]):
        k, m = sum(flips[i] for i in subset), len(subset)
        assert abs(k - m * p) <= 5 * math.sqrt(m * p * (1 - p)), (k, m, p)


def test_flip_prob_edges():
    clean = binary(100)
    state = SimpleNamespace(global_step=0)
    assert call(NoisyReward(score_reward, 0.0), clean, state) == clean
    assert call(NoisyReward(score_reward, 1.0), clean, state) == [1 - r for r in clean]


def test_deterministic_per_seed_step_and_call():
    clean = binary(200)

    def mask(seed, state):
        return flip_mask(clean, call(NoisyReward(score_reward, 0.3, seed=seed), clean, state))

    step3 = SimpleNamespace(global_step=3)
    assert mask(7, step3) == mask(7, SimpleNamespace(global_step=3))  # same seed, step, positions
    assert mask(7, step3) != mask(8, step3)  # another seed
    assert mask(7, step3) != mask(7, SimpleNamespace(global_step=4))  # another step

    # A second generation within one step (same TrainerState, same global_step) gets fresh noise; a new run at
    # the same step starts over, so a reused wrapper reproduces a fresh one.
    noisy = NoisyReward(score_reward, 0.3, seed=7)
    first = flip_mask(clean, call(noisy, clean, step3))
    second = flip_mask(clean, call(noisy, clean, step3))
    assert first == mask(7, step3) and second != first
    assert flip_mask(clean, call(noisy, clean, SimpleNamespace(global_step=3))) == first


def test_independent_of_the_process_split():
    clean = binary(16)
    state = SimpleNamespace(global_step=5)
    one = FakeTrainer(rank=0)
    whole = call(NoisyReward(score_reward, 0.5, seed=1), clean, state, one)
    # Two ranks, each scoring its half of the same generation batch (TRL's process_slice), each its own wrapper.
    ranks = [FakeTrainer(rank=r) for r in (0, 1)]
    halves = [
        call(NoisyReward(score_reward, 0.5, seed=1), clean[8 * r : 8 * r + 8], state, ranks[r])
        for r in (0, 1)
    ]
    assert halves[0] + halves[1] == whole
    assert whole != clean  # something was flipped (fixed seed: deterministic)
    # Each rank logs the flip rate of its own slice; TRL averages them (equal slices: the whole batch's rate).
    rates = [t.metrics["rewards/score_reward/flip_rate"] for t in ranks]
    assert rates == [[sum(flip_mask(clean[8 * r : 8 * r + 8], halves[r])) / 8] for r in (0, 1)]
    assert one.metrics["rewards/score_reward/flip_rate"] == [sum(flip_mask(clean, whole)) / 16]


def test_plus_minus_one_levels():
    clean = [(-1.0) ** i for i in range(400)]
    state = SimpleNamespace(global_step=2)
    noisy = call(NoisyReward(score_reward, 0.3, seed=4, levels=(-1, 1)), clean, state)
    flips = flip_mask(clean, noisy)
    assert 0 < sum(flips) < len(clean)
    assert all(b == -a for a, b, f in zip(clean, noisy, flips, strict=True) if f)  # r -> -r
    # The stream does not depend on the levels: the same positions flip as for a {0, 1} reward.
    as01 = [(1 + r) / 2 for r in clean]
    assert flip_mask(as01, call(NoisyReward(score_reward, 0.3, seed=4), as01, state)) == flips


def test_none_and_other_values_untouched_with_one_warning(caplog):
    base = binary(300)
    state = SimpleNamespace(global_step=0)
    reference = flip_mask(base, call(NoisyReward(score_reward, 0.4, seed=2), base, state))
    odd = {5: None, 6: 0.5, 7: 2.0, 8: float("nan"), 9: -1.0}
    mixed = [odd.get(i, r) for i, r in enumerate(base)]
    noisy = NoisyReward(score_reward, 0.4, seed=2)
    trainer = FakeTrainer()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        out = call(noisy, mixed, state, trainer)
        call(noisy, mixed, SimpleNamespace(global_step=1))
    warnings = [r for r in caplog.records if r.name == LOGGER]
    assert len(warnings) == 1 and "neither of the levels" in warnings[0].getMessage()
    for i, value in odd.items():
        assert out[i] is value  # passed through as returned
    # The other positions flip exactly as in the batch without them (they do not shift the stream).
    keep = [i for i in range(len(base)) if i not in odd]
    assert [out[i] != base[i] for i in keep] == [reference[i] for i in keep]
    # The rate is over flippable rewards only.
    assert trainer.metrics["rewards/score_reward/flip_rate"] == [sum(reference[i] for i in keep) / len(keep)]


def test_internal_counter_without_trainer_state(caplog):
    clean = binary(100)
    a, b = NoisyReward(score_reward, 0.5, seed=0), NoisyReward(score_reward, 0.5, seed=0)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        a1, a2 = call(a, clean), call(a, clean)
    warned = [r for r in caplog.records if r.name == LOGGER and "internal call counter" in r.getMessage()]
    assert len(warned) == 1  # once per object
    assert [call(b, clean), call(b, clean)] == [a1, a2]  # reproducible per object
    assert a1 != a2  # each call its own step
    assert a1 == call(NoisyReward(score_reward, 0.5), clean, SimpleNamespace(global_step=0))  # counter = step


def test_eval_mode_is_clean():
    clean = binary(50)
    noisy = NoisyReward(score_reward, 1.0)
    evaluating = FakeTrainer(training=False)
    assert call(noisy, clean, SimpleNamespace(global_step=0), evaluating) == clean
    assert not evaluating.metrics and noisy.flippable == 0
    # Evaluation does not move the training stream: the next training call is a fresh wrapper's.
    state = SimpleNamespace(global_step=0)
    assert call(NoisyReward(score_reward, 0.5), clean, state) == call(
        NoisyReward(score_reward, 0.5), clean, state
    )
    mid = NoisyReward(score_reward, 0.5)
    call(mid, clean, state, evaluating)
    assert call(mid, clean, state) == call(NoisyReward(score_reward, 0.5), clean, state)


def test_pickle_and_deepcopy():
    async def async_score(completions, score, **kwargs):
        return list(score)

    clean, state = binary(64), SimpleNamespace(global_step=2)
    noisy = NoisyReward(score_reward, 0.5, seed=5, levels=(0, 1))
    for copy_ in (pickle.loads(pickle.dumps(noisy)), copy.deepcopy(noisy)):
        assert type(copy_) is NoisyReward and copy_.__name__ == "score_reward"
        assert call(copy_, clean, state) == call(NoisyReward(score_reward, 0.5, seed=5), clean, state)
    assert is_async_callable(copy.deepcopy(NoisyReward(async_score, 0.5)))


@pytest.mark.parametrize("p", [-0.1, 1.1, float("nan"), float("inf"), "0.2", None, True])
def test_flip_prob_outside_unit_interval_refused(p):
    with pytest.raises(ValueError, match=r"flip_prob must be a probability in \[0, 1\]"):
        NoisyReward(score_reward, p)


def test_other_arguments_refused():
    with pytest.raises(ValueError, match="seed"):
        NoisyReward(score_reward, 0.1, seed=-1)
    with pytest.raises(ValueError, match="levels"):
        NoisyReward(score_reward, 0.1, levels=(1, 1))
    with pytest.raises(TypeError, match="reward models"):
        NoisyReward(torch.nn.Linear(2, 1), 0.1)
    with pytest.raises(TypeError, match="reward models"):
        NoisyReward("some/reward-model", 0.1)


def test_name_kept():
    class Scorer:
        def __call__(self, completions, **kwargs):
            return [1.0] * len(completions)

    for func, name in [
        (score_reward, "score_reward"),
        (functools.partial(score_reward, extra=1), "score_reward"),
        (Scorer(), "Scorer"),
    ]:
        noisy = NoisyReward(func, 0.1)
        assert noisy.__name__ == name == get_callable_name(noisy) == get_callable_name(func)
        assert not is_async_callable(noisy)


def test_async_reward_function():
    async def async_score(completions, score, **kwargs):
        return list(score)

    clean, state = binary(64), SimpleNamespace(global_step=1)
    noisy = NoisyReward(async_score, 0.5, seed=9)
    assert is_async_callable(noisy) and noisy.__name__ == "async_score"  # TRL awaits it, names it
    out = asyncio.run(noisy(prompts=["p"] * 64, completions=["c"] * 64, score=clean, trainer_state=state))
    assert out == call(NoisyReward(score_reward, 0.5, seed=9), clean, state)


# BridgeTrainer on the tiny model.


def parity_reward(completions, **kwargs):
    """A {0, 1} reward that varies across random completions; records what it returned, call by call."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    rewards = [float(sum(map(ord, t)) % 2) for t in texts]
    parity_reward.calls.append(rewards)
    return rewards


def test_bridge_trainer_logs_the_noisy_reward_and_the_flip_rate(
    tmp_path, make_model, tokenizer, rl_dataset, sft_dataset
):
    parity_reward.calls = []
    noisy = NoisyReward(parity_reward, 0.5, seed=11)
    trainer = BridgeTrainer(
        make_model(),
        noisy,
        args=make_config(tmp_path, max_steps=2),
        train_dataset=rl_dataset,
        sft_dataset=sft_dataset,
        processing_class=tokenizer,
    )
    # Spy on what GRPO receives (gathered, (N, 1)): the rewards its advantages and logs are built from.
    seen, calculate = [], trainer._calculate_rewards

    def spy(*args):
        rewards = calculate(*args)
        seen.append(rewards[:, 0].tolist())
        return rewards

    trainer._calculate_rewards = spy
    trainer.train()

    logs = [h for h in trainer.state.log_history if "rewards/parity_reward/mean" in h]
    assert len(logs) == len(seen) == len(parity_reward.calls) == 2  # one generation per step
    total_flips = 0
    for step, log in enumerate(logs):
        clean, received = parity_reward.calls[step], seen[step]
        flips = flip_mask(clean, received)
        total_flips += sum(flips)
        assert all(b == 1 - a for a, b, f in zip(clean, received, flips, strict=True) if f)
        # The trainer's draw is the standalone one at trainer_state.global_step = this step.
        assert received == call(
            NoisyReward(score_reward, 0.5, seed=11), clean, SimpleNamespace(global_step=step)
        )
        assert log["rewards/parity_reward/mean"] == pytest.approx(sum(received) / len(received))
        assert log["reward"] == pytest.approx(sum(received) / len(received))
        assert log["rewards/parity_reward/flip_rate"] == pytest.approx(sum(flips) / len(flips))
    assert total_flips > 0  # the noisy reward, not the clean one, reached the logs

    # Evaluation stays clean: the rewards GRPO sees are the wrapped function's, and no flip rate is logged.
    parity_reward.calls.clear()
    seen.clear()
    metrics = trainer.evaluate(eval_dataset=rl_dataset.select(range(4)))
    clean = [r for rewards in parity_reward.calls for r in rewards]
    assert clean  # evaluation scored completions
    assert [r for rewards in seen for r in rewards] == clean
    assert metrics["eval_rewards/parity_reward/mean"] == pytest.approx(sum(clean) / len(clean))
    assert not any("flip_rate" in key for key in metrics)


# Issue 24: the resume and process-split claims through the real trainer, and LUFFY's expert traces kept clean.


def recording(noisy, log):
    """A reward function that calls `noisy` as the trainer does and records (step, flip mask) per call."""

    def reward(*args, **kwargs):
        clean, out = noisy.func(*args, **kwargs), noisy(*args, **kwargs)
        log.append((kwargs["trainer_state"].global_step, flip_mask(clean, out)))
        return out

    reward.__name__ = noisy.__name__
    return reward


def test_resume_from_checkpoint_continues_the_noise_stream(
    tmp_path, make_model, tokenizer, rl_dataset, sft_dataset
):
    """BRIDGE with θ̂'s own rollouts (two generations per step): stop at checkpoint-2 of 4 steps, resume with a
    fresh NoisyReward, and the flips at steps 2-3 (both calls of each) are the uninterrupted run's."""
    kw = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2, "shadow_rollouts": "own"}
    full_log, resumed_log = [], []
    full = BridgeTrainer(make_model(), recording(NoisyReward(parity_reward, 0.5, seed=4), full_log),
                         args=make_config(tmp_path / "full", **kw), train_dataset=rl_dataset,
                         sft_dataset=sft_dataset, processing_class=tokenizer)  # fmt: skip
    parity_reward.calls = []
    full.train()
    assert [s for s, _ in full_log] == [0, 0, 1, 1, 2, 2, 3, 3]  # two generations per step
    resumed = BridgeTrainer(make_model(seed=7), recording(NoisyReward(parity_reward, 0.5, seed=4), resumed_log),
                            args=make_config(tmp_path / "resumed", **kw), train_dataset=rl_dataset,
                            sft_dataset=sft_dataset, processing_class=tokenizer)  # fmt: skip
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "out" / "checkpoint-2"))
    assert resumed_log == full_log[4:]
    # Not trivially: the masks differ between steps and between the two calls of a step (a stream restarted at
    # step 0, or one keyed on the step alone, would fail the equality above).
    masks = [tuple(m) for _, m in full_log]
    assert len(set(masks)) == len(masks) and any(any(m) for m in masks)


def test_luffy_expert_traces_keep_their_clean_reward(tmp_path, make_model, tokenizer, rl_dataset):
    """flip_prob = 1 flips every reward of the policy's own rollouts and none of the expert traces': the traces'
    reward stays 1 (their answer is right), the rollouts' 0 (the random policy never writes it) reads 1."""
    traces = Dataset.from_dict(
        {"prompt": list(rl_dataset["prompt"]), "completion": [f"{a}." for a in rl_dataset["answer"]]}
    )

    def trace_reward(completions, answer, **kwargs):
        return [float(c == f"{a}.") for c, a in zip(completions, answer, strict=True)]

    noisy = NoisyReward(trace_reward, 1.0, seed=0)
    trainer = BridgeTrainer(make_model(), noisy, args=make_config(tmp_path, method="luffy", max_steps=2,
                                                                 optim="sgd", learning_rate=0.0),
                            train_dataset=rl_dataset, sft_dataset=traces, processing_class=tokenizer)  # fmt: skip
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["luffy/traces"] for h in logs] == [2, 2]  # 2 groups of G = 4 per step, one trace each
    assert [h["luffy/trace_reward"] for h in logs] == [1.0, 1.0]  # was 0.0: the expert signal flipped
    assert [h["reward"] for h in logs] == [1.0, 1.0]  # the rollouts' 0 flipped
    assert [h["rewards/trace_reward/flip_rate"] for h in logs] == [1.0, 1.0]
    assert (noisy.flips, noisy.flippable) == (12, 12)  # 6 rollouts per step; the 2 traces are not flippable


def test_expert_marks_must_match_the_batch():
    trainer = FakeTrainer()
    trainer._luffy_off = [True, False]
    with pytest.raises(ValueError, match="2 expert-trace marks for 3 rewards"):
        call(NoisyReward(score_reward, 0.5), [0.0, 1.0, 0.0], SimpleNamespace(global_step=0), trainer)
    trainer._luffy_off = [True, False, False]
    out = call(NoisyReward(score_reward, 1.0), [0.0, 1.0, 0.0], SimpleNamespace(global_step=0), trainer)
    assert out == [0.0, 0.0, 1.0]  # the marked row untouched


@pytest.mark.slow  # two torch processes start and train 3 steps: ~20 s quiet
@pytest.mark.distributed
def test_two_processes_flip_what_one_process_flips(tmp_path):
    """DDP over gloo, 2 processes, 3 steps of BRIDGE: each process's slice, put back in process order, is flipped
    exactly as one NoisyReward flips the whole global batch at that step (the standalone draw)."""
    script = Path(__file__).resolve().parent / "scripts" / "run_noisy_reward.py"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1", "OMP_NUM_THREADS": "1"}
    command = torchrun_command(script, tmp_path)
    result = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=600, cwd=script.parents[2]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"noise_rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 for r in ranks)
    calls = [r["calls"] for r in ranks]
    assert len(calls[0]) == len(calls[1]) == 3
    for step, (a, b) in enumerate(zip(*calls, strict=True)):
        assert (a["step"], a["rank"], b["step"], b["rank"]) == (step, 0, step, 1)
        assert len(a["clean"]) == len(b["clean"]) == 8  # 16 completions split in two
        clean, noisy = a["clean"] + b["clean"], a["noisy"] + b["noisy"]
        expected = call(NoisyReward(score_reward, 0.5, seed=5), clean, SimpleNamespace(global_step=step))
        assert noisy == expected
        # a draw that ignored the process index would give rank 1 rank 0's uniforms: the two masks differ here
        assert flip_mask(a["clean"], a["noisy"]) != flip_mask(b["clean"], b["noisy"])
    assert sum(r["flips"] for r in ranks) > 0 and sum(r["flippable"] for r in ranks) == 48
