"""Rendering evaluation results: the paper's Table 1 as markdown, and a bar chart.

A results file is the JSON that `python -m bridge_trl.maths.evaluate` writes: `name` (the table row), and
`scores`, a mapping from benchmark key to accuracy in percent. Several files make one table, one row
per model, so runs made separately can be compared.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

# Benchmark key -> column title, in the paper's Table 1 order.
BENCHMARK_TITLES = {
    "math500": "MATH 500",
    "minerva_math": "Minerva Math",
    "olympiadbench": "Olympiad Bench",
    "aime24": "AIME24",
    "amc23": "AMC23",
}


def load_results(paths: list[str | Path]) -> list[dict]:
    """Read results files; a file without `name` or `scores` is an error that names it."""
    results = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        for key in ("name", "scores"):
            if key not in data:
                raise ValueError(f"{path} is not an evaluation results file: it has no {key!r} field.")
        results.append(data)
    return results


def average(scores: dict[str, float]) -> float | None:
    """The mean over the five benchmarks present in `scores` (None when none is)."""
    values = [scores[k] for k in BENCHMARK_TITLES if k in scores]
    return sum(values) / len(values) if values else None


def render_table(results: list[dict]) -> str:
    """A markdown table: one row per model, columns as in the paper's Table 1, accuracies in percent.

    A benchmark a model was not evaluated on shows as `–`; its Average then covers the others, and is
    marked with `*`.
    """
    header = ["Model", *BENCHMARK_TITLES.values(), "Average"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for result in results:
        scores = result["scores"]
        cells = [f"{scores[k]:.1f}" if k in scores else "–" for k in BENCHMARK_TITLES]
        avg = average(scores)
        complete = all(k in scores for k in BENCHMARK_TITLES)
        cells.append("–" if avg is None else f"{avg:.1f}" + ("" if complete else "*"))
        lines.append("| " + " | ".join([str(result["name"]), *cells]) + " |")
    if any(not all(k in r["scores"] for k in BENCHMARK_TITLES) for r in results):
        lines.append("")
        lines.append("\\* average over the benchmarks evaluated.")
    return "\n".join(lines) + "\n"


def plot_results(results: list[dict], path: str | Path) -> Path:
    """A grouped bar chart (benchmarks and Average on the x axis, one bar per model), saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on training nodes
    import matplotlib.pyplot as plt

    columns = [*BENCHMARK_TITLES, "average"]
    titles = [*BENCHMARK_TITLES.values(), "Average"]
    width = 0.8 / max(1, len(results))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(columns)), 4.0))
    for i, result in enumerate(results):
        scores = {**result["scores"], "average": average(result["scores"])}
        xs = [j + (i - (len(results) - 1) / 2) * width for j in range(len(columns))]
        ys = [scores.get(k) or 0.0 for k in columns]
        bars = ax.bar(xs, ys, width=width, label=str(result["name"]))
        labels = [f"{y:.1f}" if scores.get(k) is not None else "" for k, y in zip(columns, ys, strict=True)]
        ax.bar_label(bars, labels=labels, fontsize=7)
    ax.set_xticks(range(len(columns)), titles)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    logger.info("Wrote %s", path)
    return path
