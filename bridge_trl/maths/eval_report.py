"""The maths evaluation's report: the paper's Table 1 as markdown, and a bar chart.

A results file is the JSON that `python -m bridge_trl.maths.evaluate` writes: `name` (the table row), and
`scores`, a mapping from benchmark key to accuracy in percent. Several files make one table, one row
per model, so runs made separately can be compared. The rendering is the shared `bridge_trl.evals.report`.
"""

from __future__ import annotations

from pathlib import Path

from ..evals import report
from ..evals.report import load_results  # noqa: F401  (part of this module's API)

# Benchmark key -> column title, in the paper's Table 1 order.
BENCHMARK_TITLES = {
    "math500": "MATH 500",
    "minerva_math": "Minerva Math",
    "olympiadbench": "Olympiad Bench",
    "aime24": "AIME24",
    "amc23": "AMC23",
}


def average(scores: dict[str, float]) -> float | None:
    """The mean over the five benchmarks present in `scores` (None when none is)."""
    return report.average(scores, BENCHMARK_TITLES)


def render_table(results: list[dict]) -> str:
    """A markdown table: one row per model, columns as in the paper's Table 1, accuracies in percent.

    A benchmark a model was not evaluated on shows as `–`; its Average then covers the others, and is
    marked with `*`.
    """
    return report.render_table(results, BENCHMARK_TITLES)


def plot_results(results: list[dict], path: str | Path) -> Path:
    """A grouped bar chart (benchmarks and Average on the x axis, one bar per model), saved as PNG."""
    return report.plot_results(results, path, BENCHMARK_TITLES)
