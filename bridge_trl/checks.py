"""Input checks of `BridgeTrainer`, raised before any step, each naming the field or argument at fault.

`check_inputs` runs before a model is loaded: which data and rewards each `method` needs, whether RL prompts and SFT
examples are rendered the same way, and which adapter to attach (`resolve_peft_config`). `ColdStartSwitchCheck`
refuses a cold start that would never reach its RL phase once the run's length is known (with `num_train_epochs`
it is only known when `train()` starts). `RewardChecksMixin` stops on a reward that is not a number, or not finite,
naming the reward function and the row, before it enters the advantages: an `inf` reward gives NaN or zero
advantages and a loss that hides it.
"""

from __future__ import annotations

import logging
import numbers

import torch
from peft import LoraConfig
from transformers import TrainerCallback
from trl.data_utils import is_conversational

from .methods import cold_start_switch
from .sft import validate_sft_dataset

logger = logging.getLogger(__name__)

# `peft_config` when the caller passed none: the paper's LoRA for `bridge`, no adapter for the baselines (as in TRL).
# An explicit `peft_config=None` means "no adapter", which BRIDGE cannot run without.
DEFAULT_ADAPTER = "default"
# Methods that train on `sft_dataset`, and methods that sample rollouts and so need rewards (`bridge_trl.methods`).
USES_SFT = ("bridge", "mix", "alternating", "sft", "cold_start", "chord", "luffy", "hpt", "relift")
USES_REWARD = ("bridge", "mix", "alternating", "rl", "cold_start", "chord", "luffy", "hpt", "relift")


def default_peft_config() -> LoraConfig:
    """The paper's adapter: LoRA with r = α = 16 on every linear layer."""
    return LoraConfig(
        r=16, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )


def resolve_peft_config(method: str, peft_config):
    """The adapter to attach: `peft_config` as given; when omitted, the paper's LoRA for `bridge` only."""
    if isinstance(peft_config, str) and peft_config == DEFAULT_ADAPTER:
        return default_peft_config() if method == "bridge" else None
    if peft_config is None and method == "bridge":
        raise ValueError(
            "method='bridge' needs a LoRA adapter w, and `peft_config=None` (`use_peft: false`) asks for none. BRIDGE's "
            "upper level trains w on the cooperative gain J_RL(θ, w) − J_RL(θ̂, w) (Eq. 11): without w there is "
            "nothing to couple θ and θ̂, and the run would be the `mix` baseline. Omit `peft_config` for the paper's "
            "LoRA (r = α = 16, all linear layers), pass a `LoraConfig`, or use method='mix' for the joint loss alone."
        )
    return peft_config


def sft_has_no_reward(completions, **kwargs):
    """The reward GRPOTrainer is given under method='sft', which never samples a rollout."""
    raise RuntimeError("method='sft' does not generate: no reward is ever computed.")


def check_cold_start_switch(sft_steps: int | None, sft_ratio: float, max_steps: int) -> None:
    """Cold start must reach its RL phase: the switch step must come before the last step."""
    switch = cold_start_switch(sft_steps, sft_ratio, max_steps)
    if switch >= max_steps:
        field = (f"`cold_start_sft_steps`={sft_steps}" if sft_steps is not None
                 else f"`cold_start_sft_ratio`={sft_ratio} (switch at step {switch})")  # fmt: skip
        raise ValueError(
            f"method='cold_start' switches from SFT to GRPO at step {switch}, but the run has {max_steps} optimizer "
            f"steps, so it would never run RL: {field} must leave at least one step (< {max_steps}); for SFT "
            "alone use method='sft'."
        )


class ColdStartSwitchCheck(TrainerCallback):
    """`check_cold_start_switch` at `on_train_begin`, where `state.max_steps` is known (epochs included)."""

    def on_train_begin(self, args, state, control, **kwargs):
        if args.method == "cold_start":
            check_cold_start_switch(args.cold_start_sft_steps, args.cold_start_sft_ratio, state.max_steps)


def _first(dataset):
    return next(iter(dataset), None) if dataset is not None else None


def _sft_is_conversational(row: dict) -> bool:
    return "messages" in row or is_conversational({"prompt": row["prompt"]})


def _format(chat: bool) -> str:
    return (
        "message lists (rendered with the chat template)"
        if chat
        else "plain strings (fed as is, no chat template)"
    )


def check_prompt_formats(rl_row, sft_row) -> None:
    """RL prompts and SFT examples must both be conversational or both plain: TRL renders only the former."""
    if not isinstance(rl_row, dict) or "prompt" not in rl_row or sft_row is None:
        return
    rl_chat, sft_chat = is_conversational({"prompt": rl_row["prompt"]}), _sft_is_conversational(sft_row)
    if rl_chat != sft_chat:
        raise ValueError(
            f"The RL prompts (`train_dataset`) are {_format(rl_chat)} but the SFT examples (`sft_dataset`) are "
            f"{_format(sft_chat)}: the two objectives would see the same problems in two formats, one with the "
            "chat template and one without. Give both datasets the same format: strings in both, or `prompt` "
            "message lists (and `messages` or `completion` message lists) in both."
        )


def check_inputs(reward_funcs, args, train_dataset, sft_dataset, peft_config):
    """Every input check that needs no model; returns the (reward_funcs, sft_dataset, peft_config) to use."""
    method = args.method
    if method in USES_SFT:
        validate_sft_dataset(sft_dataset, method)
    elif sft_dataset is not None:
        logger.warning("method=%r trains on RL alone: `sft_dataset` is ignored.", method)
        sft_dataset = None
    funcs = [] if reward_funcs is None else reward_funcs if isinstance(reward_funcs, list) else [reward_funcs]
    if method in USES_REWARD and not funcs:
        raise ValueError(
            f"method={method!r} samples rollouts and scores them: pass `reward_funcs` (a TRL reward function, a "
            "list of them, or a reward model id). Only method='sft' trains without a reward."
        )
    if method == "sft" and funcs:
        logger.warning("method='sft' trains on `sft_dataset` alone: `reward_funcs` are never called.")
    if method == "sft":
        funcs = [sft_has_no_reward]  # GRPOTrainer insists on a reward source; SFT never generates
    if method in USES_REWARD and method in USES_SFT:
        check_prompt_formats(_first(train_dataset), _first(sft_dataset))
    return funcs, sft_dataset, resolve_peft_config(method, peft_config)


def _is_number(value) -> bool:
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and not value.dtype.is_complex
    return isinstance(value, numbers.Real)  # bool, int, float and numpy scalars; None is handled by TRL


class RewardChecksMixin:
    """`_calculate_rewards` that refuses non-numbers and non-finite rewards, naming the function and the row.

    TRL turns `None` into NaN (a reward that abstains) and lets ±inf through, where it becomes a NaN or zero advantage
    and a finite loss: training goes on, on nothing. Checked on the gathered rewards, so every rank stops together.
    """

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        funcs = self.reward_funcs
        self.reward_funcs = [self._checked_reward(f, name, prompts) for f, name in zip(funcs, self.reward_func_names,
                                                                                       strict=True)]  # fmt: skip
        try:
            rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        finally:
            self.reward_funcs = funcs
        bad = torch.isinf(rewards).nonzero()
        if len(bad):
            row, col = bad[0].tolist()
            local = row - self.accelerator.process_index * len(prompts)
            where = f" (prompt: {str(prompts[local])[:200]!r})" if 0 <= local < len(prompts) else ""
            raise FloatingPointError(
                f"Reward function {self.reward_func_names[col]!r} returned {rewards[row, col].item()} for row {row} "
                f"of the generation batch at step {self.state.global_step}{where}. Rewards must be finite (or None "
                "to abstain): an infinite reward turns the group's advantages into NaN or 0. Stopping before any "
                f"parameter moves; the last saved checkpoint in {self.args.output_dir} is intact."
            )
        return rewards

    @staticmethod
    def _checked_reward(func, name: str, prompts):
        if isinstance(func, torch.nn.Module) or not callable(func):
            return func
        from trl.trainer.utils import is_async_callable

        if is_async_callable(func):
            return func

        def checked(**kwargs):
            out = func(**kwargs)
            if isinstance(out, torch.Tensor):
                out = out.tolist()
            if not isinstance(out, (list, tuple)):
                raise TypeError(
                    f"Reward function {name!r} returned a {type(out).__name__}; a TRL reward function returns a "
                    f"list of {len(prompts)} numbers (one per completion; None to abstain)."
                )
            for row, value in enumerate(out):
                if value is not None and not _is_number(value):
                    raise TypeError(
                        f"Reward function {name!r} returned {value!r} ({type(value).__name__}) for row {row} "
                        f"(prompt: {str(prompts[row])[:200] if row < len(prompts) else '?'!r}); rewards must be "
                        "numbers (int, float, bool) or None."
                    )
            return out

        return checked


def check_luffy_coverage(
    matched: int, total: int, min_coverage: float, traces: int, method: str = "luffy"
) -> None:
    """LUFFY (and HPT) need expert traces for their RL prompts; with none they are GRPO, with few mostly GRPO."""
    if total and (matched == 0 or matched / total < min_coverage):
        raise ValueError(
            f"method='{method}': {matched} of {total} RL prompts have an expert trace in `sft_dataset` ({traces} "
            f"distinct SFT prompts), below `{method}_min_trace_coverage`={min_coverage}"
            f"{f' (with none, {method} is plain GRPO)' if matched == 0 else ''}. A trace is paired with an RL prompt "
            "when both prompts, rendered by GRPO's prompt tokenization (chat template included) and decoded, are "
            "equal after normalisation (case, spacing, `$`, \\dfrac/\\tfrac ignored): give `sft_dataset` the RL "
            "prompts' exact text and format (both strings or both message lists, same template)."
        )
    if total:
        logger.info("%s: %d of %d RL prompts have an expert trace", method, matched, total)
