"""LUFFY (arXiv 2504.14945): mixed-policy GRPO, expert traces standing in for some of each group's rollouts.

Reference: ElliottYan/LUFFY, `luffy/verl/verl/mix_src`, `compute_token_on_off_policy_loss` (its default
`off_policy_reshape="p_div_p_0.1"`, no off-policy clipping). For each RL prompt with an expert trace in the SFT
set, the last `luffy_num_off_policy` of its G rollouts are replaced by the trace before rewards are computed, so
TRL's own reward and group-advantage code scores the trace like any completion and normalises over the mixed
group (Eq. 4 of the paper). The loss (Eq. 6, with the policy shaping of §3.3) is one token mean over the batch:

    L = (1/N) [ Σ_{on-policy t} GRPO's clipped term  +  Σ_{off-policy t} −Â_i f(π_θ(t)) ],   f(π) = π / (π + γ)

where the behaviour probability of a trace token is taken as 1, so f(π_θ) is its importance weight, unclipped,
and N counts every completion token of the step (on- and off-policy). Off-policy tokens get neither the vLLM
importance-sampling correction nor the old-log-prob ratio clipping, nor the KL term (the paper uses none).

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


class LuffyMixin:
    """GRPOTrainer hooks for `method="luffy"`: traces into the rollouts before scoring, and the mixed loss."""

    luffy: LuffyTraces | None = None

    def _init_luffy(self) -> None:
        """Called once `self.sft_dataset` is tokenized."""
        if self.args.method != "luffy":
            return
        for name in ("tools", "rollout_func", "environment_factories"):
            if getattr(self, name, None):
                raise ValueError(
                    f"method='luffy' does not support `{name}`: traces replace single-turn rollouts."
                )
        decode = lambda ids: self._tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
        self.luffy = LuffyTraces(self.sft_dataset, decode, self.args.max_completion_length)
        self._luffy_off = None
        logger.info("luffy: %d distinct prompts carry expert traces", len(self.luffy.traces))

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
        self._luffy_off = off
        return completion_ids, logprobs

    def _generate_and_score_completions(self, inputs):
        self._luffy_off = None
        output = super()._generate_and_score_completions(inputs)
        if self._luffy_off is None:
            return output
        off = torch.tensor(self._luffy_off, dtype=torch.bool, device=self.accelerator.device)  # (B,)
        self._luffy_off = None
        output[OFF_POLICY_KEY] = off
        counts = torch.stack([off.sum(), torch.tensor(off.numel(), device=off.device)]).float()
        off_rows, rows = self.accelerator.reduce(counts, reduction="sum").tolist()
        groups = rows / self.num_generations
        self._metrics["train"]["luffy/trace_group_fraction"].append(
            off_rows / self.args.luffy_num_off_policy / groups
        )
        return output

    def _compute_loss(self, model, inputs):
        off = inputs.get(OFF_POLICY_KEY)
        if off is None:
            return super()._compute_loss(model, inputs)
        # GRPO's own loss on the on-policy rows: the off-policy rows are masked out of its token sum through TRL's
        # `tool_mask`, while its 'dapo' normaliser (`num_items_in_batch`) still counts them: one token mean.
        completion_mask = inputs["completion_mask"]  # (B, T)
        on_mask = (~off).to(completion_mask.dtype).unsqueeze(1).expand_as(completion_mask)
        captured = []  # the loss's own forward: (B, T) log-probs with their graph
        with observe_logps(self, captured.append):
            loss = super()._compute_loss(model, {**inputs, "tool_mask": on_mask})
        per_token_logps = captured[0]  # (B, T)
        off_mask = completion_mask * off.unsqueeze(1)  # (B, T)
        per_token = off_policy_token_loss(
            per_token_logps, inputs["advantages"], self.args.luffy_shaping_gamma
        )
        # TRL's 'dapo' normaliser: the generation batch's tokens, per process, per accumulation micro-step.
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        loss = loss + (per_token * off_mask).sum() / normalizer

        prob_sum = (per_token_logps.detach().exp() * off_mask).sum()
        stats = self.accelerator.reduce(torch.stack([prob_sum, off_mask.sum().float()]), reduction="sum")
        if stats[1] > 0:
            self._metrics["train"]["luffy/off_policy_prob"].append((stats[0] / stats[1]).item())
        return loss
