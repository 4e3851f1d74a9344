"""A short BRIDGE run on the built-in arithmetic task, on the CPU, in under a minute, with no downloads.

    python examples/bridge_tiny.py                       # defaults below
    python examples/bridge_tiny.py --max_steps 100 --bridge_lambda 0.3

Every `BridgeConfig` field is a flag. The script writes a tiny random-weight model to `<output_dir>/base`, trains
it with BRIDGE through the ordinary `from_pretrained` path, saves θ and w, and plots the `bridge/` metrics, the upper level's diagnostics among them.
"""

import logging
import os
from dataclasses import dataclass, field

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from trl import TrlParser  # noqa: E402

from bridge_trl import BridgeConfig, BridgeTrainer  # noqa: E402
from bridge_trl.tiny import build_tiny_model, build_tokenizer  # noqa: E402
from bridge_trl.toy import arithmetic_datasets, boxed_exact_match  # noqa: E402

logger = logging.getLogger("bridge_tiny")


@dataclass
class TinyArgs:
    hidden_size: int = field(default=64, metadata={"help": "Hidden size of the tiny Qwen2 model."})
    num_layers: int = field(default=2, metadata={"help": "Number of transformer layers."})
    num_problems: int = field(default=256, metadata={"help": "RL prompts and SFT traces to generate (each)."})


# Top row: the training curves; bottom row: the upper level's diagnostics (`bridge_trl.diagnostics`, README "Is the
# upper level working in my run?"). Curves sharing a panel are drawn together; log-scale panels are marked.
PANELS = [
    (["reward"], False), (["bridge/sft_loss"], False), (["bridge/rl_loss"], False),
    (["bridge/cooperative_gain"], False),
    (["bridge/gain_grad_ratio"], False), (["bridge/gain_grad_cos"], False),
    (["bridge/shadow_drift", "bridge/adapter_share"], False), (["bridge/adapter_update", "bridge/theta_update"], True),
]  # fmt: skip


def plot_metrics(log_history: list[dict], path: str) -> None:
    fig, axes = plt.subplots(2, len(PANELS) // 2, figsize=(4 * len(PANELS) // 2, 6))
    for ax, (keys, log_scale) in zip(axes.flat, PANELS, strict=True):
        for key in keys:
            points = [(h["step"], h[key]) for h in log_history if key in h]
            if points:
                ax.plot(*zip(*points, strict=True), marker=".", label=key.removeprefix("bridge/"))
        ax.set_title(" & ".join(k.removeprefix("bridge/") for k in keys) + (" (log)" if log_scale else ""))
        if log_scale:
            ax.set_yscale("log")
        if len(keys) > 1:
            ax.legend(fontsize=7)
        ax.set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(tiny_args: TinyArgs, training_args: BridgeConfig) -> None:
    base_dir = os.path.join(training_args.output_dir, "base")
    tokenizer = build_tokenizer()
    model = build_tiny_model(tokenizer, hidden_size=tiny_args.hidden_size, num_hidden_layers=tiny_args.num_layers,
                             intermediate_size=2 * tiny_args.hidden_size, seed=training_args.seed)  # fmt: skip
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)

    rl, sft, _ = arithmetic_datasets(num_rl=tiny_args.num_problems, num_sft=tiny_args.num_problems)
    trainer = BridgeTrainer(
        base_dir, boxed_exact_match, args=training_args, train_dataset=rl, sft_dataset=sft
    )
    trainer.train()
    trainer.save_model()
    plot_metrics(trainer.state.log_history, os.path.join(training_args.output_dir, "bridge_metrics.png"))

    steps = [h for h in trainer.state.log_history if "bridge/sft_loss" in h]
    first, last = steps[0], steps[-1]
    for key in (
        "reward",
        "bridge/sft_loss",
        "bridge/rl_loss",
        "bridge/shadow_rl_loss",
        "bridge/cooperative_gain",
        "bridge/gain_grad_ratio",
        "bridge/shadow_drift",
        "bridge/adapter_share",
        "bridge/adapter_update",
        "bridge/theta_update",
    ):
        logger.info(
            "%-26s step %3d: %8.4f   step %3d: %8.4f", key, first["step"], first[key], last["step"], last[key]
        )
    logger.info("Saved θ to %s, w to %s/adapter, metrics plot to %s/bridge_metrics.png",
                training_args.output_dir, training_args.output_dir, training_args.output_dir)  # fmt: skip


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = TrlParser((TinyArgs, BridgeConfig))
    parser.set_defaults(
        output_dir="runs/bridge_tiny", max_steps=200, per_device_train_batch_size=16, num_generations=8,
        max_completion_length=24, learning_rate=3e-3, adapter_learning_rate=3e-3, bridge_lambda=0.5,
        logging_steps=10, save_strategy="no", report_to="none", bf16=False, use_cpu=True, disable_tqdm=False,
        per_device_sft_batch_size=8, gradient_checkpointing=False,
    )  # fmt: skip
    main(*parser.parse_args_and_config())
