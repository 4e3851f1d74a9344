"""Learning-rate tuning for the toy reproduction: the same log grid and number of trials for every method, scored
on the validation split over several seeds, with an edge optimum flagged and the grid extended until interior.

Methods with two update kinds tune one rate and tie the second to it by a fixed ratio, so they get the same number
of trials as single-rate methods. BRIDGE: β = α (the paper's recipes). Alternating: its SFT rate is its RL rate times
`sft_ratio` = (sft's tuned lr) / (rl's tuned lr), fixed from the single-kind sweeps, which therefore run first.
Cold start the same way: its SFT phase's rate (`sft_learning_rate`) is its RL phase's rate times `sft_ratio` (the
trainer starts its RL phase with a fresh optimizer and schedule, as a separate GRPO run on the SFT model would).
chord, mix and luffy have one rate.
"""

from __future__ import annotations

import json
import math
import os
import statistics

TUNED_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned.json")

# The second rate of two-rate methods: its config field, and whether it scales with sft_ratio (else equals lr).
SECOND_RATE = {
    "bridge": ("adapter_learning_rate", False),
    "alternating": ("sft_learning_rate", True),
    "cold_start": ("sft_learning_rate", True),
}


def _nice(x: float) -> float:
    """`x` rounded in log space to the nearest 1·10^k or 3·10^k: grids read 1e-5, 3e-5, 1e-4, ..."""
    k = math.floor(math.log10(x))
    best = min((1, 3, 10), key=lambda c: abs(math.log10(x / 10**k / c)))
    return float(f"{best * 10.0**k:.1g}")


def log_grid(low: float, high: float, per_decade: int = 2) -> list[float]:
    """Points from `low` to `high` spaced evenly in log10, `per_decade` per decade (both ends included)."""
    n = round(math.log10(high / low) * per_decade)
    return [_nice(low * 10 ** (i / per_decade)) for i in range(n + 1)]


def extend(grid: list[float], side: str) -> float:
    """The next grid point beyond `side` ('low' or 'high'), at the grid's own spacing (in half decades)."""
    ratio = 10 ** (round(2 * math.log10(grid[1] / grid[0])) / 2)
    return _nice(grid[0] / ratio if side == "low" else grid[-1] * ratio)


def lrs_for(method: str, lr: float, sft_ratio: float = 1.0) -> dict:
    """The learning rates of one trial: `learning_rate` and, for two-rate methods, the tied second rate."""
    lrs = {"learning_rate": lr}
    if method in SECOND_RATE:
        name, scaled = SECOND_RATE[method]
        lrs[name] = float(f"{lr * sft_ratio:.3g}") if scaled else lr
    return lrs


def score(scores: dict[float, list[float]]) -> dict[float, float]:
    """Mean validation accuracy over seeds at each lr."""
    return {lr: statistics.fmean(v) for lr, v in scores.items() if v}


def best_and_edge(scores: dict[float, list[float]]) -> tuple[float, str | None]:
    """The best lr (ties go to the smaller lr) and which edge of the grid it sits on ('low', 'high' or None)."""
    means = score(scores)
    grid = sorted(means)
    best = max(grid, key=lambda lr: (means[lr], -lr))
    if len(grid) > 1 and best == grid[0]:
        return best, "low"
    if len(grid) > 1 and best == grid[-1]:
        return best, "high"
    return best, None


def method_record(
    method: str,
    scores: dict[float, list[float]],
    extensions: list[str],
    limit_hit: bool,
    sft_ratio: float = 1.0,
) -> dict:
    """What the committed record keeps per method; `tuned` is False while the optimum is on an edge."""
    best, edge = best_and_edge(scores)
    means = score(scores)
    return {
        "grid": sorted(means),
        "scores": {f"{lr:g}": [round(x, 4) for x in scores[lr]] for lr in sorted(scores)},
        "mean_scores": {f"{lr:g}": round(means[lr], 4) for lr in sorted(means)},
        "best": best,
        "learning_rates": lrs_for(method, best, sft_ratio),
        "edge": edge,
        "tuned": edge is None,
        "extensions": extensions,
        "extension_limit_hit": limit_hit,
    }


def run_sweep(
    methods: list[str],
    grid: list[float] | dict[str, list[float]],
    seeds: list[int],
    evaluate,
    max_extensions: int = 3,
    sft_ratio: float = 1.0,
) -> dict:
    """Tune each method on `grid`; `evaluate(cells)` trains [(method, seed, lrs)] on the validation split and
    returns their final accuracies in order. A best lr on the grid's edge extends that method's grid by one point
    on that side, up to `max_extensions` times; every trial and extension is recorded."""
    grid = grid if isinstance(grid, dict) else dict.fromkeys(methods, grid)  # one grid, or one per method
    grids = {m: list(grid[m]) for m in methods}
    scores = {m: {} for m in methods}
    extensions = {m: [] for m in methods}
    pending = {m: list(grid[m]) for m in methods}
    while any(pending.values()):
        cells = [(m, s, lr) for m in methods for lr in pending[m] for s in seeds]
        accs = evaluate([(m, s, lrs_for(m, lr, sft_ratio)) for m, s, lr in cells])
        for (m, _, lr), acc in zip(cells, accs, strict=True):
            scores[m].setdefault(lr, []).append(acc)
        pending = {m: [] for m in methods}
        for m in methods:
            _, edge = best_and_edge(scores[m])
            if edge and len(extensions[m]) < max_extensions:
                new = extend(sorted(grids[m]), edge)
                grids[m].append(new)
                extensions[m].append(f"{edge}: added {new:g}")
                pending[m] = [new]
    return {
        m: method_record(m, scores[m], extensions[m], bool(best_and_edge(scores[m])[1]), sft_ratio)
        for m in methods
    }


def load_tuned(path: str = TUNED_PATH) -> dict:
    with open(path) as f:
        return json.load(f)


def tuned_lrs(method: str, record: dict | None = None) -> dict:
    """The learning rates the demo uses for `method`; raises when the committed record has no tuned value."""
    record = record or load_tuned()
    entry = record["methods"].get(method)
    if entry is None:
        raise KeyError(f"{method!r} has no entry in {TUNED_PATH}: run `examples/reproduce_toy.py --sweep`.")
    return entry["learning_rates"]
