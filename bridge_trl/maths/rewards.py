r"""The BRIDGE accuracy reward: math-verify equivalence, scored in a pool of killable worker processes.

`accuracy_reward(completions, answer, **kwargs)` is a TRL reward function (the paper's binary 1/0 reward);
`make_accuracy_reward(correct=1.0, incorrect=-1.0)` gives Eq. 3's ±1 variant. Both are `AccuracyReward`
instances whose `__name__` is the name TRL logs the reward under. The worker pool is `pool.py`, the answer
normalisation `answers.py`; their public names are re-exported here.

Inside a trainer the per-batch count of completions cut off by the time limit is logged as the metric
`<name>/timeouts` through TRL's `log_metric` hook.
"""

from __future__ import annotations

from .answers import answer_text, clip_completion, completion_text, last_boxed, normalize_gold
from .pool import MathVerifier, Verdict, verify_in_process

__all__ = [
    "AccuracyReward",
    "MathVerifier",
    "Verdict",
    "accuracy_reward",
    "answer_text",
    "clip_completion",
    "completion_text",
    "last_boxed",
    "make_accuracy_reward",
    "normalize_gold",
    "verify_in_process",
]


class AccuracyReward:
    """A TRL reward function: `correct` when math-verify finds a completion equivalent to its gold `answer`.

    Call it as TRL does, `reward(completions=..., answer=..., **dataset_columns)`. The cumulative count
    of completions cut off by the time limit is `reward.num_timeouts`; inside a TRL trainer the count per
    batch is also logged as the metric `<__name__>/timeouts`.
    """

    def __init__(
        self, correct: float = 1.0, incorrect: float = 0.0, name: str = "accuracy_reward", **pool_kw
    ):
        self.correct = float(correct)
        self.incorrect = float(incorrect)
        self.__name__ = name
        self.verifier = MathVerifier(**pool_kw)

    @property
    def num_timeouts(self) -> int:
        return self.verifier.num_timeouts

    def __repr__(self) -> str:
        return f"AccuracyReward(name={self.__name__!r}, correct={self.correct}, incorrect={self.incorrect})"

    def __call__(self, completions: list, answer: list, **kwargs) -> list[float]:
        before = self.verifier.num_timeouts
        verdicts = self.verifier.verify(list(answer), list(completions))
        if callable(kwargs.get("log_metric")):
            kwargs["log_metric"](f"{self.__name__}/timeouts", float(self.verifier.num_timeouts - before))
        return [self.correct if v.correct else self.incorrect for v in verdicts]


def make_accuracy_reward(
    correct: float = 1.0,
    incorrect: float = 0.0,
    timeout_s: float = 10.0,
    num_workers: int | None = None,
    name: str = "accuracy_reward",
    **pool_kw,
) -> AccuracyReward:
    """An accuracy reward with its own worker pool. The paper's experiments use 1/0 (the default);
    Eq. 3 uses `correct=1.0, incorrect=-1.0`. `name` is what TRL logs the reward under."""
    return AccuracyReward(correct, incorrect, name, timeout_s=timeout_s, num_workers=num_workers, **pool_kw)


accuracy_reward = make_accuracy_reward()
"""The paper's reward: 1.0 for a verified final answer, 0.0 otherwise. Its pool starts on first call."""
