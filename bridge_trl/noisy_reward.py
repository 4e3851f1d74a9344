"""`NoisyReward`: a TRL reward function whose binary reward is flipped with a fixed probability, reproducibly.

The noise is keyed on (seed, step, call within the step, global position in the batch), never on the completion
or on the process: in TRL 1.16 `_calculate_rewards` runs every reward function on this process's slice of the
generation batch (`len(prompts)` completions) and gathers the results in process order, so completion `i` of process
`r` sits at global position `r * len(prompts) + i`, the row TRL's own `process_slice` gives it. Drawing one uniform
per global position from a stream seeded by (seed, step, call) therefore flips the same completions whether the
batch is scored by one process or split across several, and two runs with the same seed (paired seeds of compared
methods) see the same noise at the same (step, position).

- step: `trainer_state.global_step`, which TRL 1.16 passes to every reward function (checkpoints restore it, so a
  resumed run continues the stream); when no `trainer_state` is passed, an internal call counter stands in (then
  the stream restarts with the object, not with a checkpoint).
- call: how many times this wrapper has already been called at this step of this run (0 for the first), so that
  several generations within one optimizer step (`steps_per_generation` < `gradient_accumulation_steps`, or
  BRIDGE's `shadow_rollouts="own"`, which generates twice per step) get independent noise.
- evaluation stays clean: TRL's `log_metric` kwarg is the trainer's bound `_log_metric`; when that trainer's model
  is in eval mode (TRL's own train/eval test in `_generate_and_score_completions`), the wrapped function's rewards
  are returned untouched, draw nothing and log nothing.
- expert traces stay clean: LUFFY (`bridge_trl.luffy`) puts expert traces into the rollout batch before it is
  scored, and the trainer marks those rows (`_luffy_off`, this process's rows). They are expert data, as SFT's
  traces are for mix, BRIDGE and CHORD, whose SFT loss never reads a reward: flipping their reward would corrupt
  LUFFY's expert signal alone. Their rewards are returned untouched and are not counted as flippable; the uniforms
  are still drawn for every position, so the policy's own rollouts see the same noise as any other method's.
- the realised flip rate (flips / flippable rewards on this process and call) goes to `log_metric` as
  `rewards/<name>/flip_rate`, which TRL averages over processes and logging steps; `flips` and `flippable` keep the
  running totals for use outside a trainer.
"""

import logging
import math
import numbers
from collections.abc import Callable, Sequence

import numpy as np
import torch
from trl.trainer.utils import get_callable_name, is_async_callable

logger = logging.getLogger(__name__)


class NoisyReward:
    """Wraps a TRL reward function; each reward at one of `levels` is swapped for the other with prob. `flip_prob`.

    `levels=(0, 1)` (the default) flips r to 1 − r; `levels=(-1, 1)` flips r to −r; any other pair (e.g. a reward
    with `correct=2, incorrect=-1`) swaps its two values. Rewards at neither level, and `None` (TRL's "not
    applicable"), are passed through unchanged, with a warning the first time. `1` cannot tell a {0, 1} reward from
    a ±1 one, so the scale is declared rather than guessed (a guess from the values seen could differ between
    processes, whose slices differ). Async reward functions give an awaitable wrapper. Reward *models*
    (`nn.Module`, hub ids) are refused: their scores are continuous.
    """

    def __new__(cls, *args, **kwargs):
        # TRL awaits a reward function when `is_async_callable` says so, which inspects `__call__`: an async
        # function needs a wrapper whose `__call__` is itself a coroutine function. (No required argument here:
        # pickle and deepcopy call `__new__(cls)` alone.)
        func = args[0] if args else kwargs.get("func")
        if cls is NoisyReward and callable(func) and is_async_callable(func):
            cls = _AsyncNoisyReward
        return super().__new__(cls)

    def __init__(
        self, func: Callable, flip_prob: float, seed: int = 0, *, levels: Sequence[float] = (0.0, 1.0)
    ):
        if isinstance(func, str | torch.nn.Module) or not callable(func):
            raise TypeError(
                f"NoisyReward wraps a reward function (a callable returning one reward per completion), got "
                f"{type(func).__name__}: reward models give continuous scores, which have nothing to flip."
            )
        if (
            isinstance(flip_prob, bool)
            or not isinstance(flip_prob, numbers.Real)
            or not (0.0 <= float(flip_prob) <= 1.0)  # also refuses NaN
        ):
            raise ValueError(f"flip_prob must be a probability in [0, 1], got {flip_prob!r}.")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
        levels = tuple(float(v) for v in levels)
        if len(levels) != 2 or levels[0] == levels[1] or not all(map(math.isfinite, levels)):
            raise ValueError(
                f"levels must be two distinct finite rewards, e.g. (0, 1) or (-1, 1); got {levels}."
            )
        self.func, self.flip_prob, self.seed, self.levels = func, float(flip_prob), int(seed), levels
        # TRL names a reward function by `__name__` (its `rewards/<name>/*` metrics, completion tables,
        # profiling): the wrapper must log under the wrapped function's name.
        self.__name__ = get_callable_name(func)
        self.__qualname__ = getattr(func, "__qualname__", self.__name__)
        self.__doc__ = getattr(func, "__doc__", None)
        self.__wrapped__ = func
        self.flips = self.flippable = 0  # running totals over training calls
        self._state, self._step, self._call = None, None, 0  # noise key of the last training call
        self._calls = 0  # fallback step counter, when no `trainer_state` is passed
        self._warned_other = self._warned_counter = False

    def __repr__(self) -> str:
        return f"NoisyReward({self.__name__}, flip_prob={self.flip_prob}, seed={self.seed}, levels={self.levels})"

    def __call__(self, *args, **kwargs):
        return self._apply(self.func(*args, **kwargs), kwargs)

    def _apply(self, rewards, kwargs: dict) -> list:
        rewards = list(rewards)
        trainer = getattr(kwargs.get("log_metric"), "__self__", None)
        if trainer is not None and not getattr(getattr(trainer, "model", None), "training", True):
            return rewards  # evaluation: clean, and no draw, so the training stream does not move
        step, call = self._key(kwargs.get("trainer_state"))
        offset = _process_index(trainer) * len(rewards)  # TRL's process slices are equal: see the module doc
        expert = getattr(trainer, "_luffy_off", None)  # LUFFY's expert-trace rows of this process: kept clean
        expert = [False] * len(rewards) if expert is None else [bool(x) for x in expert]
        if len(expert) != len(rewards):
            raise ValueError(f"NoisyReward: {len(expert)} expert-trace marks for {len(rewards)} rewards.")
        # One uniform per global position of the batch, from a stream seeded by (seed, step, call): the slice
        # [offset, offset + n) is the same numbers however many processes share the batch.
        uniforms = np.random.default_rng([self.seed, step, call]).random(offset + len(rewards))[offset:]
        out, flips, flippable = [], 0, 0
        for reward, u, is_trace in zip(rewards, uniforms, expert, strict=True):
            level = None if is_trace else self._level(reward)
            if level is None:
                out.append(reward)
                continue
            flippable += 1
            if u < self.flip_prob:
                out.append(self.levels[1 - level])
                flips += 1
            else:
                out.append(reward)
        self.flips += flips
        self.flippable += flippable
        log_metric = kwargs.get("log_metric")
        if callable(log_metric) and flippable:
            log_metric(f"rewards/{self.__name__}/flip_rate", flips / flippable)
        return out

    def _key(self, state) -> tuple[int, int]:
        """(step, call within the step) of this training call."""
        step = getattr(state, "global_step", None)
        if step is None:
            if not self._warned_counter:
                logger.warning(
                    "NoisyReward(%s): no `trainer_state` passed; the noise is keyed on an internal call counter "
                    "(reproducible within this object's life, not across a resume).",
                    self.__name__,
                )
                self._warned_counter = True
            self._calls += 1
            return self._calls - 1, 0
        # A new TrainerState (a new `train()`, or a resume) or a new step restarts the call count.
        if state is self._state and step == self._step:
            self._call += 1
        else:
            self._state, self._step, self._call = state, step, 0
        return int(step), self._call

    def _level(self, reward) -> int | None:
        """0 or 1, the index of `reward` in `levels`; None when it is at neither (warned once)."""
        try:
            value = float(reward)
        except (TypeError, ValueError):
            value = math.nan  # None or not a number
        for index, level in enumerate(self.levels):
            if value == level:
                return index
        if not self._warned_other:
            logger.warning(
                "NoisyReward(%s): reward %r is neither of the levels %s, left unflipped (so is every such "
                "reward, and None; warned once). For a ±1 reward pass levels=(-1, 1).",
                self.__name__,
                reward,
                self.levels,
            )
            self._warned_other = True
        return None


class _AsyncNoisyReward(NoisyReward):
    async def __call__(self, *args, **kwargs):
        return self._apply(await self.func(*args, **kwargs), kwargs)


def _process_index(trainer) -> int:
    """This process's rank in the batch TRL gathers: the trainer's accelerator, else torch.distributed."""
    accelerator = getattr(trainer, "accelerator", None)
    if accelerator is not None:
        return int(accelerator.process_index)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0
