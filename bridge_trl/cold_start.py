"""Cold start with a measured switch (`cold_start_switch: val_loss`): SFT until its held-out loss saturates, then GRPO.

arXiv 2512.11470 ("Rethinking Expert Trajectory Utilization in LLM Post-training", code LINs-lab/RETU) finds
sequential SFT → RL strongest when the switch comes in SFT's "Stable or Mild Overfitting sub-phase", i.e. once the
validation loss has stopped falling. Its exact sub-phase thresholds were not read (only its abstract was at hand);
the rule below detects the stable sub-phase by patience on the held-out loss.
Here a held-out slice of `sft_dataset` (`cold_start_val_size`, drawn with `seed`) is removed from the SFT stream, so
it is never trained on; every `cold_start_eval_steps` SFT steps its loss is measured (the project's L_SFT: one
token-mean NLL over the whole slice, on every rank's share, summed over ranks, so all ranks decide alike). The SFT
phase ends after `cold_start_patience` evaluations in a row that do not lower the best loss by more than
`cold_start_min_delta` (early stopping's rule, without a rollback to the best weights: the switch is where the loss
stopped improving). The fixed switch (`cold_start_sft_steps`, else `cold_start_sft_ratio` × max_steps) is the cap:
the SFT phase never runs longer.

The SFT phase's learning-rate schedule is planned over the cap, as an SFT run of that length would be, and cut
short at the switch; the RL phase gets the configured schedule over max_steps − switch, from the switch
(`optim.create_scheduler` reads the switch each step). The switch is decided at the end of an optimizer step
(`on_step_end`), before that step's checkpoint is written: the checkpoint carries the tracker (best loss,
evaluations without improvement, switch step; `bridge_state.pt`), so a resumed run switches where an uninterrupted
one does, and one resumed past the switch stays in its RL phase.
"""

from __future__ import annotations

import logging
import math

import torch
from transformers import TrainerCallback

from .sft import SFTStream, collate, sft_loss

logger = logging.getLogger(__name__)

COLD_START_SWITCHES = ("ratio", "val_loss")


def check_val_loss_switch(args) -> None:
    """`BridgeConfig.__post_init__`'s checks of the cold-start switch fields."""
    if args.cold_start_switch not in COLD_START_SWITCHES:
        raise ValueError(
            f"`cold_start_switch` must be one of {COLD_START_SWITCHES}, got {args.cold_start_switch!r}."
        )
    size = args.cold_start_val_size
    if not (0 < size < 1 or (size >= 1 and float(size).is_integer())):
        raise ValueError(
            f"`cold_start_val_size` must be a fraction in (0, 1) or a whole number >= 1, got {size}."
        )
    for name in ("cold_start_eval_steps", "cold_start_patience"):
        if getattr(args, name) < 1:
            raise ValueError(f"`{name}` must be >= 1, got {getattr(args, name)}.")
    if not args.cold_start_min_delta >= 0:
        raise ValueError(f"`cold_start_min_delta` must be >= 0, got {args.cold_start_min_delta}.")


def held_out_split(
    num_examples: int, val_size: float, seed: int, multiple: int = 1
) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices) of `sft_dataset`: a seeded draw of round(val_size × n) (or val_size) rows,
    rounded up to a multiple of `multiple` (the number of processes: every rank then runs the same forwards, which
    ZeRO-3's parameter gathers need)."""
    count = max(1, round(val_size * num_examples)) if val_size < 1 else int(val_size)
    count = -(-count // multiple) * multiple
    if count >= num_examples:
        raise ValueError(
            f"`cold_start_val_size`={val_size} holds out {count} of the {num_examples} SFT examples, leaving none to "
            "train on."
        )
    perm = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[count:]), sorted(perm[:count])


class SaturationTracker:
    """Patience / minimum-delta rule: `update` returns True at the evaluation where the loss is taken to saturate."""

    def __init__(self, patience: int, min_delta: float):
        self.patience, self.min_delta = patience, min_delta
        self.best, self.bad, self.switch_step, self.history = math.inf, 0, None, []

    def update(self, step: int, loss: float) -> bool:
        self.history.append((step, loss))
        if loss < self.best - self.min_delta:
            self.best, self.bad = loss, 0
        else:
            self.bad += 1
        if self.bad >= self.patience and self.switch_step is None:
            self.switch_step = step
            return True
        return False

    def state_dict(self) -> dict:
        return {"best": self.best, "bad": self.bad, "switch_step": self.switch_step, "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.bad, self.switch_step = float(state["best"]), int(state["bad"]), state["switch_step"]
        self.history = [tuple(h) for h in state["history"]]


def refresh_learning_rate(lr_scheduler) -> None:
    """Re-evaluate the schedule at its current step: the Trainer stepped it (the next step's rate) before
    `on_step_end` decided the switch, so the first RL step would otherwise run at the SFT phase's rate."""
    scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate's wrapper
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        return
    groups = scheduler.optimizer.param_groups
    for group, base, factor in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in groups]


class ValLossSwitch(TrainerCallback):
    """Measures the held-out SFT loss during cold start's SFT phase and decides the switch (`switch_step`)."""

    def __init__(self, trainer, held_out):
        self.trainer, self.held_out = trainer, held_out.select_columns(["prompt_ids", "completion_ids"])
        self.tracker = SaturationTracker(trainer.args.cold_start_patience, trainer.args.cold_start_min_delta)

    @property
    def switch_step(self) -> int | None:
        return self.tracker.switch_step

    @torch.no_grad()
    def val_loss(self) -> float:
        """Token-mean NLL of the held-out slice under the current θ (every rank its share, summed over ranks)."""
        t = self.trainer
        world, rank, device = t.accelerator.num_processes, t.accelerator.process_index, t.accelerator.device
        mine = list(range(rank, len(self.held_out), world))
        per = t.args.per_device_sft_batch_size
        sums = torch.zeros(2, dtype=torch.float64, device=device)  # Σ NLL, Σ tokens
        was_training = t.model.training
        t.model.eval()
        try:
            for start in range(0, len(mine), per):
                rows = self.held_out[mine[start : start + per]]
                pairs = zip(rows["prompt_ids"], rows["completion_ids"], strict=True)
                batch = collate([{"prompt_ids": p, "completion_ids": c} for p, c in pairs],
                                t._tokenizer.pad_token_id, 1.0, device)  # fmt: skip
                with t.compute_loss_context_manager():
                    nll = sft_loss(t.model_wrapped, batch, t._fused_sft)
                sums += torch.stack([nll.double(), batch.completion_mask.sum().double()])
        finally:
            t.model.train(was_training)
        sums = t.accelerator.reduce(sums, reduction="sum")
        return (sums[0] / sums[1].clamp(min=1)).item()

    def on_step_end(self, args, state, control, **kwargs):
        step, t = state.global_step, self.trainer
        if self.switch_step is not None:
            return
        cap = t._cold_start_switch()
        metrics = t._metrics["train"]
        if step >= cap:  # the cap: the SFT phase ends here whatever the loss does
            self.tracker.switch_step = cap
        elif step % args.cold_start_eval_steps == 0:
            loss = self.val_loss()
            metrics["cold_start/val_loss"].append(loss)
            if not self.tracker.update(step, loss):
                return
        else:
            return
        metrics["cold_start/switch_step"].append(float(self.switch_step))
        refresh_learning_rate(t.lr_scheduler)
        logger.info("cold start: SFT phase ends after step %d (held-out SFT loss %s); GRPO from step %d.",
                    self.switch_step, self.tracker.history[-1:] or "not measured: the cap", self.switch_step)  # fmt: skip


def init_val_loss_switch(trainer) -> None:
    """`cold_start_switch='val_loss'`: hold out the slice, train the SFT stream on the rest, track its loss."""
    trainer.cold_start_val = None
    args = trainer.args
    if args.method != "cold_start" or args.cold_start_switch != "val_loss":
        return
    train_idx, val_idx = held_out_split(
        len(trainer.sft_dataset), args.cold_start_val_size, args.seed, trainer.accelerator.num_processes
    )
    held_out, trainer.sft_dataset = trainer.sft_dataset.select(val_idx), trainer.sft_dataset.select(train_idx)
    trainer.sft_stream = SFTStream(trainer.sft_dataset, args.seed, args.per_device_sft_batch_size,
                                   args.gradient_accumulation_steps, trainer._tokenizer.pad_token_id)  # fmt: skip
    trainer.cold_start_val = ValLossSwitch(trainer, held_out)
    trainer.add_callback(trainer.cold_start_val)
    logger.info(
        "cold start: %d SFT examples held out for the switch, %d trained on", len(val_idx), len(train_idx)
    )
