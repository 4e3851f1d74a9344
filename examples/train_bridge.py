"""Train with BRIDGE, or one of the paper's baselines, from a YAML recipe.

    accelerate launch --config_file configs/accelerate/zero3.yaml --num_processes 4 \\
        examples/train_bridge.py --config configs/recipes/Qwen2.5-3B/bridge.yaml

`task: maths` (the default) trains on maths prompts and traces with the math-verify reward; `task: logic` on
Knights-and-Knaves puzzles (`bridge_trl.logic`: the training split's prompts for RL and its solver-written traces
for SFT, the binary `logic_reward`; the splits are written to `logic_data_dir` when absent).

Every field of `ScriptArguments`, `BridgeConfig` and TRL's `ModelConfig` can be set in the recipe or overridden on
the command line (`--learning_rate 1e-6`).
"""

import logging
import os
import shlex
from dataclasses import dataclass, field

import datasets
import transformers
from datasets import concatenate_datasets, load_dataset
from transformers import AutoTokenizer
from trl import ModelConfig, TrlParser, get_peft_config

from bridge_trl import BridgeConfig, BridgeTrainer, NoisyReward, default_peft_config
from bridge_trl.logic.data import ensure_splits, load_split
from bridge_trl.logic.evaluate import main as logic_evaluate_main
from bridge_trl.logic.rewards import LogicReward
from bridge_trl.maths.data import (
    DEEPMATH_HUB_ID,
    LIMR_HUB_ID,
    MATH_HUB_ID,
    load_rl_dataset,
    load_sft_dataset,
    load_solutions_sft_dataset,
)
from bridge_trl.maths.evaluate import main as evaluate_main
from bridge_trl.maths.rewards import make_accuracy_reward

logger = logging.getLogger(__name__)

# Short names for the paper's RL sets; anything else is a hub id or a local path.
RL_SOURCES = {"limr": LIMR_HUB_ID, "math": MATH_HUB_ID}


TASKS = ("maths", "logic")


@dataclass
class ScriptArguments:
    task: str = field(
        default="maths",
        metadata={
            "help": "'maths': the fields below choose the data; 'logic': Knights and Knaves from `logic_data_dir` "
            "(the RL and SFT fields other than the caps are then unused)."
        },
    )
    logic_data_dir: str = field(
        default="data/logic",
        metadata={
            "help": "logic: the splits' folder (`python -m bridge_trl.logic.data`); written when absent."
        },
    )
    rl_datasets: list[str] = field(
        default_factory=lambda: ["limr"],
        metadata={"help": "RL prompt sets: 'limr', 'math' (MATH levels 3-5), hub ids or local files/dirs."},
    )
    sft_dataset: str = field(
        default=DEEPMATH_HUB_ID,
        metadata={
            "help": "SFT source: DeepMath-103K (hub id or local copy) or a TRL SFT dataset (`sft_format`)."
        },
    )
    sft_format: str = field(
        default="deepmath",
        metadata={
            "help": "'deepmath': R1 traces paired with the RL queries, as in the paper; 'trl': a dataset already "
            "in TRL's SFT format (`prompt`/`completion` or `messages`); 'solutions': problems with worked "
            "solutions (`problem`/`solution`, e.g. MATH), rendered with `prompt_template`."
        },
    )
    pair_sft_with_rl: bool = field(
        default=True,
        metadata={
            "help": "deepmath: keep traces of the RL queries only (the paper); else DeepMath's own questions."
        },
    )
    prompt_template: str = field(
        default="qwen-boxed",
        metadata={"help": "SimpleRL prompt format: 'qwen-boxed', 'qwen-math-cot', 'abel' or 'chat'."},
    )
    think: str = field(
        default="strip_tags", metadata={"help": "What to do with <think> in traces: strip_tags, keep, drop."}
    )
    max_rl_samples: int | None = field(default=None, metadata={"help": "Cap on RL prompts (for quick runs)."})
    max_sft_samples: int | None = field(default=None, metadata={"help": "Cap on SFT questions (quick runs)."})
    reward_correct: float = field(default=1.0, metadata={"help": "Reward of a verified answer."})
    reward_incorrect: float = field(
        default=0.0, metadata={"help": "Reward otherwise: 0 as in the experiments, -1 for Eq. 3."}
    )
    reward_timeout_s: float = field(default=10.0, metadata={"help": "Time limit per verified completion."})
    reward_flip_prob: float = field(
        default=0.0,
        metadata={
            "help": "Flip the training reward with this probability (NoisyReward: a verified answer's reward "
            "becomes `reward_incorrect` and vice versa), to test robustness to noisy rewards (the paper's p = 0.2). "
            "Evaluation always uses the clean reward."
        },
    )
    reward_flip_seed: int | None = field(
        default=None,
        metadata={
            "help": "Seed of the flips (default: `seed`), so that runs with the same seed see the same noise."
        },
    )
    eval_after_training: bool = field(
        default=False,
        metadata={
            "help": "Score the trained policy: maths on the five benchmarks (bridge_trl.maths.evaluate), logic "
            "on the evaluation split (bridge_trl.logic.evaluate)."
        },
    )
    eval_args: str = field(
        default="",
        metadata={
            "help": "Extra flags of that evaluation, e.g. '--data_dir DIR --limit 50' (maths), '--limit 20' (logic)."
        },
    )


def load_rl(script_args: ScriptArguments):
    sets = [
        load_rl_dataset(
            RL_SOURCES.get(name, name), template=script_args.prompt_template, limit=script_args.max_rl_samples
        )
        for name in script_args.rl_datasets
    ]
    return concatenate_datasets(sets) if len(sets) > 1 else sets[0]


def load_sft(script_args: ScriptArguments):
    if script_args.sft_format == "trl":
        source = script_args.sft_dataset
        builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(os.path.splitext(source)[1])
        data = (
            load_dataset(builder, data_files=source, split="train")
            if builder
            else load_dataset(source, split="train")
        )
        return data.select(range(min(len(data), script_args.max_sft_samples or len(data))))
    if script_args.sft_format == "solutions":
        return load_solutions_sft_dataset(
            script_args.sft_dataset, template=script_args.prompt_template, limit=script_args.max_sft_samples
        )
    if script_args.sft_format != "deepmath":
        raise ValueError(
            f"Unknown `sft_format` {script_args.sft_format!r}: use 'deepmath', 'trl' or 'solutions'."
        )
    rl_sources = (
        [RL_SOURCES.get(n, n) for n in script_args.rl_datasets] if script_args.pair_sft_with_rl else None
    )
    return load_sft_dataset(
        script_args.sft_dataset,
        rl_sources=rl_sources,
        template=script_args.prompt_template,
        think=script_args.think,
        limit=script_args.max_sft_samples,
    )


def main(script_args: ScriptArguments, training_args: BridgeConfig, model_args: ModelConfig) -> None:
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=training_args.get_process_log_level()
    )
    datasets.utils.logging.set_verbosity(training_args.get_process_log_level())
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    logger.info("Method %s on %s", training_args.method, model_args.model_name_or_path)

    # Model: loaded by the trainer from its id, with these kwargs (so the KL reference is a copy of it).
    training_args.model_init_kwargs = {
        "trust_remote_code": training_args.trust_remote_code,
        "revision": model_args.model_revision,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
    }
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.model_name_or_path, revision=model_args.model_revision, padding_side="left",
        trust_remote_code=training_args.trust_remote_code,
    )  # fmt: skip
    # BRIDGE needs its adapter w; the baselines train θ alone unless the recipe asks for LoRA.
    peft_config = get_peft_config(model_args)
    if peft_config is None and training_args.method == "bridge":
        peft_config = default_peft_config()

    # Data and reward
    if script_args.task not in TASKS:
        raise ValueError(f"Unknown `task` {script_args.task!r}: use {' or '.join(map(repr, TASKS))}.")
    if script_args.task == "logic":
        # The same puzzles are RL prompts and SFT traces (the paper pairs them, §4.1); the main process writes
        # the splits first when they are absent, the others then read them.
        with training_args.main_process_first(desc="Knights-and-Knaves splits"):
            ensure_splits(script_args.logic_data_dir)
        # Shuffled (the split is ordered by size), so that `max_*_samples` keep every size.
        train = load_split(script_args.logic_data_dir, "train").shuffle(seed=training_args.seed)
        rl_dataset = train.remove_columns("completion")
        rl_dataset = rl_dataset.select(range(min(len(train), script_args.max_rl_samples or len(train))))
        sft_dataset = train.select_columns(["prompt", "completion"])
        sft_dataset = sft_dataset.select(range(min(len(train), script_args.max_sft_samples or len(train))))
        reward = LogicReward(correct=script_args.reward_correct, incorrect=script_args.reward_incorrect)
        dataset_name = "knights_knaves"
    else:
        rl_dataset = load_rl(script_args)
        sft_dataset = load_sft(script_args)
        reward = make_accuracy_reward(
            correct=script_args.reward_correct, incorrect=script_args.reward_incorrect,
            timeout_s=script_args.reward_timeout_s,
        )  # fmt: skip
        dataset_name = ", ".join(script_args.rl_datasets)
    logger.info("%d RL prompts, %d SFT examples", len(rl_dataset), len(sft_dataset))
    # Only the reward the trainer trains on is noisy: the evaluation after training scores the saved model with its
    # own clean verifier, and NoisyReward returns clean rewards in the trainer's eval mode.
    if script_args.reward_flip_prob:
        seed = training_args.seed if script_args.reward_flip_seed is None else script_args.reward_flip_seed
        reward = NoisyReward(
            reward, script_args.reward_flip_prob, seed=seed,
            levels=(script_args.reward_incorrect, script_args.reward_correct),
        )  # fmt: skip
        logger.info(
            "Training reward flipped with probability %g (seed %d)", script_args.reward_flip_prob, seed
        )

    # Trainer
    trainer = BridgeTrainer(
        model_args.model_name_or_path, reward_funcs=reward, args=training_args, train_dataset=rl_dataset,
        sft_dataset=sft_dataset, processing_class=tokenizer, peft_config=peft_config,
    )  # fmt: skip
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)

    # Save and push: θ at output_dir, w under output_dir/adapter.
    trainer.save_model(training_args.output_dir)
    trainer.create_model_card(dataset_name=dataset_name)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=dataset_name)
    logger.info("Saved to %s", training_args.output_dir)

    # Evaluate on the main process: maths, greedy pass@1 on MATH500, Minerva Math, OlympiadBench, AIME24 and AMC23;
    # logic, greedy accuracy per number of people on the evaluation split.
    if script_args.eval_after_training and trainer.accelerator.is_main_process:
        out = training_args.output_dir
        adapter = (
            ["--adapter", os.path.join(out, "adapter")] if os.path.isdir(os.path.join(out, "adapter")) else []
        )
        del trainer
        if script_args.task == "logic":
            logic_evaluate_main(
                ["--model", out, *adapter, "--data_dir", script_args.logic_data_dir,
                 "--output_dir", os.path.join(out, "eval"), *shlex.split(script_args.eval_args)]
            )  # fmt: skip
            return
        evaluate_main(
            ["--model", out, *adapter, "--prompt_template", script_args.prompt_template,
             "--output_dir", os.path.join(out, "eval"), *shlex.split(script_args.eval_args)]
        )  # fmt: skip


if __name__ == "__main__":
    parser = TrlParser((ScriptArguments, BridgeConfig, ModelConfig))
    main(*parser.parse_args_and_config())
