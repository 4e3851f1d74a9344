"""Evaluate a model on the Knights-and-Knaves evaluation split: `bridge-trl eval logic --model M`.

Greedy accuracy (one sample; `--samples K --temperature T` gives avg@K and pass@k) per number of people (2-8)
and overall (every puzzle counted once), scored by the training reward (`logic_reward`: every person's role
right, 1/0). Generation, scoring, pass@k and the report are the shared evaluation path (`bridge_trl.evals`,
which the maths evaluation uses too): vLLM when installed and a GPU is present, else batched Hugging Face
`generate`. `--adapter` loads a PEFT adapter over `--model` and merges it first. The prompts are the split's own
(the training prompt, rendered with the tokenizer's chat template).

The split is read from `--data_dir` (default `data/logic`), written there first when absent
(`bridge_trl.logic.data`, about a minute). Outputs in `--output_dir` (default eval_results/<name>):
`results.json` (every completion with its parsed answer and verdict, plus `scores`), `results.md` (one column
per number of people, then Overall) and `results.png` (a bar chart). `--results a.json b.json` adds earlier runs
to the table (alone, nothing is generated).
"""

from __future__ import annotations

import argparse
import logging

from ..evals.generation import add_generation_args
from ..evals.report import render_pass_at_k, render_table
from ..evals.runner import Benchmark, add_sampling_args, evaluate_benchmarks, run_cli
from .data import DEFAULT_DATA_DIR, ensure_splits, load_split
from .rewards import answer_block, completion_text, logic_reward, parse_roles

logger = logging.getLogger(__name__)

OVERALL = "overall"
# Kept from each evaluation row in results.json (the reference trace is left out: it is in the split).
PROBLEM_FIELDS = ("num_people", "names", "roles", "solution", "answer", "statements", "prompt")


def benchmark_key(people: int) -> str:
    return f"kk_{people}ppl"


def titles_for(sizes) -> dict[str, str]:
    """Column titles: one per number of people, then Overall."""
    return {**{benchmark_key(p): f"{p} people" for p in sorted(sizes)}, OVERALL: "Overall"}


def score_completions(problems: list[dict], completions: list[list[str]]) -> list[list[dict]]:
    """Per problem, per completion: `correct` (the training reward) and `extracted` (the roles read, or None)."""
    verdicts = []
    for problem, row in zip(problems, completions, strict=True):
        rewards = logic_reward(
            row, solution=[problem["solution"]] * len(row), names=[problem["names"]] * len(row),
            roles=[problem["roles"]] * len(row),
        )  # fmt: skip
        entries = []
        for completion, reward in zip(row, rewards, strict=True):
            text = completion_text(completion)
            block = answer_block(text) if text else None
            roles = parse_roles(block, problem["names"], problem["roles"]) if block else None
            extracted = None if roles is None else ["knight" if r else "knave" for r in roles]
            entries.append({"correct": reward == 1.0, "extracted": extracted})
        verdicts.append(entries)
    return verdicts


def logic_benchmark(people: int, problems: list[dict]) -> Benchmark:
    """The Benchmark of the `people`-person evaluation puzzles (rows of the evaluation split)."""
    return Benchmark(
        name=benchmark_key(people), title=f"{people} people", problems=problems,
        build_prompt=lambda p: p["prompt"], score=score_completions, extra={"num_people": people},
    )  # fmt: skip


def add_overall(result: dict) -> None:
    """`scores["overall"]`: accuracy over every puzzle evaluated, each counted once (sizes differ: 95 of 2)."""
    entries = [b for key, b in result["benchmarks"].items() if key.startswith("kk_")]
    total = sum(b["num_problems"] for b in entries)
    correct = sum(p["accuracy"] for b in entries for p in b["problems"])
    result["scores"][OVERALL] = 100.0 * correct / total if total else 0.0
    result["num_problems"] = total


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bridge-trl eval logic", description=__doc__.split("\n")[0])
    # 3072: the recipes' max_completion_length; the solver's 8-person traces take 790 tokens (median), 1,560 at most.
    add_generation_args(p, max_new_tokens=3072)
    add_sampling_args(p)
    p.add_argument("--data_dir", default=DEFAULT_DATA_DIR, help="the splits' folder (written when absent)")
    p.add_argument("--num_people", type=int, nargs="+", help="sizes to evaluate (default: all in the split)")
    p.add_argument("--limit", type=int, help="evaluate only the first N puzzles of each size")
    p.add_argument("--output_dir", help="default: eval_results/<name>")
    p.add_argument("--results", nargs="+", help="results.json files to add to the table (alone: render only)")
    return p


def evaluate(args: argparse.Namespace, closers: list | None = None) -> dict:
    """The evaluation split through the shared path; the results dict, with `scores["overall"]`."""
    ensure_splits(args.data_dir)  # a folder of custom splits is used as is
    data = load_split(args.data_dir, "eval", num_people=args.num_people, limit=args.limit)
    keep = [c for c in data.column_names if c in PROBLEM_FIELDS]
    problems = data.select_columns(keep).to_list()
    sizes = sorted({p["num_people"] for p in problems})
    benchmarks = [logic_benchmark(n, [p for p in problems if p["num_people"] == n]) for n in sizes]
    result = evaluate_benchmarks(benchmarks, args)
    add_overall(result)
    return result


def render(rows: list[dict]) -> tuple[str, dict, dict]:
    """results.md: one column per number of people present in any row, Overall, then pass@k."""
    sizes = {int(k[3:-3]) for r in rows for k in r["scores"] if k.startswith("kk_")}
    titles = titles_for(sizes)
    passk = render_pass_at_k(rows, titles)
    table = render_table(rows, titles, average_title=None) + ("\n" + passk if passk else "")
    return table, titles, {"average_title": None}


def main(argv: list[str] | None = None) -> dict | None:
    """`bridge-trl eval logic` (`python -m bridge_trl.logic.evaluate`): the shared `run_cli` skeleton."""
    return run_cli(build_parser(), argv, evaluate, render)


if __name__ == "__main__":
    main()
