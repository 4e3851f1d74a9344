"""Statistics for the toy report: t-based 95% confidence intervals, paired differences over seeds, and the verdict
sentence generated from them (scipy is not a dependency, so the t quantile is computed here)."""

from __future__ import annotations

import functools
import math
import statistics


def t_pdf(x: float, df: int) -> float:
    """Student's t density with `df` degrees of freedom."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_c - (df + 1) / 2 * math.log1p(x * x / df))


def t_cdf(x: float, df: int, intervals: int = 4000) -> float:
    """P(T <= x) by Simpson's rule on [0, |x|] (the density is symmetric, so P(T <= 0) = 1/2)."""
    a = abs(x)
    h = a / intervals
    total = t_pdf(0.0, df) + t_pdf(a, df)
    total += sum((4 if i % 2 else 2) * t_pdf(i * h, df) for i in range(1, intervals))
    half = total * h / 3
    return 0.5 + half if x >= 0 else 0.5 - half


@functools.lru_cache(maxsize=64)
def t_quantile(p: float, df: int) -> float:
    """The `p` quantile of Student's t (p > 1/2), by Newton's method on `t_cdf` from 0.

    On x > 0 the CDF is concave, so each tangent step from below the root stays below it: the iteration rises
    monotonically to the root and never overshoots.
    """
    if not 0.5 < p < 1:
        raise ValueError("t_quantile expects 1/2 < p < 1.")
    x = 0.0
    for _ in range(200):
        step = (p - t_cdf(x, df)) / t_pdf(x, df)
        x += step
        if step < 1e-10 * max(1.0, x):
            break
    return x


def mean_ci(values: list[float], level: float = 0.95) -> dict:
    """Mean, sample std and the half-width of the t-based `level` CI of the mean (None with fewer than 2 values)."""
    values = [v for v in values if v is not None]
    n = len(values)
    if n == 0:
        return {"mean": None, "std": None, "ci": None, "n": 0}
    mean = statistics.fmean(values)
    if n < 2:
        return {"mean": mean, "std": None, "ci": None, "n": 1}
    std = statistics.stdev(values)
    half = t_quantile(0.5 + level / 2, n - 1) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "ci": half, "n": n}


def paired_difference(a: dict, b: dict, level: float = 0.95) -> dict:
    """Mean of a[seed] − b[seed] over the seeds both have, with its t-based CI (paired: same seed, same data)."""
    seeds = sorted(set(a) & set(b))
    out = mean_ci([a[s] - b[s] for s in seeds], level)
    out["seeds"] = seeds
    if out["ci"] is not None:
        out["low"], out["high"] = out["mean"] - out["ci"], out["mean"] + out["ci"]
    return out


def verdict(diff: dict) -> str:
    """'beats' when the whole CI of the difference is above 0, 'loses to' when below, else 'ties with'."""
    if diff.get("ci") is None:
        return "cannot be compared with"
    if diff["low"] > 0:
        return "beats"
    if diff["high"] < 0:
        return "loses to"
    return "ties with"


def comparison_sentence(subject: str, diffs: dict[str, dict], level: float = 0.95) -> str:
    """One sentence, generated from the numbers: `subject` against each baseline, beyond the CI or not."""
    parts = []
    for other, d in diffs.items():
        if d.get("ci") is None:
            parts.append(f"cannot be compared with {other} (fewer than 2 paired seeds)")
            continue
        parts.append(f"{verdict(d)} {other} ({100 * d['mean']:+.1f} points, {level:.0%} CI "
                     f"[{100 * d['low']:+.1f}, {100 * d['high']:+.1f}], {d['n']} paired seeds)")  # fmt: skip
    if not parts:
        return f"{subject}: no baseline to compare with."
    return f"On final held-out accuracy, {subject} " + "; ".join(parts) + "."
