"""One (method, seed) run of the toy reproduction: held-out greedy accuracy along training, consumption, time,
memory, and the training reward and completion length over steps (the paper's Figure 3 analogue)."""

from __future__ import annotations

import ctypes
import gc
import hashlib
import json
import logging
import multiprocessing
import os
import resource
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback

from .base import greedy_accuracy
from .task import boxed_exact_match

logger = logging.getLogger(__name__)


class AccuracyCallback(TrainerCallback):
    """Greedy held-out accuracy at step 0, every `every` optimizer steps, at `extra_steps` and at the last step; `seconds` is the
    time spent evaluating, taken out of the run's wall time."""

    def __init__(self, tokenizer, dataset, every: int, max_new_tokens: int = 28, extra_steps=()):
        self.tokenizer, self.dataset, self.every, self.max_new_tokens = (
            tokenizer,
            dataset,
            every,
            max_new_tokens,
        )
        self.extra_steps = set(extra_steps)  # the report's 20% and 50% points, whatever `every` is
        self.points: list[tuple[int, float]] = []
        self.seconds = 0.0

    def _evaluate(self, step: int, model) -> None:
        if self.points and self.points[-1][0] == step:
            return
        start = time.perf_counter()
        acc = greedy_accuracy(model, self.tokenizer, self.dataset, self.max_new_tokens)
        self.seconds += time.perf_counter() - start
        self.points.append((step, acc))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._evaluate(state.global_step, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if step % self.every == 0 or step in self.extra_steps or step >= state.max_steps:
            self._evaluate(state.global_step, model)


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> tuple[float, bool]:
    """Release freed heap memory and reset the kernel's peak-RSS mark (`/proc/self/clear_refs`), so one worker
    can measure the peak of each run in turn; returns (current RSS in MB, whether the reset worked)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    return (_status_kb("VmRSS") or 0) / 1024, reset


def peak_rss_mb() -> float:
    """Peak resident set size since the last `reset_peak_rss` (VmHWM), else `ru_maxrss`, in MB."""
    hwm = _status_kb("VmHWM")
    return (hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def training_state_mb(trainer) -> float:
    """MB held by parameters, gradients, optimizer states and (BRIDGE) θ̂ with its optimizer state: unlike RSS it
    excludes the interpreter and libraries, so methods compare directly."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()

    for p in trainer.model.parameters():
        add(p)
        add(p.grad)
    for opt in (trainer.optimizer, getattr(trainer, "shadow_optimizer", None)):
        for state in opt.state.values() if opt is not None else ():
            for value in state.values():
                add(value)
    for t in getattr(getattr(trainer, "shadow", None), "params", None) or ():
        add(t)
    return total / 2**20


def single_thread_worker(threads: int = 1) -> None:
    """Process initializer: one torch thread (or `threads`) and no per-worker progress bars. A 0.3M-parameter model
    gains little from a second thread, and OpenMP threads stall whenever another job holds a core; runs use the
    cores instead. A second thread changes the reduction order of every parallel kernel: a perturbation test.
    The main process shows one bar for all runs, so the workers' "Loading weights" and dataset bars are silenced."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault(
        "DS_ACCELERATOR", "cpu"
    )  # the demo runs on the CPU; DeepSpeed warns when it guesses
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations inside transformers/TRL, per run
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    logging.getLogger("bridge_trl").setLevel(logging.WARNING)


@dataclass
class ToyRunSettings:
    """The budget every method shares: same steps, prompts per step, rollouts per prompt and SFT batch."""

    # 30 steps (phase 1: 80) so that 8 methods x 5 seeds fit in 10 min on 2 cores; chosen on base E, whose SFT
    # format switch was done by step 4, before the 20% point (step 6). On the shipped base F at SFT's tuned rate it
    # is not (CALIBRATION.md, phase 3).
    max_steps: int = 30
    eval_every: int = 15  # plus the 20% point: evaluations at steps 0, 6, 15, 30 (each costs ~1.3 s)
    prompts_per_step: int = 4
    rollouts_per_prompt: int = 8
    sft_batch_size: int = 64  # SFT is cheap per step (0.3 s vs 1.5 s for RL); 16 made it slower than RL
    max_completion_length: int = 28  # the longest trace, 9+9=18,18+9=27.\\boxed{27}, is 26 tokens with EOS
    temperature: float = 1.0
    beta: float = 0.0  # KL coefficient (GRPO's default; the paper's recipes use none either)
    bridge_lambda: float = 0.5
    cold_start_sft_ratio: float = 0.5
    lora_rank: int = 8
    # chord: the CHORD reference's μ schedule scaled to the budget (peak 0.9 at step 0, cosine decay to 0.05 over
    # the whole budget, no warm-up), with the plain NLL (CHORD-μ, `chord_phi=False`): φ is the reference's
    # alternative for a constant μ, and the schedule is what makes CHORD's SFT-then-RL shape.
    chord_mu_peak: float = 0.9
    chord_mu_valley: float = 0.05
    chord_phi: bool = False
    # luffy: 1 of the G rollouts of each group replaced by the prompt's paired trace, γ = 0.1 (the paper's), and the
    # rest of the reference's training script (ElliottYan/LUFFY exp_scripts/train.sh): no std scaling of the
    # advantages, the loss over the maximum response length (TRL's dr_grpo), an entropy bonus of 0.001.
    luffy_num_off_policy: int = 1
    luffy_shaping_gamma: float = 0.1
    luffy_loss_type: str = "dr_grpo"
    luffy_scale_rewards: str = "none"
    luffy_entropy_coef: float = 0.001
    # relift: an SFT update once one step's worth of prompts (4) has failed, the reference script's ratio (buffer
    # 128 = its 128 prompts per step); its script's loss settings are LUFFY's three above, applied to it too.
    relift_buffer_size: int = 4
    # hpt: the reference's `switch` settings (switch_gate 0: SFT on the trace only for a prompt none of whose G
    # rollouts is correct, i.e. earns the 1.0 of `boxed_exact_match`; sft_loss_coef 1.0); its script's loss
    # settings are LUFFY's three above (TsinghuaC3I/Unify-Post-Training exp_scripts/train.sh sets the same).
    hpt_switch_gate: int = 0
    hpt_sft_coef: float = 1.0
    # cold start's switch: 'ratio' (cold_start_sft_ratio), or 'val_loss' with that ratio as the cap
    cold_start_switch: str = "ratio"
    cold_start_val_size: float = 0.1
    cold_start_eval_steps: int = 2
    cold_start_patience: int = 2
    # The studies' knobs (`bridge_trl.toy.studies`); the defaults are the demo's.
    # λ(k): 'constant' (bridge_lambda), or 'linear'/'cosine' from lambda_start to bridge_lambda at the last step
    lambda_schedule: str = "constant"
    lambda_start: float = 0.0
    reward_flip_prob: float = 0.0  # training reward flipped with this probability (`NoisyReward`, run seed)
    adapter: bool = False  # a LoRA adapter w for a method other than bridge (bridge always has one)
    extra_eval_steps: tuple[int, ...] = ()  # more evaluations (plateau: right after cold start's switch)


def method_args(method: str, lrs: dict, seed: int, settings: ToyRunSettings, output_dir: str):
    """The `BridgeConfig` of one run. `lrs` holds `learning_rate` and optionally a second rate (BRIDGE's
    `adapter_learning_rate`, alternating's `sft_learning_rate`); a missing second rate equals the first."""
    from ..config import BridgeConfig

    lr = lrs["learning_rate"]
    return BridgeConfig(
        output_dir=output_dir, method=method, seed=seed, data_seed=seed,  # paired: seed fixes every data order
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.prompts_per_step * settings.rollouts_per_prompt,
        num_generations=settings.rollouts_per_prompt, per_device_sft_batch_size=settings.sft_batch_size,
        max_completion_length=settings.max_completion_length, temperature=settings.temperature, beta=settings.beta,
        learning_rate=lr, adapter_learning_rate=lrs.get("adapter_learning_rate", lr),
        sft_learning_rate=lrs.get("sft_learning_rate", lr),
        # Constant lr: a decay would hand cold start's RL phase a smaller lr than RL-zero gets.
        lr_scheduler_type="constant", bridge_lambda=settings.bridge_lambda,
        lambda_schedule=settings.lambda_schedule, lambda_start=settings.lambda_start, lambda_warmup_ratio=1.0,
        # θ̂ on θ's rollouts without an importance ratio (the paper's estimator), and HF generation through the
        # unmerged adapter: the rules every committed toy number (tuned.json, the demo, the studies) was measured
        # under; the library's defaults are 'truncate' and merged generation (README).
        shadow_importance_sampling="none",
        merge_adapter_for_generation=False,  # merged layers round otherwise, so they would sample other tokens
        cold_start_sft_ratio=settings.cold_start_sft_ratio, chord_mu_peak=settings.chord_mu_peak,
        chord_mu_valley=settings.chord_mu_valley, chord_mu_warmup_steps=0, chord_mu_decay_steps=settings.max_steps,
        chord_phi=settings.chord_phi, luffy_num_off_policy=settings.luffy_num_off_policy,
        luffy_shaping_gamma=settings.luffy_shaping_gamma, logging_steps=1, save_strategy="no", report_to="none",
        # TRL's defaults for every method but luffy, which runs as its reference does (`ToyRunSettings`)
        loss_type=settings.luffy_loss_type if method in ("luffy", "relift", "hpt") else "dapo",
        scale_rewards=settings.luffy_scale_rewards if method in ("luffy", "relift", "hpt") else "group",
        entropy_coef=settings.luffy_entropy_coef if method in ("luffy", "relift", "hpt") else 0.0,
        hpt_switch_gate=settings.hpt_switch_gate, hpt_sft_coef=settings.hpt_sft_coef,
        relift_buffer_size=settings.relift_buffer_size, cold_start_switch=settings.cold_start_switch,
        cold_start_val_size=settings.cold_start_val_size, cold_start_eval_steps=settings.cold_start_eval_steps,
        cold_start_patience=settings.cold_start_patience,
        bf16=False, use_cpu=True, disable_tqdm=True,
    )  # fmt: skip


def run_method(method: str, seed: int, lrs: dict | float, base_path: str, splits: dict, settings: ToyRunSettings,
               output_dir: str, eval_split: str = "test", arm: str | None = None) -> dict:  # fmt: skip
    """Train `method` from the base at `base_path` and return its JSON-able record (`arm`: a study's label for
    this configuration, default the method)."""
    from peft import LoraConfig

    from ..noisy_reward import NoisyReward
    from ..trainer import BridgeTrainer

    lrs = {"learning_rate": lrs} if isinstance(lrs, float) else dict(lrs)
    rss_start, rss_reset = reset_peak_rss()
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    model = AutoModelForCausalLM.from_pretrained(base_path)
    # Only BRIDGE has an adapter (its upper level); the baselines train θ alone, as in the paper (the parts study
    # gives mix one too: `settings.adapter`).
    peft_config = (LoraConfig(r=settings.lora_rank, lora_alpha=settings.lora_rank, lora_dropout=0.0,
                              target_modules="all-linear", task_type="CAUSAL_LM")
                   if method == "bridge" or settings.adapter else None)  # fmt: skip
    # Noise on the training reward only: the accuracy callback scores greedy completions with its own matcher.
    reward = (NoisyReward(boxed_exact_match, settings.reward_flip_prob, seed=seed)
              if settings.reward_flip_prob > 0 else boxed_exact_match)  # fmt: skip
    marks = (
        round(0.2 * settings.max_steps),
        round(0.5 * settings.max_steps),
    )  # the report's 20% / 50% points
    callback = AccuracyCallback(tokenizer, splits[eval_split], settings.eval_every, settings.max_completion_length,
                                (*marks, *settings.extra_eval_steps))  # fmt: skip
    run_dir = os.path.join(output_dir, f"{arm or method}-seed{seed}")
    trainer = BridgeTrainer(model, reward, processing_class=tokenizer, peft_config=peft_config,
                            args=method_args(method, lrs, seed, settings, run_dir),
                            train_dataset=splits["rl"], sft_dataset=splits["sft"], callbacks=[callback])  # fmt: skip
    trainer.remove_callback(
        PrinterCallback
    )  # with tqdm off, HF prints every step's logs; the record keeps them
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start - callback.seconds
    record = _record(method, seed, lrs, trainer, callback, settings, eval_split)
    record["arm"] = arm or method
    if isinstance(reward, NoisyReward):  # the realised flip rate over every training reward of the run
        record["flip_rate"] = reward.flips / max(1, reward.flippable)
    record.update(seconds_per_step=wall / max(1, trainer.state.global_step), train_seconds=wall,
                  eval_seconds=callback.seconds, peak_rss_mb=peak_rss_mb(),
                  peak_rss_above_start_mb=peak_rss_mb() - rss_start if rss_reset else None,
                  training_state_mb=training_state_mb(trainer))  # fmt: skip
    del trainer, model
    gc.collect()
    return record


def _series(history: list[dict], key: str) -> list[tuple[int, float]]:
    return [(h["step"], float(h[key])) for h in history if key in h and "step" in h]


UPPER_LEVEL_DIAGNOSTICS = ("bridge/gain_grad_ratio", "bridge/gain_grad_cos", "bridge/shadow_drift",
                           "bridge/adapter_share", "bridge/adapter_update", "bridge/theta_update")  # fmt: skip


def _record(method, seed, lrs, trainer, callback, settings, eval_split) -> dict:
    """Join the accuracy points with the logged consumption counters (cumulative, one log per step)."""
    history = trainer.state.log_history
    logs = {h["step"]: h for h in history if "step" in h and "loss" in h}
    keys = ("bridge/sft_samples", "bridge/rl_samples", "bridge/sft_tokens", "bridge/rl_tokens")

    def consumed(step: int, key: str) -> float:
        return float(logs[step].get(key, 0.0)) if step in logs else 0.0

    last = trainer.state.global_step
    gains = _series(history, "bridge/cooperative_gain")
    luffy = _series(history, "luffy/trace_group_fraction")
    return {
        "method": method, "seed": seed, "learning_rate": lrs["learning_rate"], "learning_rates": lrs,
        "eval_split": eval_split, "settings": asdict(settings), "steps": last,
        "final_accuracy": callback.points[-1][1],
        "curve": [(step, consumed(step, keys[0]) + consumed(step, keys[1]), acc) for step, acc in callback.points],
        "sft_samples": consumed(last, keys[0]), "rl_samples": consumed(last, keys[1]),
        "sft_tokens": consumed(last, keys[2]), "rl_tokens": consumed(last, keys[3]),
        "reward_curve": _series(history, "reward"),
        "completion_length_curve": _series(history, "completions/mean_length"),
        "cooperative_gain_mean": sum(g for _, g in gains) / len(gains) if gains else None,
        "cooperative_gain_curve": gains,
        "luffy_trace_group_fraction": sum(f for _, f in luffy) / len(luffy) if luffy else None,
        # Issue 27: the upper level's per-step diagnostics, where the trainer logs them (read-only: they do not
        # change training); {key: [(step, value)]}, only the keys present.
        "diagnostics": {k: v for k in UPPER_LEVEL_DIAGNOSTICS if (v := _series(history, k))},
    }  # fmt: skip


@dataclass(frozen=True)
class Cell:
    """One run to make: `method` at `lrs` with `seed` under `settings`; `arm` labels it in a study's tables."""

    method: str
    seed: int
    lrs: dict | float
    settings: ToyRunSettings
    arm: str | None = None


def data_fingerprint(splits: dict, split: str) -> str:
    """A short hash of what a run reads besides its cell: the RL prompts, the SFT traces (a study may slip them)
    and the evaluation split, so that a cached record is reused only for the same data."""
    h = hashlib.sha256()
    for name in ("rl", "sft", split):
        data = splits[name]
        for column in sorted(data.column_names):
            h.update(f"{name}/{column}".encode())
            h.update(json.dumps(data[column], default=str).encode())
    return h.hexdigest()[:16]


def cell_key(cell: Cell, fingerprint: str, split: str) -> str:
    """File name of a cell's cached record: arm, seed and a hash of everything that determines the run."""
    what = {"method": cell.method, "seed": cell.seed, "lrs": cell.lrs, "settings": asdict(cell.settings),
            "split": split, "data": fingerprint}  # fmt: skip
    digest = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{cell.arm or cell.method}-seed{cell.seed}-{digest}.json"


def run_cells(cells: list[Cell], base_path: str, splits: dict, split: str, runs_dir: str, workers: int = 2,
              threads: int = 1, desc: str = "Runs", reuse: bool = False) -> list[dict]:  # fmt: skip
    """Train every cell in `workers` processes: one progress bar, one line per finished run; records in cell
    order. Each finished record is written at once to `runs_dir/records/` (a long study killed half-way keeps its
    finished runs); `reuse=True` loads a cell's record from there instead of training it again, when one exists
    for the same cell, settings and data (`cell_key`)."""
    records = {}
    cache = os.path.join(runs_dir, "records")
    os.makedirs(cache, exist_ok=True)
    fingerprint = data_fingerprint(splits, split)
    paths = [os.path.join(cache, cell_key(c, fingerprint, split)) for c in cells]
    todo = []
    for i, path in enumerate(paths):
        if reuse and os.path.exists(path):
            with open(path) as f:
                records[i] = json.load(f)
        else:
            todo.append(i)
    if todo:
        context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked OpenMP state
        with ProcessPoolExecutor(workers, mp_context=context, initializer=single_thread_worker,
                                 initargs=(threads,)) as pool:  # fmt: skip
            futures = {pool.submit(run_method, cells[i].method, cells[i].seed, cells[i].lrs, base_path, splits,
                                   cells[i].settings, runs_dir, split, cells[i].arm): i for i in todo}  # fmt: skip
            bar = tqdm(total=len(futures), desc=desc)
            for future in as_completed(futures):
                r = future.result()
                i = futures[future]
                records[i] = r
                with open(paths[i] + ".tmp", "w") as f:
                    json.dump(r, f)
                os.replace(paths[i] + ".tmp", paths[i])
                luffy = r.get("luffy_trace_group_fraction")
                bar.write(f"{r['arm']:<14} seed {r['seed']} lr {r['learning_rate']:g}: {split} accuracy "
                          f"{100 * r['curve'][0][2]:.1f}% → {100 * r['final_accuracy']:.1f}%, "
                          f"{r['seconds_per_step']:.3f} s/step"
                          + (f", luffy trace groups {luffy:.2f}" if luffy is not None else ""))  # fmt: skip
                bar.update()
            bar.close()
    # JSON turns tuples into lists: a reused record reads like a fresh one after the same round trip
    return [json.loads(json.dumps(records[i])) for i in range(len(cells))]
