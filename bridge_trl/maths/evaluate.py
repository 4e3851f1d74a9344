r"""Evaluate a model on the paper's five benchmarks: `bridge-trl eval maths --model PATH_OR_ID`.

MATH500, Minerva Math, OlympiadBench (English text-only maths), AIME24 and AMC23. Decoding is greedy
pass@1 by default with the paper's token limit for 3B models (5,120 new tokens; use 8192 for 8B);
`--num_samples k` (optionally per benchmark, `--samples_per_benchmark aime24=32`) reports avg@k with
sampling. Prompts use the training template (`--prompt_template`). Answers are scored by the same
math-verify reward as training (`bridge_trl.maths.rewards`), in killable worker processes.

Generation runs on vLLM when it is installed and a GPU is present, else on batched Hugging Face
`generate` on any device. `--adapter` loads a PEFT adapter over `--model` and merges it first.

Outputs in `--output_dir`: `results.json` (every problem's completions, extracted answers and verdicts,
plus `scores`), `results.md` (the paper's Table 1 layout) and `results.png` (a bar chart). Results of
several runs render into one table with `--results a.json b.json` (alone, nothing is generated).
"""

from __future__ import annotations

import argparse
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..evals.generation import (
    VLLMGenerator,
    add_generation_args,
    default_name,  # noqa: F401  (part of this module's API)
    generate_hf,
    load_model,
    pick_backend,
)
from ..evals.generation import stop_token_ids as _stop_token_ids  # noqa: F401  (kept under its old name)
from ..evals.report import write_outputs  # noqa: F401  (part of this module's API)
from ..evals.runner import Benchmark, run_benchmark, run_cli, sampling_for
from .eval_report import BENCHMARK_TITLES, average, load_results, plot_results, render_table  # noqa: F401
from .prompts import DEFAULT_TEMPLATE, PROMPT_TEMPLATES, format_prompt, get_template
from .rewards import MathVerifier, last_boxed

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchmarkSpec:
    """Where a benchmark lives on the hub. Field names differ between copies, so they are looked up by
    preference: questions in `problem`/`question`; golds in `answer`, `final_answer` (OlympiadBench, a
    list) or, failing both, the last `\\boxed{}` of `solution` (Minerva Math's local copy)."""

    hub_id: str
    split: str
    config: str | None = None


BENCHMARKS = {
    "math500": BenchmarkSpec("HuggingFaceH4/MATH-500", "test"),
    "minerva_math": BenchmarkSpec("math-ai/minervamath", "test"),
    "olympiadbench": BenchmarkSpec("Hothan/OlympiadBench", "train", "OE_TO_maths_en_COMP"),
    "aime24": BenchmarkSpec("HuggingFaceH4/aime_2024", "train"),
    "amc23": BenchmarkSpec("math-ai/amc23", "test"),
}
QUESTION_FIELDS = ("problem", "question")
ANSWER_FIELDS = ("answer", "final_answer")


def _filled(row: dict) -> list[str]:
    """The fields a row really has: `datasets` fills fields missing from some rows with None."""
    return sorted(k for k, v in row.items() if v not in (None, "", []))


def _gold_from_row(row: dict, name: str, index: int) -> Any:
    for field in ANSWER_FIELDS:
        if row.get(field) not in (None, "", []):
            return row[field]
    if isinstance(row.get("solution"), str):
        boxed = last_boxed(row["solution"])
        if boxed:
            return boxed.replace("$", "").strip()  # `$` inside a box is a typo (one Minerva gold has `+$ $`)
    raise ValueError(
        f"{name} row {index}: no gold answer (looked for {', '.join(ANSWER_FIELDS)}, or a \\boxed{{}} in "
        f"'solution'); non-empty fields present: {_filled(row)}."
    )


def load_benchmark(
    name: str, data_dir: str | Path | None = None, source: str | None = None, limit=None
) -> list[dict]:
    """The problems of benchmark `name` as dicts with `question` and `gold`.

    From `source` (a hub id or local path) if given, else `<data_dir>/<name>/test.jsonl`, else the hub.
    """
    from datasets import load_dataset

    from .data import load_source

    if name not in BENCHMARKS:
        raise ValueError(f"Unknown benchmark {name!r}; valid: {', '.join(BENCHMARKS)}.")
    spec = BENCHMARKS[name]
    if source is None and data_dir is not None:
        source = str(Path(data_dir) / name / "test.jsonl")
        if not Path(source).exists():
            raise FileNotFoundError(
                f"{source} not found (--data_dir expects <data_dir>/<benchmark>/test.jsonl)."
            )
    if source is None:
        rows = load_dataset(spec.hub_id, spec.config, split=spec.split)
    elif Path(source).expanduser().exists():
        rows = load_source(source)
    else:
        rows = load_dataset(source, split=spec.split)
    problems = []
    for index, row in enumerate(rows):
        if limit is not None and index >= limit:
            break
        question = next(
            (row[f] for f in QUESTION_FIELDS if isinstance(row.get(f), str) and row[f].strip()), None
        )
        if question is None:
            raise ValueError(
                f"{name} row {index}: no question text (looked for {', '.join(QUESTION_FIELDS)}); "
                f"non-empty fields present: {_filled(row)}."
            )
        problems.append({"index": index, "question": question, "gold": _gold_from_row(row, name, index)})
    logger.info("%s: %d problems from %s", name, len(problems), source or spec.hub_id)
    return problems


# --------------------------------------------------------------------------------------------------
# The evaluation, on the shared generation path (bridge_trl.evals)
# --------------------------------------------------------------------------------------------------
def _samples_for(name: str, args: argparse.Namespace) -> int:
    for item in args.samples_per_benchmark or []:
        key, _, value = item.partition("=")
        if key == name:
            return int(value)
    return args.num_samples


def _cut_invented_question(text: str) -> str:
    """A base model prompted without a chat template may go on to invent the next "Question:"."""
    return re.split(r"\n\s*Question:", text)[0]


def maths_benchmark(
    name: str, problems: list[dict], template, verifier: MathVerifier, title: str | None = None
) -> Benchmark:
    """A maths benchmark for `bridge_trl.evals.runner`: the training prompt, scored by math-verify.

    Each sample gets `extracted` (the answer math-verify read) and `correct`.
    """
    template = get_template(template)

    def score(problems: list[dict], completions: list[list[str]]) -> list[list[dict]]:
        n = len(completions[0]) if completions else 0
        verdicts = verifier.verify(
            [p["gold"] for p in problems for _ in range(n)], [c for cs in completions for c in cs]
        )
        return [
            [{"extracted": v.extracted, "correct": v.correct} for v in verdicts[i * n : (i + 1) * n]]
            for i in range(len(problems))
        ]

    return Benchmark(
        name=name,
        problems=problems,
        build_prompt=lambda p: format_prompt(p["question"], template),
        score=score,
        title=title or BENCHMARK_TITLES.get(name, name),
        postprocess=None if template.conversational else _cut_invented_question,
    )


def evaluate(args: argparse.Namespace) -> dict:
    """Generate, score and summarise; returns the results dict that `main` writes as JSON."""
    import torch

    torch.manual_seed(args.seed)
    sources = dict(item.split("=", 1) for item in args.source or [])
    benchmarks = {
        name: load_benchmark(name, args.data_dir, sources.get(name), args.limit) for name in args.benchmarks
    }
    backend = pick_backend(args.backend)
    logger.info("Backend: %s", backend)
    if backend == "vllm":
        generator = VLLMGenerator(args.model, args.adapter, args)
        tokenizer = generator.tokenizer
    else:
        lm, tokenizer = load_model(args.model, args.adapter, args.dtype, args.device)

    def generate(texts: list[str], n: int, sampling: dict) -> list[list[str]]:
        if backend == "vllm":
            return generator(texts, n, sampling, args.seed)
        return generate_hf(
            lm, tokenizer, texts, n, sampling, args.batch_size
        )  # looked up here: tests patch it

    template = get_template(args.prompt_template)
    verifier = MathVerifier(timeout_s=args.verify_timeout_s)
    results = {"name": args.name, "model": args.model, "adapter": args.adapter, "backend": backend,
               "config": {k: v for k, v in vars(args).items() if k != "results"}, "scores": {}, "benchmarks": {}}  # fmt: skip
    try:
        for name, problems in benchmarks.items():
            n = _samples_for(name, args)
            sampling = sampling_for(n, args.temperature, args.top_p, args.max_new_tokens)
            before = verifier.num_timeouts
            entry = run_benchmark(
                maths_benchmark(name, problems, template, verifier), generate, tokenizer, n, sampling
            )
            entry["verify_timeouts"] = verifier.num_timeouts - before
            results["scores"][name] = entry["accuracy"]
            results["benchmarks"][name] = entry
            logger.info("%s: %.1f%% (avg@%d)", name, entry["accuracy"], n)
    finally:
        verifier.close()
    results["average"] = average(results["scores"])
    return results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bridge-trl eval maths", description=__doc__.split("\n")[0])
    add_generation_args(p, max_new_tokens=5120)
    p.add_argument("--benchmarks", nargs="+", default=list(BENCHMARKS), choices=list(BENCHMARKS))
    p.add_argument("--data_dir", help="local copies laid out as <data_dir>/<benchmark>/test.jsonl")
    p.add_argument(
        "--source", action="append", metavar="NAME=ID_OR_PATH", help="override one benchmark's source"
    )
    p.add_argument("--limit", type=int, help="evaluate only the first N problems of each benchmark")
    p.add_argument("--prompt_template", default=DEFAULT_TEMPLATE, choices=list(PROMPT_TEMPLATES))
    p.add_argument("--num_samples", type=int, default=1, help="samples per problem; >1 reports avg@k")
    p.add_argument("--samples_per_benchmark", nargs="*", metavar="NAME=K", help="e.g. aime24=32 amc23=8")
    p.add_argument("--temperature", type=float, help="default: 0 (greedy) for 1 sample, 0.6 for several")
    p.add_argument("--verify_timeout_s", type=float, default=10.0, help="hard time limit per answer check")
    p.add_argument("--output_dir", help="default: eval_results/<name>")
    p.add_argument("--results", nargs="+", help="results.json files to add to the table (alone: render only)")
    return p


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for item in (args.samples_per_benchmark or []) + (args.source or []):
        key, sep, value = item.partition("=")
        if key not in BENCHMARKS or not sep or not value:
            parser.error(f"{item!r}: expected NAME=VALUE with NAME one of {', '.join(BENCHMARKS)}")


def main(argv: list[str] | None = None) -> dict | None:
    """`bridge-trl eval maths` (`python -m bridge_trl.maths.evaluate`): the shared `run_cli` skeleton."""
    return run_cli(build_parser(), argv, lambda args, _closers: evaluate(args),
                   lambda rows: (render_table(rows), BENCHMARK_TITLES, {}), _check)  # fmt: skip


if __name__ == "__main__":
    main()
