"""LUFFY (arXiv 2504.14945): mixed-policy GRPO, expert traces standing in for some of each group's rollouts.

Reference: ElliottYan/LUFFY, `luffy/verl/verl/mix_src`, `compute_token_on_off_policy_loss`, as its published
training script `exp_scripts/train.sh` runs it: `off_policy_reshape="p_div_p_0.1"` (the yaml default is
`no_reshape`), no off-policy clipping, `grpo_use_std=False` (TRL: `scale_rewards="none"`), the loss summed over
tokens and divided by the maximum response length (`loss_remove_token_mean=True`; TRL: `loss_type="dr_grpo"`,
which also divides by the micro-batch's rows, a constant the learning rate absorbs) and `entropy_coeff=0.001`
(TRL: `entropy_coef`, here a mean over every completion token, traces included, as verl's). `loss_type="dapo"`
(one token mean) is offered too. For each RL prompt with an expert trace in the SFT
set, the last `luffy_num_off_policy` of its G rollouts are replaced by the trace before rewards are computed, so
TRL's own reward and group-advantage code scores the trace like any completion and normalises over the mixed
group (Eq. 4 of the paper). The loss (Eq. 6, with the policy shaping of §3.3) is one token mean over the batch:

    L = (1/N) [ Σ_{on-policy t} GRPO's clipped term  +  Σ_{off-policy t} −Â_i f(π_θ(t)) ],   f(π) = π / (π + γ)

where the behaviour probability of a trace token is taken as 1, so f(π_θ) is its importance weight, unclipped,
and N is `loss_type`'s normaliser over the whole mixed batch ('dapo': every completion token of the step;
'dr_grpo': rows × max_completion_length per micro-batch). Off-policy tokens get neither the vLLM
importance-sampling correction nor the old-log-prob ratio clipping, nor the KL term (the paper uses none).

Metrics: TRL's names (`reward`, `rewards/<func>/*`, `reward_std`, `completions/*`, `num_tokens`) describe the
policy's own rollouts only; the traces are logged as `luffy/trace_reward`, `luffy/trace_length` and
`luffy/traces` (rows per generation), and count as SFT data consumed (`bridge/sft_{samples,tokens}`), not as RL
rollouts. `frac_reward_zero_std` stays TRL's: it describes the mixed groups the advantages are taken over.

Traces are found by the rendered prompt: an SFT row's prompt and an RL prompt are both rendered by GRPO's own
`_tokenize_prompts` (chat template included), decoded, and compared after `sft.normalize_question`, the
normalisation that pairs DeepMath traces with RL queries. The trace's completion tokens are the SFT tokenization's
(`sft.tokenize_sft_dataset`: the assistant turn up to its end-of-turn token, or the text plus EOS), so a trace
ends with EOS as a finished completion would; one longer than `max_completion_length` is cut to that length and,
like a generation that hit the limit, then ends without EOS (counted as truncated; masked with
`mask_truncated_completions`). Hook overrides (`LuffyMixin`) act only under `method="luffy"` in training.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from datasets import Dataset
from trl.trainer.utils import nanstd

from .checks import check_luffy_coverage
from .logps import observe_logps
from .sft import normalize_question

logger = logging.getLogger(__name__)

OFF_POLICY_KEY = "luffy_off_policy"  # (B,) bool in GRPO's prepared batch: the row is an expert trace


class LuffyTraces:
    """Expert traces by normalised rendered prompt: key → list of completion token ids (truncated)."""

    def __init__(self, sft_dataset, decode: Callable[[Sequence[int]], str], max_completion_length: int):
        self.decode, self.max_len = decode, max_completion_length
        self.traces: dict[str, list[list[int]]] = {}
        self._keys: dict[tuple, str] = {}  # rendered prompt ids → key, so a prompt is decoded once
        truncated = 0
        columns = sft_dataset.select_columns(["prompt_ids", "completion_ids"])
        for p_ids, c_ids in zip(columns["prompt_ids"], columns["completion_ids"], strict=True):
            truncated += len(c_ids) > self.max_len
            self.traces.setdefault(self.key(p_ids), []).append(list(c_ids[: self.max_len]))
        if truncated:
            logger.warning(
                "luffy: %d of %d traces are longer than max_completion_length=%d and are truncated to it.",
                truncated, len(sft_dataset), self.max_len,
            )  # fmt: skip

    def key(self, prompt_ids: Sequence[int]) -> str:
        ids = tuple(prompt_ids)
        if ids not in self._keys:
            self._keys[ids] = normalize_question(self.decode(ids))
        return self._keys[ids]

    def lookup(self, prompt_ids: Sequence[int]) -> list[list[int]]:
        return self.traces.get(self.key(prompt_ids), [])


def substitute_traces(prompt_ids, completion_ids, offset: int, num_generations: int, num_off_policy: int,
                      lookup: Callable) -> tuple[list, list[bool]]:  # fmt: skip
    """Replace the last `num_off_policy` completions of each group whose prompt has a trace.

    Row i of this process is row `offset + i` of the global generation batch, whose consecutive blocks of
    `num_generations` rows are the groups (TRL's `RepeatSampler`; the advantages are normalised over them after a
    gather in process order). Slot j ≥ G − n of a group takes its prompt's trace number (j − (G − n)) mod #traces.
    Returns the new completion ids (lists) and, per row, whether it is off-policy.
    """
    completions, off = list(completion_ids), [False] * len(completion_ids)
    first_off = num_generations - num_off_policy
    for i, p_ids in enumerate(prompt_ids):
        slot = (offset + i) % num_generations
        if slot >= first_off and (traces := lookup(p_ids)):
            completions[i], off[i] = list(traces[(slot - first_off) % len(traces)]), True
    return completions, off


def off_policy_token_loss(
    per_token_logps: torch.Tensor, advantages: torch.Tensor, gamma: float
) -> torch.Tensor:
    """−Â_i f(π_θ(t)) per token, f(π) = π / (π + γ): (B, T) log-probs, (B,) or (B, T) advantages → (B, T).

    Its gradient is −Â_i f'(π) ∇π = −Â_i γ π / (π + γ)² ∇log π: unlike the ratio π/1, the shaping keeps a
    gradient on low-probability expert tokens (§3.3 of the paper).
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    pi = per_token_logps.exp()
    return -advantages * (pi / (pi + gamma))


def load_traces(trainer, method: str, unsupported=("tools", "rollout_func", "environment_factories")):
    """The expert traces of `trainer.sft_dataset` by rendered prompt (luffy, hpt, relift), and how many of the RL
    prompts pair with one, rendered as GRPO will render them: (traces, matched, total), the counts None when the
    train dataset cannot be listed (an iterable one). Called once `sft_dataset` is tokenized."""
    for name in unsupported:
        if getattr(trainer, name, None):
            raise ValueError(f"method='{method}' does not support `{name}`: its traces are single-turn.")
    decode = lambda ids: trainer._tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    traces = LuffyTraces(trainer.sft_dataset, decode, trainer.args.max_completion_length)
    logger.info("%s: %d distinct prompts carry expert traces", method, len(traces.traces))
    data = trainer.train_dataset
    if not (isinstance(data, Dataset) and "prompt" in data.column_names):
        return traces, None, None
    prompts = data["prompt"]
    matched = sum(
        bool(traces.lookup(ids))
        for start in range(0, len(prompts), 256)
        for ids in trainer._tokenize_prompts(prompts[start : start + 256])[0]
    )
    return traces, matched, len(prompts)


class LuffyMixin:
    """GRPOTrainer hooks for `method="luffy"`: traces into the rollouts before scoring, and the mixed loss."""

    luffy: LuffyTraces | None = None

    def _init_luffy(self) -> None:
        """Called once `self.sft_dataset` is tokenized."""
        if self.args.method != "luffy":
            return
        self.luffy, matched, total = load_traces(self, "luffy")
        self._luffy_off = self._luffy_rows = self._luffy_rewards = None
        if matched is not None:  # without a trace for its prompts, luffy is GRPO
            check_luffy_coverage(matched, total, self.args.luffy_min_trace_coverage, len(self.luffy.traces))

    def _generate_single_turn(
        self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False
    ):
        completion_ids, logprobs = super()._generate_single_turn(
            prompt_ids, images, multimodal_fields, num_generations, has_tool_images
        )
        if self.luffy is None or not self.model.training:
            return completion_ids, logprobs
        offset = self.accelerator.process_index * len(prompt_ids)
        completion_ids, off = substitute_traces(prompt_ids, completion_ids, offset, num_generations,
                                                self.args.luffy_num_off_policy, self.luffy.lookup)  # fmt: skip
        if (
            logprobs is not None
        ):  # no sampling log-prob for a trace: NaN gives a vLLM IS ratio of 1 (masked anyway)
            rows = zip(completion_ids, off, logprobs, strict=True)
            logprobs = [[float("nan")] * len(c) if o else lp for c, o, lp in rows]
        self._luffy_off, self._luffy_rows = off, (prompt_ids, completion_ids)
        return completion_ids, logprobs

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        if getattr(self, "_luffy_off", None) is not None:  # (N, F), gathered in process order: relogged below
            self._luffy_rewards = rewards_per_func
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        self._luffy_off = None
        output = super()._generate_and_score_completions(inputs)
        if self._luffy_off is None:
            return output
        off = torch.tensor(self._luffy_off, dtype=torch.bool, device=self.accelerator.device)  # (B,)
        self._relog_on_policy(off, *self._luffy_rows, self._luffy_rewards)
        self._luffy_off = self._luffy_rows = self._luffy_rewards = None
        output[OFF_POLICY_KEY] = off
        return output

    def _relog_on_policy(self, off_local, prompt_ids, completion_ids, rewards_per_func) -> None:
        """Replace what TRL just logged over the mixed batch by the on-policy rows' values; log the traces apart.

        TRL scored the traces as completions, so its `reward` and `completions/*` would mix the expert's success
        and lengths into the policy's (a reward the policy never earns read 1/G per trace slot). Same formulas as
        TRL's `_generate_and_score_completions`, on the gathered rows whose `off` is False.
        """
        device, gather = self.accelerator.device, self.accelerator.gather
        off = gather(off_local)  # (N,) in process order, as `rewards_per_func`
        on = ~off
        lengths = gather(torch.tensor([len(c) for c in completion_ids], device=device))  # (N,)
        prompt_lengths = gather(torch.tensor([len(p) for p in prompt_ids], device=device))
        ends = [*self.eos_token_ids, self._tokenizer.pad_token_id]
        truncated = gather(torch.tensor([not c or c[-1] not in ends for c in completion_ids], device=device))
        rewards = (rewards_per_func * self.reward_weights.to(device).unsqueeze(0)).nansum(dim=1)  # (N,)
        rewards[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan
        metrics = self._metrics["train"]

        def relog(key: str, value: float) -> None:
            metrics[key][-1] = value  # the entry TRL appended for this generation

        for i, name in enumerate(self.reward_func_names):
            relog(f"rewards/{name}/mean", torch.nanmean(rewards_per_func[on, i]).item())
            relog(f"rewards/{name}/std", nanstd(rewards_per_func[on, i]).item())
        relog("reward", torch.nanmean(rewards[on]).item())
        relog("reward_std", nanstd(rewards[on]).item())
        own = lengths[on].float()
        relog("completions/mean_length", own.mean().item())
        relog("completions/min_length", own.min().item())
        relog("completions/max_length", own.max().item())
        relog("completions/clipped_ratio", truncated[on].float().mean().item())
        finished = lengths[on & ~truncated].float()
        finished = finished if finished.numel() else torch.zeros(1, device=device)
        relog("completions/mean_terminated_length", finished.mean().item())
        relog("completions/min_terminated_length", finished.min().item())
        relog("completions/max_terminated_length", finished.max().item())
        self.state.num_input_tokens_seen -= (prompt_lengths[off] + lengths[off]).sum().item()
        metrics["num_tokens"] = [self.state.num_input_tokens_seen]
        metrics["luffy/traces"].append(off.sum().item())
        metrics["luffy/trace_reward"].append(
            torch.nanmean(rewards[off]).item() if off.any() else float("nan")
        )
        metrics["luffy/trace_length"].append(lengths[off].float().mean().item() if off.any() else 0.0)
        groups = off.numel() / self.num_generations
        metrics["luffy/trace_group_fraction"].append(
            off.sum().item() / self.args.luffy_num_off_policy / groups
        )

    def _luffy_normalizer(self, inputs) -> torch.Tensor | float:
        """The denominator TRL's `_compute_loss` gives the on-policy sum, so both parts share one normaliser."""
        if self.loss_type == "dr_grpo":  # rows × max length, per accumulation micro-step
            rows = inputs["completion_mask"].size(0)
            return rows * self.max_completion_length * self.current_gradient_accumulation_steps
        # 'dapo': the generation batch's tokens, per process, per accumulation micro-step.
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        return normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation

    def _compute_loss(self, model, inputs):
        off = inputs.get(OFF_POLICY_KEY)
        if off is None:
            return super()._compute_loss(model, inputs)
        # GRPO's own loss on the on-policy rows: the off-policy rows are masked out of its token sum through TRL's
        # `tool_mask`, while its normaliser ('dapo': `num_items_in_batch`; 'dr_grpo': rows) still counts them.
        completion_mask = inputs["completion_mask"]  # (B, T)
        on_mask = (~off).to(completion_mask.dtype).unsqueeze(1).expand_as(completion_mask)
        captured = []  # the loss's own forward: (B, T) log-probs with their graph, and entropies
        with observe_logps(self, lambda logps, ent: captured.append((logps, ent)), entropies=True):
            loss = super()._compute_loss(model, {**inputs, "tool_mask": on_mask})
        per_token_logps, entropies = captured[0]  # (B, T) each
        off_mask = completion_mask * off.unsqueeze(1)  # (B, T)
        per_token = off_policy_token_loss(
            per_token_logps, inputs["advantages"], self.args.luffy_shaping_gamma
        )
        loss = loss + (per_token * off_mask).sum() / self._luffy_normalizer(inputs)
        if self.entropy_coef != 0.0:  # TRL's bonus covered the on-policy tokens; the reference's covers all
            accumulation = self.current_gradient_accumulation_steps
            on = completion_mask * on_mask

            def mean_entropy(m):
                return (entropies * m).sum() / m.sum().clamp(min=1.0) / accumulation

            loss = loss + self.entropy_coef * (mean_entropy(on) - mean_entropy(completion_mask))

        prob_sum = (per_token_logps.detach().exp() * off_mask).sum()
        stats = self.accelerator.reduce(torch.stack([prob_sum, off_mask.sum().float()]), reduction="sum")
        if stats[1] > 0:
            self._metrics["train"]["luffy/off_policy_prob"].append((stats[0] / stats[1]).item())
        return loss
