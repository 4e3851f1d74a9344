"""Results files, markdown tables and bar charts for every evaluation (the maths kit's Table 1 included).

A results file is the JSON an evaluation CLI writes: `name` (the table row), `scores` (benchmark key ->
percent), and optionally `benchmarks` (key -> entry with `pass_at_k`: k -> percent). Several files make one
table, one row per model, so runs made separately can be compared.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

logger = logging.getLogger(__name__)


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


def average(scores: Mapping[str, float], keys) -> float | None:
    """The mean over the benchmarks in `keys` present in `scores` (None when none is)."""
    values = [scores[k] for k in keys if k in scores]
    return sum(values) / len(values) if values else None


def render_table(
    results: list[dict], titles: Mapping[str, str], average_title: str | None = "Average"
) -> str:
    """A markdown table: one row per model, one column per key of `titles` (in its order), in percent.

    A benchmark a model was not evaluated on shows as `–`; its average then covers the others, and is
    marked with `*`. `average_title=None` leaves the average column out.
    """
    header = ["Model", *titles.values(), *([average_title] if average_title else [])]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    partial = False
    for result in results:
        scores = result["scores"]
        cells = [f"{scores[k]:.1f}" if k in scores else "–" for k in titles]
        if average_title:
            avg = average(scores, titles)
            complete = all(k in scores for k in titles)
            partial |= not complete
            cells.append("–" if avg is None else f"{avg:.1f}" + ("" if complete else "*"))
        lines.append("| " + " | ".join([str(result["name"]), *cells]) + " |")
    if partial:
        lines.append("")
        lines.append("\\* average over the benchmarks evaluated.")
    return "\n".join(lines) + "\n"


def render_pass_at_k(results: list[dict], titles: Mapping[str, str]) -> str:
    """A markdown table of pass@k (percent): one row per model and benchmark sampled more than once."""
    entries = [
        (r["name"], titles.get(key, key), b["num_samples"], b["pass_at_k"])
        for r in results
        for key, b in r.get("benchmarks", {}).items()
        if b.get("num_samples", 1) > 1 and b.get("pass_at_k")
    ]
    if not entries:
        return ""
    ks = sorted({int(k) for *_, pk in entries for k in pk})
    lines = ["| Model | Benchmark | n | " + " | ".join(f"pass@{k}" for k in ks) + " |",
             "|---|---|---:|" + "---:|" * len(ks)]  # fmt: skip
    for name, title, n, pk in entries:
        cells = [f"{pk[str(k)]:.1f}" if str(k) in pk else "–" for k in ks]
        lines.append(f"| {name} | {title} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_results(
    results: list[dict], path: str | Path, titles: Mapping[str, str], average_title: str | None = "Average"
) -> Path:
    """A grouped bar chart (benchmarks and the average on the x axis, one bar per model), saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on training nodes
    import matplotlib.pyplot as plt

    columns = [*titles, *(["average"] if average_title else [])]
    labels_x = [*titles.values(), *([average_title] if average_title else [])]
    width = 0.8 / max(1, len(results))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(columns)), 4.0))
    for i, result in enumerate(results):
        scores = {**result["scores"], "average": average(result["scores"], titles)}
        xs = [j + (i - (len(results) - 1) / 2) * width for j in range(len(columns))]
        ys = [scores.get(k) or 0.0 for k in columns]
        bars = ax.bar(xs, ys, width=width, label=str(result["name"]))
        labels = [f"{y:.1f}" if scores.get(k) is not None else "" for k, y in zip(columns, ys, strict=True)]
        ax.bar_label(bars, labels=labels, fontsize=7)
    ax.set_xticks(range(len(columns)), labels_x)
    ax.set_ylabel("accuracy / pass@1 (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    logger.info("Wrote %s", path)
    return path


def write_outputs(
    out_dir: str | Path, result: dict | None, table: str, rows: list[dict], titles, **plot_kw
) -> Path:
    """results.json (when a new `result` was computed), results.md (`table`) and results.png in `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if result:
        with open(out_dir / "results.json", "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1, ensure_ascii=False)
    (out_dir / "results.md").write_text(table, encoding="utf-8")
    plot_results(rows, out_dir / "results.png", titles, **plot_kw)
    logger.info("Wrote %s", out_dir)
    return out_dir
