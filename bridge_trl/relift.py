"""ReLIFT (arXiv 2506.07527): GRPO on every step, plus SFT updates on the questions RL cannot solve yet.

Reference: TheRoadQaQ/ReLIFT, `relift/verl/verl/relift/trainer.py` (`fit`: `solve_none_uids`, `sft_buffer_batch`)
and `actor.py` (`sft_update_policy`), as `examples/math-7b/train.sh` runs it. Followed here:

- **Criterion.** A prompt enters the buffer when *none* of its G rollouts succeeds: every rollout's reward (TRL's
  weighted sum over `reward_funcs`, an unscorable rollout counting 0) is ≤ `relift_fail_reward` (default 0: the
  reference's `(uid_rewards == fail_value).all()` with its 0/1 math-verify reward, `reward_impl_version=3`). Groups
  are TRL's (consecutive blocks of G rows of the gathered generation batch).
- **Buffer order and overflow.** One example per failed prompt: its rendered prompt and its expert trace. A step's
  new examples go in front of the buffer, in batch order (`DataProto.concat([buffer_batch, sft_buffer_batch])`);
  once it holds ≥ `relift_buffer_size` examples, the first `relift_buffer_size` are trained on and removed, and any
  overflow stays for the next update (the reference's `sft_buffer_batch.slice(range(sft_data_size, ...))`).
- **The SFT update** comes right after the RL update of the step whose rollouts filled the buffer (after the last
  optimizer step that trains on a generation batch, when `steps_per_generation` spans several). It is one optimizer
  step (the reference's `sft_mini_batch_size = sft_data_size`, one epoch) of a separate optimizer of θ's kind at
  a constant `sft_learning_rate` (the reference's SFT AdamW has no scheduler), with θ's weight decay (its SFT AdamW
  decays like the actor's) and clipped at `max_grad_norm`. Micro-batches of `per_device_sft_batch_size` examples.
- **Traces** are paired with RL prompts as LUFFY pairs them (`luffy.LuffyTraces`: the rendered prompt, normalised),
  cut to `max_completion_length` (the reference's `max_target_len` = its response length).

Not followed, and why: the SFT loss is one token mean over the whole update (the project's L_SFT, `sft.sft_loss`),
where verl averages per-micro-batch token means (which depend on its micro-batch size and token balancing; the two
agree when traces have equal lengths); the reference's SFT entropy bonus (`entropy_coeff=0.001`) is not added (it
needs the full logits, which the fused SFT head avoids). With several traces for one prompt, the reference has one
target per prompt; here the prompt takes trace `step mod #traces` (stateless, so resumes are exact). A failed
prompt without a trace is skipped (counted in `relift/failed_untraced`); the reference's prompts all have one.

Several processes: the rewards are gathered (TRL) and the rendered prompts gathered (`gather_object`) in process
order, so every rank derives the same failed prompts and holds the same full buffer; at an SFT update rank r trains
on examples r, r + world, ... (`relift_buffer_size` must be a multiple of the number of processes, so every rank
runs the same number of micro-batches, each all-reduced), normalised by the whole update's tokens / world, so the
averaged gradient is that of one process on the whole buffer. Checkpoints carry the buffer and the update count
(`bridge_state.pt`), and the SFT optimizer's state, so a resumed run continues exactly.
"""

from __future__ import annotations

import logging

import torch
from accelerate.utils import gather_object

from .luffy import LuffyTraces, load_traces
from .sft import collate

logger = logging.getLogger(__name__)


def failed_groups(rewards: torch.Tensor, num_generations: int, fail_reward: float) -> list[int]:
    """Indices of the groups (consecutive blocks of `num_generations` rows) where every reward is ≤ `fail_reward`."""
    grouped = torch.nan_to_num(rewards.double(), nan=0.0).view(-1, num_generations)
    return (grouped <= fail_reward).all(dim=1).nonzero().flatten().tolist()


def push_and_pop(buffer: list, new: list, size: int) -> tuple[list, list | None]:
    """The reference's buffer rule: `new` in front; at ≥ `size` examples, the first `size` leave as an SFT batch.

    Returns (buffer after the step, the SFT batch or None).
    """
    buffer = list(new) + list(buffer)
    if len(buffer) < size:
        return buffer, None
    return buffer[size:], buffer[:size]


class ReliftMixin:
    """GRPOTrainer hooks for `method="relift"`: failed prompts into the buffer, an SFT update when it is full."""

    relift: LuffyTraces | None = None
    relift_sft_updates: int = 0

    def _init_relift(self) -> None:
        """Called once `self.sft_dataset` is tokenized."""
        self.relift_buffer, self.relift_sft_updates, self._relift_rewards = [], 0, None
        if self.args.method != "relift":
            return
        if self.is_deepspeed_enabled:
            raise NotImplementedError(
                "method='relift' steps a second optimizer on θ (its SFT updates); it is not supported under "
                "DeepSpeed. Use DDP."
            )
        world = self.accelerator.num_processes
        if self.args.relift_buffer_size % world:
            raise ValueError(
                f"`relift_buffer_size`={self.args.relift_buffer_size} must be a multiple of the number of processes "
                f"({world}): each rank trains on an equal share of every SFT update."
            )
        # `rollout_func` is allowed: the buffer needs only the rewards and the rendered prompts
        self.relift, matched, total = load_traces(
            self, "relift", unsupported=("tools", "environment_factories")
        )
        if matched == 0:  # a prompt without a trace never enters the buffer: with none, relift is plain GRPO
            raise ValueError(
                f"method='relift': none of the {total} RL prompts has an expert trace in `sft_dataset` "
                "(paired by the rendered prompt, as for luffy), so no failed prompt could be trained on and "
                "the run would be plain GRPO. Give `sft_dataset` the RL prompts' exact text and format."
            )
        if matched is not None:
            logger.info("relift: %d of %d RL prompts have an expert trace", matched, total)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        if self.relift is not None and self.model.training:  # (N, F), gathered in process order
            self._relift_rewards = rewards_per_func
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        self._relift_rewards = None
        output = super()._generate_and_score_completions(inputs)
        if self._relift_rewards is None:
            return output
        weights = self.reward_weights.to(self._relift_rewards.device).unsqueeze(0)
        rewards = (self._relift_rewards * weights).nansum(dim=1).cpu()  # (N,), as TRL sums them
        self._relift_rewards = None
        local = [ids[mask.bool()].tolist() for ids, mask in zip(output["prompt_ids"], output["prompt_mask"],
                                                                strict=True)]  # fmt: skip
        prompt_ids = gather_object(local)  # (N,) rendered prompts, process order: the same list on every rank
        new, untraced = [], 0
        failed = failed_groups(rewards, self.num_generations, self.args.relift_fail_reward)
        for group in failed:
            p_ids = prompt_ids[group * self.num_generations]
            traces = self.relift.lookup(p_ids)
            if not traces:
                untraced += 1
                continue
            new.append((list(p_ids), list(traces[self.state.global_step % len(traces)])))
        self.relift_buffer = list(new) + self.relift_buffer  # emptied in `_relift_after_step`
        metrics = self._metrics["train"]
        metrics["relift/failed_prompts"].append(len(failed))
        metrics["relift/failed_untraced"].append(untraced)
        return output

    def _relift_after_step(self) -> None:
        """After θ's update: the SFT update on the buffer once it is full, at the end of a generation cycle."""
        if self.relift is None:
            return
        generate_every = self.args.steps_per_generation * self.num_iterations
        if self._step % generate_every == 0:  # the generation batch's last optimizer step is done
            self.relift_buffer, batch = push_and_pop(self.relift_buffer, [], self.args.relift_buffer_size)
            if batch is not None:
                self._relift_sft_update(batch)
        self._metrics["train"]["relift/buffer_size"].append(len(self.relift_buffer))

    def _relift_sft_update(self, examples: list) -> None:
        """One SFT optimizer step on `examples` ((prompt ids, trace ids) pairs): L_SFT = Σ NLL / #trace tokens."""
        world, rank, device = (
            self.accelerator.num_processes,
            self.accelerator.process_index,
            self.accelerator.device,
        )
        tokens = sum(len(c) for _, c in examples)
        normalizer = max(tokens, 1) / world  # rank gradients are averaged: Σ_all NLL / N, however it is split
        mine, per = examples[rank::world], self.args.per_device_sft_batch_size
        rows = [
            [{"prompt_ids": p, "completion_ids": c} for p, c in mine[i : i + per]]
            for i in range(0, len(mine), per)
        ]
        batches = (collate(r, self._tokenizer.pad_token_id, normalizer, device) for r in rows)
        # A constant rate (lr factor 1): the reference's SFT optimizer has no scheduler.
        total, norm = self._sft_update(batches, 1.0, "ReLIFT's (on its buffer)")
        self.relift_sft_updates += 1
        self.consumed["sft_samples"] += len(examples)
        self.consumed["sft_tokens"] += tokens
        metrics = self._metrics["train"]
        metrics["relift/sft_loss"].append(total)
        metrics["relift/sft_grad_norm"].append(norm)
        logger.info("relift: SFT update %d at step %d on %d examples (%d tokens), loss %.4f",
                    self.relift_sft_updates, self.state.global_step, len(examples), tokens, total)  # fmt: skip

    def relift_state_dict(self) -> dict:
        return {
            "buffer": [[list(p), list(c)] for p, c in self.relift_buffer],
            "sft_updates": self.relift_sft_updates,
        }

    def load_relift_state_dict(self, state: dict) -> None:
        self.relift_buffer = [(list(p), list(c)) for p, c in state["buffer"]]
        self.relift_sft_updates = int(state["sft_updates"])

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.relift is not None and self.model.training:  # cumulative, like the data counters
            logs["relift/sft_updates"] = float(self.relift_sft_updates)
        super().log(logs, start_time)
