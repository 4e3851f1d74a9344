"""`bridge-trl eval maths|logic|ood`: the evaluation commands, one per kit, and the one that combines kits.

`maths` and `logic` are the kits' own commands (`bridge_trl.maths.evaluate`, `bridge_trl.logic.evaluate`); `ood`
is the shared code-and-science command (`bridge_trl.evals.evaluate`) with the maths kit's five benchmarks added
as loaders. All three run on one skeleton, `bridge_trl.evals.runner.run_cli`. The shared path never imports a kit:
this module, above them, combines them.
"""

from __future__ import annotations

import sys

from ..evals import evaluate as shared

COMMANDS = ("maths", "logic", "ood")


def load_maths(name: str, args, closers: list):
    """A maths benchmark (the training prompt, math-verify) as a loader of the shared command."""
    from ..maths.evaluate import load_benchmark, maths_benchmark
    from ..maths.rewards import MathVerifier

    problems = load_benchmark(name, args.data_dir, args.sources.get(name), args.limit)
    verifier = MathVerifier(timeout_s=args.verify_timeout_s)
    closers.append(verifier.close)
    return maths_benchmark(name, problems, args.prompt_template, verifier)


def _maths_args(p) -> None:
    from ..maths.prompts import DEFAULT_TEMPLATE, PROMPT_TEMPLATES

    p.add_argument(
        "--prompt_template", default=DEFAULT_TEMPLATE, choices=list(PROMPT_TEMPLATES), help="maths"
    )
    p.add_argument("--verify_timeout_s", type=float, default=10.0, help="maths: time limit per answer check")


def ood_main(argv: list[str] | None = None) -> dict | None:
    """Maths, code and science in one table: `bridge-trl eval ood --benchmarks aime24 humaneval gpqa_diamond`."""
    from ..maths.eval_report import BENCHMARK_TITLES

    loaders = {**dict.fromkeys(BENCHMARK_TITLES, load_maths), **shared.LOADERS}
    titles = {**BENCHMARK_TITLES, **shared.TITLES}
    return shared.main(argv, loaders, titles, _maths_args, prog="bridge-trl eval ood")


def main(argv: list[str] | None = None) -> dict | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv else None
    if command == "maths":
        from ..maths.evaluate import main as maths_main

        return maths_main(argv)
    if command == "logic":
        from ..logic.evaluate import main as logic_main

        return logic_main(argv)
    if command == "ood":
        return ood_main(argv)
    sys.stderr.write(f"usage: bridge-trl eval {{{','.join(COMMANDS)}}} [--help] ...\n")
    raise SystemExit(0 if command in ("-h", "--help") else 2)
