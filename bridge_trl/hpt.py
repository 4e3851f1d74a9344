"""HPT (arXiv 2509.04419, "Towards a Unified View of LLM Post-Training"): per prompt, SFT where RL fails, else GRPO.

Reference: TsinghuaC3I/Unify-Post-Training, `hpt/verl/verl/mix_src`, its `switch` strategy as the published script
`exp_scripts/train.sh` runs it (`unify_strategy=switch`, `switch_gate=0`, `offline_loss_type=sft`,
`sft_loss_coef=1.0`, `grpo_use_std=False`, `loss_remove_token_mean=True`, `loss_remove_clip=True`,
`entropy_coeff=0.001`, no KL). Each RL prompt's G rollouts are scored; a rollout is *correct* when its reward (TRL's
weighted sum over the reward functions) is ≥ `hpt_correct_threshold` (the reference counts `reward ==
success_value`, 1 for its 0/1 reward; an unscorable rollout is not correct). A prompt with at most `hpt_switch_gate`
correct rollouts (`select_on_off_ada_balance`) drops its rollouts and contributes its expert trace to an SFT term;
every other prompt is trained by GRPO on its rollouts. One update on the sum (`mix_actor.update_policy`,
`offline_loss_type == "sft"`):

    L = L_GRPO(rollouts of the GRPO prompts)  +  c · (1/N_sft) Σ_{trace tokens t} −log π_θ(t)

c = `hpt_sft_coef`; the SFT term is a token mean over the traces (`compute_sft_pure_loss`, verl's `masked_mean`),
here over the whole optimizer step (N_sft: every trace token of the generation batch, all processes) rather than
per verl micro-batch. L_GRPO is TRL's loss over the GRPO rows with its own normaliser: with the reference's
`loss_remove_token_mean=True` (the token sum over the maximum response length) TRL's `loss_type="dr_grpo"` (which
also divides by the micro-batch's rows, a constant), with `grpo_use_std=False` `scale_rewards="none"`; `dapo` (one
token mean over the GRPO tokens) is offered too. Not followed: the reference cuts each generation batch (128
prompts) into mini-batches of 64 prompts' rows (verl scales `ppo_mini_batch_size` by n), so about two optimizer
steps per generation, the later one slightly off-policy and unclipped (`loss_remove_clip=True`); here one update
per generation, where the ratio is 1 and TRL's clip never acts. Its two terms are summed per token-budgeted verl
micro-batch without averaging, so their relative scale depends on the packing; here each has the normaliser above.
Log-probs are TRL's, at the rollout temperature, as verl's (`temperature=1.0` in the script). `entropy_coef` (the
reference's `entropy_coeff`) is, as in verl, a mean over every token trained on (GRPO rollouts and traces) per
micro-batch, as TRL's bonus is.

Rows: TRL's batch keeps its shape. In a switched group, the row of slot 0 (global row index ≡ 0 mod G) becomes the
trace (its completion re-padded in place; a trace longer than `max_completion_length` is cut and, like a generation
that hit the limit, masked under `mask_truncated_completions`) and the G − 1 other rows are dropped (completion mask
0). Groups split across processes are decided identically everywhere from the gathered rewards and trace flags. A
prompt without a trace in `sft_dataset` cannot switch: it stays GRPO whatever its rollouts earn (counted as
`hpt/untraced_gated_fraction`); `hpt_min_trace_coverage` is checked before training. Traces are found as LUFFY
finds them (`bridge_trl.luffy.LuffyTraces`: the rendered prompt, normalised); a prompt's first trace is used.

Metrics: `hpt/sft_prompt_fraction` (share of the generation batch's prompts switched to SFT), `hpt/trace_length`,
`hpt/sft_nll` (the SFT term's token mean), `hpt/untraced_gated_fraction`. TRL's `reward`/`completions/*` describe
every rollout generated. Data consumed: traces count as SFT (`bridge/sft_{samples,tokens}`), the GRPO prompts'
rollouts as RL (`bridge/rl_{samples,tokens}`); dropped rollouts as neither.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from .checks import check_luffy_coverage
from .logps import observe_logps
from .luffy import LuffyTraces, load_traces

logger = logging.getLogger(__name__)

HPT_KEY = "hpt_role"  # (B,) long in GRPO's prepared batch: one of the roles below
HPT_SFT_TOKENS_KEY = "hpt_sft_tokens"  # () trace tokens of the whole generation batch, all processes
GRPO_ROW, TRACE_ROW, DROPPED_ROW = 0, 1, 2


def switch_groups(rewards: torch.Tensor, has_trace: torch.Tensor, num_generations: int, gate: int,
                  threshold: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(N,) rewards and trace flags, gathered in process order → (N/G,) `switched` and `gated` per group.

    A group is gated when at most `gate` of its rollouts are correct (reward ≥ `threshold`, NaN never is), and
    switched to SFT when it is gated and its prompt has a trace.
    """
    correct = (rewards >= threshold).view(-1, num_generations).sum(1)
    gated = correct <= gate
    return gated & has_trace.view(-1, num_generations).all(1), gated


def row_roles(switched: torch.Tensor, offset: int, rows: int, num_generations: int) -> torch.Tensor:
    """This process's rows `offset .. offset + rows − 1` of the generation batch → (rows,) roles."""
    index = torch.arange(offset, offset + rows, device=switched.device)
    on = switched[index // num_generations]
    roles = torch.where(index % num_generations == 0, TRACE_ROW, DROPPED_ROW)
    return torch.where(on, roles, GRPO_ROW)


def place_traces(output: dict, traces: dict[int, list[int]], roles: torch.Tensor, pad_id: int, multiple: int | None,
                 mask_truncated: bool, ends: list[int]) -> None:  # fmt: skip
    """Write each trace (row → token ids) into `output`'s completion, widening every (B, T) tensor if needed, and
    mask the dropped rows. Padding of the other per-token tensors is only read on masked positions."""
    ids = output["completion_ids"]
    rows, width = ids.shape
    new = max([width, *map(len, traces.values())])
    new = -(-new // multiple) * multiple if multiple else new
    if new > width:
        for key, value in list(output.items()):
            if torch.is_tensor(value) and value.dim() == 2 and value.shape == (rows, width):
                fill = (
                    pad_id if key == "completion_ids" else (1.0 if key == "importance_sampling_ratio" else 0)
                )
                output[key] = F.pad(value, (0, new - width), value=fill)
    ids, mask = output["completion_ids"], output["completion_mask"]
    for i, trace in traces.items():
        ids[i] = pad_id
        ids[i, : len(trace)] = torch.tensor(trace, device=ids.device)
        mask[i] = 0
        mask[i, : len(trace)] = 0 if mask_truncated and trace[-1] not in ends else 1
    mask[roles == DROPPED_ROW] = 0


class HptMixin:
    """GRPOTrainer hooks for `method="hpt"`: the switch after scoring, and the summed GRPO + SFT loss."""

    hpt: LuffyTraces | None = None

    def _init_hpt(self) -> None:
        """Called once `self.sft_dataset` is tokenized."""
        if self.args.method != "hpt":
            return
        self.hpt, matched, total = load_traces(self, "hpt")
        self._hpt_rewards = None
        if matched is not None:  # without a trace, no prompt can switch
            check_luffy_coverage(
                matched, total, self.args.hpt_min_trace_coverage, len(self.hpt.traces), method="hpt"
            )

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        if self.hpt is not None and self.model.training:  # (N, F), gathered in process order
            self._hpt_rewards = rewards_per_func
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if self.hpt is None or not self.model.training:
            return output
        per_func, self._hpt_rewards = self._hpt_rewards, None
        rewards = (per_func * self.reward_weights.to(per_func.device).unsqueeze(0)).nansum(dim=1)
        rewards[torch.isnan(per_func).all(dim=1)] = torch.nan  # unscorable: not correct
        self._switch_to_sft(output, rewards)
        return output

    def _switch_to_sft(self, output: dict, rewards: torch.Tensor) -> None:
        """Decide the switch per group (`switch_groups`), place the traces, and set the batch's HPT keys."""
        device, gather, g = self.accelerator.device, self.accelerator.gather, self.num_generations
        prompt_ids, prompt_mask = output["prompt_ids"], output["prompt_mask"]
        rows = prompt_ids.size(0)
        found = [
            self.hpt.lookup(ids[m.bool()].tolist()) for ids, m in zip(prompt_ids, prompt_mask, strict=True)
        ]
        has_trace = gather(torch.tensor([bool(t) for t in found], device=device))
        switched, gated = switch_groups(rewards.to(device), has_trace, g, self.args.hpt_switch_gate,
                                        self.args.hpt_correct_threshold)  # fmt: skip
        roles = row_roles(switched, self.accelerator.process_index * rows, rows, g)
        traces = {i: found[i][0] for i in range(rows) if roles[i] == TRACE_ROW}
        place_traces(output, traces, roles, self._tokenizer.pad_token_id, self.pad_to_multiple_of,
                     self.mask_truncated_completions, [*self.eos_token_ids, self._tokenizer.pad_token_id])  # fmt: skip
        mask = output["completion_mask"]
        # GRPO's 'dapo' normaliser counts the GRPO rows' tokens only; the SFT term has its own.
        output["num_items_in_batch"] = gather((mask * (roles == GRPO_ROW).unsqueeze(1)).sum()).sum()
        lengths = [len(t) for t in traces.values()]
        lengths = gather(torch.tensor([sum(lengths), len(lengths)], device=device)).view(-1, 2).sum(0)
        output[HPT_SFT_TOKENS_KEY] = gather((mask * (roles == TRACE_ROW).unsqueeze(1)).sum()).sum()
        output[HPT_KEY] = roles
        metrics = self._metrics["train"]
        metrics["hpt/sft_prompt_fraction"].append(switched.float().mean().item())
        metrics["hpt/untraced_gated_fraction"].append((gated & ~switched).float().mean().item())
        metrics["hpt/trace_length"].append(lengths[0].item() / max(1, lengths[1].item()))

    def _hpt_normalizer(self, inputs) -> torch.Tensor:
        """N_sft for this micro-step: summed over the step's micro-steps and processes (whose gradients DDP averages),
        the SFT term is the token mean over every trace token of the generation batch (as TRL's 'dapo')."""
        normalizer = inputs[HPT_SFT_TOKENS_KEY].clamp(min=1.0) / self.accelerator.num_processes
        return normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation

    def _compute_loss(self, model, inputs):
        roles = inputs.get(HPT_KEY)
        if roles is None:
            return super()._compute_loss(model, inputs)
        completion_mask = inputs["completion_mask"]  # (B, T)
        grpo = (roles == GRPO_ROW).unsqueeze(1)  # (B, 1)
        trace_mask = completion_mask * (roles == TRACE_ROW).unsqueeze(1)
        # GRPO's own loss on the GRPO rows, the others masked out of its token sum through TRL's `tool_mask`. Their
        # old / reference / sampling log-probs (a dropped rollout's, or padding) are set to the current ones, so the
        # ratio and KL that TRL computes (and then masks) on them stay finite.
        inner = {**inputs, "tool_mask": grpo.to(completion_mask.dtype).expand_as(completion_mask)}
        captured = []

        def observe(logps, entropies):
            captured.append((logps, entropies))
            for key in ("old_per_token_logps", "ref_per_token_logps", "sampling_per_token_logps"):
                if inner.get(key) is not None:
                    inner[key] = torch.where(grpo, inner[key], logps.detach())

        with observe_logps(self, observe, entropies=True):
            loss = super()._compute_loss(model, inner)
        per_token_logps, entropies = captured[0]
        nll = -(per_token_logps * trace_mask).sum()
        loss = loss + self.args.hpt_sft_coef * nll / self._hpt_normalizer(inputs)
        if (
            self.entropy_coef != 0.0
        ):  # TRL's bonus covered the GRPO tokens; the reference's covers the traces too
            accumulation, on = self.current_gradient_accumulation_steps, completion_mask * grpo

            def mean_entropy(m):
                return (entropies * m).sum() / m.sum().clamp(min=1.0) / accumulation

            loss = loss + self.entropy_coef * (mean_entropy(on) - mean_entropy(on + trace_mask))
        stats = torch.stack([nll.detach(), trace_mask.sum(), (roles == DROPPED_ROW).sum()]).float()
        stats = self.accelerator.reduce(stats, reduction="sum")
        if stats[1] > 0:
            self._metrics["train"]["hpt/sft_nll"].append((stats[0] / stats[1]).item())
        self.consumed["rl_samples"] -= round(stats[2].item())  # dropped rollouts are not trained on
        return loss
