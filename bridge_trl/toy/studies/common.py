"""What the four studies share: the run context, paired statistics over seeds, tables and the results files.

Every study follows the demo's protocol: the demo's budget (`ToyRunSettings`), learning rates tuned on the
validation split (the committed `tuned.json`, or the study's own sweep), paired seeds (seed s fixes every data order
and, with `NoisyReward`, the noise stream, for every arm), the test split for the report, t-based 95% CIs of means
and of paired differences, and verdicts generated from the CIs (`bridge_trl.toy.stats.verdict`).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field

from ..run import Cell, ToyRunSettings, run_cells
from ..stats import mean_ci, paired_difference, verdict
from ..sweep import tuned_lrs

# Seed sets (issue 24). A seed fixes a run's data order and sampling on whatever split it runs, so a test seed that
# was also a tuning seed reports the very trajectories the rates were picked on. Tuning (`tuned.json`, the plateau
# study's re-tuning) uses seeds 1-2 on validation, calibration (the plateau premises) 1-5; the reported test runs
# use 101-110, and `--replicate` re-runs a study's final comparison on 201-210. Quick modes use the same sets.
TUNING_SEEDS = (1, 2)
CALIBRATION_SEEDS = (1, 2, 3, 4, 5)
TEST_SEEDS = tuple(range(101, 111))
REPLICATION_SEEDS = tuple(range(201, 211))


def check_disjoint(seeds, used, what: str = "tuning or calibration") -> None:
    """Refuse report seeds that were used to tune or calibrate: a test seed must be fresh."""
    overlap = sorted(set(seeds) & set(used))
    if overlap:
        raise ValueError(f"Seeds {overlap} are {what} seeds; report seeds must be disjoint from them "
                         f"(defaults: test {TEST_SEEDS[0]}-{TEST_SEEDS[-1]}, replication "
                         f"{REPLICATION_SEEDS[0]}-{REPLICATION_SEEDS[-1]}).")  # fmt: skip


def gated_verdict(claim: str, checks: list[dict], split: str, verdict_text: str) -> str:
    """`verdict_text` only when every premise in `checks` passed on `split`; otherwise which failed, and that the
    comparison is reported without a verdict (a claim about a regime says nothing where the regime is absent)."""
    failed = [c for c in checks if not c["passed"]]
    if not failed:
        return verdict_text
    names = ", ".join(f"{c['name']} ({c['text']})" for c in failed)
    return (f"**No verdict on {claim}**: its premise{'s' if len(failed) > 1 else ''} failed on the {split} split: "
            f"{names}. The comparison above is reported without a verdict.")  # fmt: skip


def claim_word(holds: bool, premises_hold: bool = True) -> str:
    """A study's verdict on its claim in words: what `--replicate` compares between the two seed sets."""
    if not premises_hold:
        return "no verdict (premises failed)"
    return "holds" if holds else "does not hold"


def robustness_table(first: dict, second: dict, names=("test seeds", "replication seeds")) -> str:
    """Each comparison's difference and verdict on both seed sets; 'not robust' where the verdicts differ."""
    lines = [f"| comparison | {names[0]} | {names[1]} | across the two |", "|---|---|---|---|"]
    for key in first:
        a, b = first[key], second.get(key)
        if b is None:
            continue
        va, vb = verdict(a), verdict(b)
        lines.append(
            f"| {key} | {pts(a)} {va} | {pts(b)} {vb} | {'robust' if va == vb else '**not robust**'} |"
        )
    return "\n".join(lines)


def verdict_map(diffs: list[dict]) -> dict:
    """{"a vs b": difference} of a list of `compare` results: what `robustness_table` reads."""
    return {f"{d['a']} vs {d['b']}": d for d in diffs}


@dataclass
class StudyContext:
    """Where a study runs and with what: the base, the splits, the demo's budget and the tuning record."""

    name: str
    output_dir: str  # runs/study/<name>
    base_path: str
    splits: dict
    settings: ToyRunSettings  # the demo's budget (quick mode: a few steps)
    tuned: dict  # the committed tuning record (`bridge_trl/toy/tuned.json`)
    seeds: list[int]  # paired seeds of the report
    quick: bool = False
    reuse: bool = (
        False  # load finished runs' records from `runs/records` (`run_cells`) instead of re-training
    )
    workers: int = 2
    threads: int = 1
    phases: dict = field(default_factory=dict)  # wall seconds per phase

    def lrs(self, method: str) -> dict:
        """The method's validation-tuned rates from the committed record."""
        return tuned_lrs(method, self.tuned)

    def run(self, cells: list[Cell], split: str = "test", splits: dict | None = None, phase: str = "runs"):
        """Train `cells` on the worker pool; the phase's wall time is recorded."""
        start = time.perf_counter()
        records = run_cells(cells, self.base_path, splits or self.splits, split,
                            os.path.join(self.output_dir, "runs"), self.workers, self.threads,
                            desc=f"{self.name}: {phase}", reuse=self.reuse)  # fmt: skip
        self.phases[phase] = self.phases.get(phase, 0.0) + time.perf_counter() - start
        return records


def finals(records: list[dict], arm: str, key: str = "final_accuracy") -> dict[int, float]:
    """{seed: final accuracy} of one arm."""
    return {r["seed"]: r[key] for r in records if r["arm"] == arm}


def pts(d: dict) -> str:
    """A mean (or paired difference) in points with its 95% CI."""
    if d.get("mean") is None:
        return "–"
    if d.get("ci") is None:
        return f"{100 * d['mean']:+.1f} (one seed)"
    return f"{100 * d['mean']:+.1f} [{100 * (d['mean'] - d['ci']):+.1f}, {100 * (d['mean'] + d['ci']):+.1f}]"


def acc(values) -> str:
    """Mean accuracy ± CI half-width in %."""
    m = mean_ci(list(values))
    if m["mean"] is None:
        return "–"
    return f"{100 * m['mean']:.1f}" + (f" ± {100 * m['ci']:.1f}" if m["ci"] is not None else "")


def compare(records: list[dict], a: str, b: str) -> dict:
    """Paired difference of final accuracy, arm `a` − arm `b`, with its verdict ('beats', 'ties with', ...)."""
    d = paired_difference(finals(records, a), finals(records, b))
    return {**d, "a": a, "b": b, "verdict": verdict(d)}


def comparison_rows(diffs: list[dict]) -> str:
    """A markdown table of paired differences: a, b, a − b with CI, n, verdict."""
    lines = ["| a | b | a − b (points, 95% CI) | paired seeds | verdict |", "|---|---|---|---|---|"]
    for d in diffs:
        lines.append(f"| {d['a']} | {d['b']} | {pts(d)} | {d['n']} | {d['a']} {d['verdict']} {d['b']} |")
    return "\n".join(lines)


def arm_table(records: list[dict], arms: list[str], describe: dict[str, str] | None = None) -> str:
    """Per arm: what it is, its rates, final accuracy (mean ± 95% CI), accuracy at 20% and 50%, s/step."""
    from ..calibration import accuracy_at

    lines = [
        "| arm | what | rates | seeds | final acc. (%) | at 20% | at 50% | s/step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm in arms:
        runs = [r for r in records if r["arm"] == arm]
        if not runs:
            continue
        steps = runs[0]["steps"]
        rates = ", ".join(f"{k.replace('_learning_rate', '').replace('learning_rate', 'lr')} {v:g}"
                          for k, v in runs[0]["learning_rates"].items())  # fmt: skip
        at = [acc(accuracy_at(r["curve"], round(f * steps)) for r in runs) for f in (0.2, 0.5)]
        lines.append(f"| {arm} | {(describe or {}).get(arm, runs[0]['method'])} | {rates} | {len(runs)} | "
                     f"{acc(r['final_accuracy'] for r in runs)} | {at[0]} | {at[1]} | "
                     f"{statistics.fmean(r['seconds_per_step'] for r in runs):.2f} |")  # fmt: skip
    return "\n".join(lines)


def seeds_for_halfwidth(sd: float, target: float, n_min: int, n_max: int) -> int:
    """Smallest n in [n_min, n_max] whose t-based 95% CI half-width t(n−1)·sd/√n is ≤ `target` (n_max if none)."""
    from ..stats import t_quantile

    for n in range(max(2, n_min), n_max + 1):
        if t_quantile(0.975, n - 1) * sd / math.sqrt(n) <= target:
            return n
    return n_max


def power(sd: float, n: int, delta: float) -> float | None:
    """Power of the paired two-sided 5% test to detect a true difference `delta` with n seeds (normal approximation
    of the non-central t, with the t critical value)."""
    from ..stats import t_quantile

    if sd is None or n < 2 or sd <= 0:
        return None
    z = delta * math.sqrt(n) / sd - t_quantile(0.975, n - 1)
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def machine() -> str:
    import torch

    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.processor() or 'cpu'}, torch "
            f"{torch.__version__} ({torch.backends.cpu.get_cpu_capability()})")  # fmt: skip


def write_results(
    ctx: StudyContext, title: str, sections: list[str], data: dict, started: float, stem: str = "results"
) -> dict:
    """`<stem>.md` (title, protocol line, sections, wall times) and `<stem>.json` (data, runs, wall times)."""
    wall = time.perf_counter() - started
    phases = ", ".join(f"{k} {v:.0f} s" for k, v in ctx.phases.items())
    header = (f"# {title}\n\n{'**Quick mode: a smoke test of the pipeline, not a result.**' if ctx.quick else ''}\n\n"
              f"Machine: {machine()}; {ctx.workers} workers x {ctx.threads} thread. Budget per run: "
              f"{ctx.settings.max_steps} steps of {ctx.settings.prompts_per_step} prompts x "
              f"{ctx.settings.rollouts_per_prompt} rollouts and/or {ctx.settings.sft_batch_size} SFT examples. "
              f"Wall time {wall:.0f} s ({wall / 60:.1f} min; {phases}).\n")  # fmt: skip
    os.makedirs(ctx.output_dir, exist_ok=True)
    with open(os.path.join(ctx.output_dir, f"{stem}.md"), "w") as f:
        f.write(header + "\n" + "\n\n".join(sections) + "\n")
    out = {"study": ctx.name, "quick": ctx.quick, "machine": machine(), "wall_seconds": wall, "phases": ctx.phases,
           "seeds": ctx.seeds, **data}  # fmt: skip
    with open(os.path.join(ctx.output_dir, f"{stem}.json"), "w") as f:
        json.dump(out, f, indent=1)
    return out


def plot_arms(path: str, records: list[dict], arms: list[str], title: str, ylabel: str = "held-out greedy accuracy (%)",
              key: str = "curve", scale: float = 100.0, center=statistics.fmean, ylim=None) -> None:  # fmt: skip
    """Mean (or `center`) over seeds of a per-step series (`curve`: accuracy; `cooperative_gain_curve`: the gain)
    per arm, with each seed's series faint behind it; `ylim` clips the axis (points beyond it are off the plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, arm in enumerate(arms):
        series = [r[key] for r in records if r["arm"] == arm and r.get(key)]
        if not series:
            continue
        color = f"C{i % 10}"
        for s in series:
            ax.plot([p[0] for p in s], [scale * p[-1] for p in s], color=color, alpha=0.15, linewidth=0.8)
        length = min(map(len, series))
        xs = [series[0][j][0] for j in range(length)]
        ys = [scale * center([s[j][-1] for s in series]) for j in range(length)]
        ax.plot(
            xs,
            ys,
            color=color,
            label=f"{arm} (n={len(series)})",
            linewidth=2,
            marker="." if length < 40 else None,
        )
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
