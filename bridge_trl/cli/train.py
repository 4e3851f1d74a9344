"""`bridge-trl train`: train with BRIDGE, or one of the methods it is compared with, from a YAML recipe.

    bridge-trl train --config configs/recipes/Qwen2.5-3B/bridge.yaml
    accelerate launch --config_file configs/accelerate/zero3.yaml --num_processes 4 \\
        -m bridge_trl.cli train --config configs/recipes/Qwen2.5-3B/bridge.yaml

Every field of `ScriptArguments` (data and reward), `BridgeConfig` (BRIDGE's own fields, then GRPOConfig's) and
`ModelConfig` (model and adapter) can be set in the recipe or on the command line (`--learning_rate 1e-6`), as in
TRL's own `trl grpo`. Rewards come as TRL's CLI takes them: `--reward_funcs accuracy my_module.my_reward`
(built-in names or dotted import paths, the current directory importable) with `--reward_weights 1.0 0.5`.

Data: `task: maths` (the default) reads RL problems (`rl_datasets`; `rl_format: problems`: a question and an answer
column, rendered with `prompt_template`; `rl_format: trl`: a TRL prompt dataset used as is, every column passed to
the rewards) and SFT traces (`sft_dataset`, `sft_format`); `task: logic` trains on Knights and Knaves
(`bridge_trl.logic`). `method: rl` loads no SFT data and `method: sft` no reward.
"""

from __future__ import annotations

import importlib
import logging
import os
import shlex
import sys
from dataclasses import dataclass, field

from ..maths.data import DEEPMATH_HUB_ID, LIMR_HUB_ID, MATH_HUB_ID
from .parser import BridgeModelConfig, make_parser

logger = logging.getLogger(__name__)

RL_SOURCES = {"limr": LIMR_HUB_ID, "math": MATH_HUB_ID}  # short names of the paper's RL sets
TASKS = ("maths", "logic")
BUILTIN_REWARDS = ("accuracy", "logic")  # also as TRL spells them: accuracy_reward, logic_reward
DATA_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class ScriptArguments:
    """Data, reward and evaluation: what the run trains on (`bridge-trl train --help` lists these first)."""

    _argument_group_name = "data and reward (ScriptArguments)"

    task: str = field(
        default="maths",
        metadata={
            "help": "'maths': the fields below choose the data; 'logic': Knights and Knaves from `logic_data_dir` "
            "(the RL and SFT fields other than the caps are then unused)."
        },
    )
    reward_funcs: list[str] | None = field(
        default=None,
        metadata={
            "help": "Reward functions, as TRL's CLI takes them: 'accuracy' (math-verify against the `answer` "
            "column), 'logic' (Knights and Knaves), or a dotted import path to your own TRL reward function "
            "('my_module.my_reward'; the current directory is importable). Several are summed with "
            "`reward_weights`. Default: the task's ('accuracy' for maths, 'logic' for logic)."
        },
    )
    rl_datasets: list[str] = field(
        default_factory=lambda: ["limr"],
        metadata={"help": "RL prompt sets: 'limr', 'math' (MATH levels 3-5), hub ids or local files/dirs."},
    )
    rl_format: str = field(
        default="problems",
        metadata={
            "help": "'problems': a question and an answer column, the question rendered with `prompt_template`, "
            "the answer passed to the rewards as `answer`; 'trl': a TRL prompt dataset (`prompt`, a string or "
            "messages) used as is, every other column passed to the rewards by name."
        },
    )
    rl_question_column: str | None = field(
        default=None,
        metadata={
            "help": "problems: the question column (default: the first of problem, question, prompt, ...)."
        },
    )
    rl_answer_column: str | None = field(
        default=None,
        metadata={
            "help": "problems: the answer column, passed to the rewards as `answer` (default: the first of answer, "
            "final_answer, gt_answer, extra_info.answer, reward_model.ground_truth)."
        },
    )
    sft_dataset: str = field(
        default=DEEPMATH_HUB_ID,
        metadata={
            "help": "SFT source: DeepMath-103K (hub id or local copy) or a TRL SFT dataset (`sft_format`). "
            "Unused by method 'rl'."
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
    sft_prompt_column: str | None = field(
        default=None,
        metadata={"help": "trl/solutions: the SFT prompt (question) column, if not `prompt`/`problem`."},
    )
    sft_completion_column: str | None = field(
        default=None,
        metadata={
            "help": "trl/solutions: the SFT completion (trace) column, if not `completion`/`solution`."
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
    logic_data_dir: str = field(
        default="data/logic",
        metadata={
            "help": "logic: the splits' folder (`python -m bridge_trl.logic.data`); written when absent."
        },
    )
    max_rl_samples: int | None = field(default=None, metadata={"help": "Cap on RL prompts (for quick runs)."})
    max_sft_samples: int | None = field(default=None, metadata={"help": "Cap on SFT questions (quick runs)."})
    reward_correct: float = field(
        default=1.0, metadata={"help": "Built-in rewards: reward of a right answer."}
    )
    reward_incorrect: float = field(
        default=0.0,
        metadata={"help": "Built-in rewards: reward otherwise (0 as in the experiments, -1 for Eq. 3)."},
    )
    reward_timeout_s: float = field(
        default=10.0, metadata={"help": "accuracy: time limit per verified completion."}
    )
    reward_flip_prob: float = field(
        default=0.0,
        metadata={
            "help": "Flip each training reward with this probability (NoisyReward: `reward_correct` becomes "
            "`reward_incorrect` and vice versa), to test robustness to noisy rewards (the paper's p = 0.2). "
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
            "help": "Score the trained policy: maths on the five benchmarks (`bridge-trl eval maths`), logic on the "
            "evaluation split (`bridge-trl eval logic`)."
        },
    )
    eval_args: str = field(
        default="",
        metadata={
            "help": "Extra flags of that evaluation, e.g. '--data_dir DIR --limit 50' (maths), '--limit 20' (logic)."
        },
    )


def load_reward_funcs(script_args: ScriptArguments) -> list:
    """TRL's CLI convention: built-in names or dotted paths (`module.function`), importable from the cwd."""
    names = script_args.reward_funcs or ["logic" if script_args.task == "logic" else "accuracy"]
    funcs = []
    for name in names:
        if name.removesuffix("_reward") == "accuracy":
            from ..maths.rewards import make_accuracy_reward

            funcs.append(make_accuracy_reward(correct=script_args.reward_correct,
                                              incorrect=script_args.reward_incorrect,
                                              timeout_s=script_args.reward_timeout_s))  # fmt: skip
        elif name.removesuffix("_reward") == "logic":
            from ..logic.rewards import LogicReward

            funcs.append(
                LogicReward(correct=script_args.reward_correct, incorrect=script_args.reward_incorrect)
            )
        elif "." in name:
            module_path, func_name = name.rsplit(".", 1)
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            try:
                funcs.append(getattr(importlib.import_module(module_path), func_name))
            except (ImportError, AttributeError) as error:
                raise ValueError(f"`reward_funcs`: could not import {name!r} ({error}).") from error
        else:
            raise ValueError(
                f"`reward_funcs`: unknown reward {name!r}. Use a built-in name ({', '.join(BUILTIN_REWARDS)}) or "
                "the dotted import path of your own TRL reward function, e.g. 'my_module.my_reward'."
            )
    return funcs


def _read(source: str, limit: int | None):
    """A local file (jsonl, json, parquet, csv) or a hub dataset's train split, capped at `limit` rows."""
    from datasets import load_dataset

    builder = DATA_SUFFIXES.get(os.path.splitext(source)[1])
    data = (
        load_dataset(builder, data_files=source, split="train")
        if builder
        else load_dataset(source, split="train")
    )
    return data.select(range(min(len(data), limit or len(data))))


def load_rl(script_args: ScriptArguments):
    from datasets import concatenate_datasets

    from ..maths.data import load_rl_dataset

    sets = []
    for name in script_args.rl_datasets:
        source = RL_SOURCES.get(name, name)
        if script_args.rl_format == "trl":
            data = _read(source, script_args.max_rl_samples)
            if "prompt" not in data.column_names:
                raise ValueError(
                    f"{source}: `rl_format: trl` needs a `prompt` column; columns: {data.column_names}."
                )
            sets.append(data)
        elif script_args.rl_format == "problems":
            sets.append(load_rl_dataset(source, template=script_args.prompt_template, limit=script_args.max_rl_samples,
                                        question_column=script_args.rl_question_column,
                                        answer_column=script_args.rl_answer_column))  # fmt: skip
        else:
            raise ValueError(f"Unknown `rl_format` {script_args.rl_format!r}: use 'problems' or 'trl'.")
    return concatenate_datasets(sets) if len(sets) > 1 else sets[0]


def load_sft(script_args: ScriptArguments):
    from ..maths.data import load_sft_dataset, load_solutions_sft_dataset

    if script_args.sft_format == "trl":
        data = _read(script_args.sft_dataset, script_args.max_sft_samples)
        renames = {script_args.sft_prompt_column: "prompt", script_args.sft_completion_column: "completion"}
        return data.rename_columns({k: v for k, v in renames.items() if k and k != v})
    if script_args.sft_format == "solutions":
        return load_solutions_sft_dataset(
            script_args.sft_dataset, template=script_args.prompt_template, limit=script_args.max_sft_samples,
            question_column=script_args.sft_prompt_column, solution_column=script_args.sft_completion_column or "solution",
        )  # fmt: skip
    if script_args.sft_format != "deepmath":
        raise ValueError(
            f"Unknown `sft_format` {script_args.sft_format!r}: use 'deepmath', 'trl' or 'solutions'."
        )
    rl_sources = (
        [RL_SOURCES.get(n, n) for n in script_args.rl_datasets] if script_args.pair_sft_with_rl else None
    )
    return load_sft_dataset(script_args.sft_dataset, rl_sources=rl_sources, template=script_args.prompt_template,
                            think=script_args.think, limit=script_args.max_sft_samples)  # fmt: skip


def load_data(script_args: ScriptArguments, training_args) -> tuple:
    """(RL prompts, SFT examples or None, dataset names for the model card)."""
    needs_sft = training_args.method != "rl"
    if script_args.task not in TASKS:
        raise ValueError(f"Unknown `task` {script_args.task!r}: use {' or '.join(map(repr, TASKS))}.")
    if script_args.task == "logic":
        from ..logic.data import ensure_splits, load_split

        # The same puzzles are RL prompts and SFT traces (the paper pairs them, §4.1); the main process writes
        # the splits first when they are absent, the others then read them.
        with training_args.main_process_first(desc="Knights-and-Knaves splits"):
            ensure_splits(script_args.logic_data_dir)
        # Shuffled (the split is ordered by size), so that `max_*_samples` keep every size.
        train = load_split(script_args.logic_data_dir, "train").shuffle(seed=training_args.seed)
        rl = train.remove_columns("completion").select(
            range(min(len(train), script_args.max_rl_samples or len(train)))
        )
        sft = train.select_columns(["prompt", "completion"])
        sft = (
            sft.select(range(min(len(train), script_args.max_sft_samples or len(train))))
            if needs_sft
            else None
        )
        return rl, sft, ["knights_knaves"]
    rl, sft = load_rl(script_args), load_sft(script_args) if needs_sft else None
    names = [RL_SOURCES.get(n, n) for n in script_args.rl_datasets] + (
        [script_args.sft_dataset] if needs_sft else []
    )
    return rl, sft, names


def peft_config_for(model_args: BridgeModelConfig, method: str):
    """`use_peft` as TRL means it; unset, BRIDGE gets its adapter from the `lora_*` fields and baselines none.

    Returns the `peft_config` keyword to pass (absent: the trainer's default). An explicit `use_peft: false` with
    method 'bridge' is passed on as None, which the trainer refuses with the reason.
    """
    from peft import LoraConfig

    if model_args.use_peft is False:
        return {"peft_config": None}
    if model_args.use_peft is None and method != "bridge":
        return {}
    targets = model_args.lora_target_modules
    return {"peft_config": LoraConfig(
        r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
        target_modules=targets, task_type=model_args.lora_task_type, use_rslora=model_args.use_rslora,
        use_dora=model_args.use_dora, modules_to_save=model_args.lora_modules_to_save, bias="none",
    )}  # fmt: skip


def train(script_args: ScriptArguments, training_args, model_args: BridgeModelConfig):
    """The training run a recipe describes; returns the output folder."""
    import datasets
    import transformers
    from transformers import AutoTokenizer

    from .. import BridgeTrainer, NoisyReward

    level = training_args.get_process_log_level()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level)
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)
    logger.info("Method %s on %s", training_args.method, model_args.model_name_or_path)

    # Model: loaded by the trainer from its id, with these kwargs (so the KL reference is a copy of it).
    training_args.model_init_kwargs = {
        "trust_remote_code": training_args.trust_remote_code, "revision": model_args.model_revision,
        "attn_implementation": model_args.attn_implementation, "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.model_name_or_path, revision=model_args.model_revision, padding_side="left",
        trust_remote_code=training_args.trust_remote_code,
    )  # fmt: skip

    rl_dataset, sft_dataset, names = load_data(script_args, training_args)
    logger.info("%d RL prompts, %d SFT examples", len(rl_dataset), len(sft_dataset) if sft_dataset else 0)
    rewards = load_reward_funcs(script_args) if training_args.method != "sft" else None
    # Only the rewards the trainer trains on are noisy: the evaluation after training scores the saved model with its
    # own clean verifier, and NoisyReward returns clean rewards in the trainer's eval mode.
    if script_args.reward_flip_prob and rewards:
        seed = training_args.seed if script_args.reward_flip_seed is None else script_args.reward_flip_seed
        levels = (script_args.reward_incorrect, script_args.reward_correct)
        rewards = [NoisyReward(r, script_args.reward_flip_prob, seed=seed, levels=levels) for r in rewards]
        logger.info(
            "Training reward flipped with probability %g (seed %d)", script_args.reward_flip_prob, seed
        )

    trainer = BridgeTrainer(
        model_args.model_name_or_path, reward_funcs=rewards, args=training_args, train_dataset=rl_dataset,
        sft_dataset=sft_dataset, processing_class=tokenizer, **peft_config_for(model_args, training_args.method),
    )  # fmt: skip
    trainer.card_datasets = names  # the model card names them (checkpoints' cards too)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)

    # Save and push, as TRL's scripts do: θ at output_dir, w under output_dir/adapter, the card as README.md.
    trainer.save_model(training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=names)
    logger.info("Saved to %s", training_args.output_dir)
    out = training_args.output_dir
    if script_args.eval_after_training and trainer.accelerator.is_main_process:
        del trainer
        evaluate_after_training(script_args, out)
    return out


def evaluate_after_training(script_args: ScriptArguments, out: str) -> None:
    """Maths: greedy pass@1 on the five benchmarks; logic: accuracy per number of people; the policy π(θ, w)."""
    adapter = (
        ["--adapter", os.path.join(out, "adapter")] if os.path.isdir(os.path.join(out, "adapter")) else []
    )
    extra = ["--output_dir", os.path.join(out, "eval"), *shlex.split(script_args.eval_args)]
    if script_args.task == "logic":
        from ..logic.evaluate import main as logic_main

        logic_main(["--model", out, *adapter, "--data_dir", script_args.logic_data_dir, *extra])
        return
    from ..maths.evaluate import main as maths_main

    maths_main(["--model", out, *adapter, "--prompt_template", script_args.prompt_template, *extra])


def main(argv: list[str] | None = None) -> str:
    """`bridge-trl train --config recipe.yaml [--field value ...]`."""
    parser = make_parser(ScriptArguments)
    script_args, training_args, model_args = parser.parse_args_and_config(argv)
    return train(script_args, training_args, model_args)


if __name__ == "__main__":
    main()
