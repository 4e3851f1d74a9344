"""`results.md`, `results.json` summary and the figures of the toy reproduction, from the per-run records.

A record is what `bridge_trl.toy.run.run_method` returns: one (method, seed) run with its accuracy curve
`[(step, samples consumed, accuracy)]`, consumption counters, time, memory, reward and completion-length series.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .calibration import accuracy_at, format_checks  # noqa: E402
from .stats import comparison_sentence, mean_ci, paired_difference  # noqa: E402

# One fixed colour per method, so that figures from different runs read the same way.
COLORS = {"bridge": "C3", "mix": "C1", "alternating": "C2", "rl": "C0", "sft": "C4", "cold_start": "C5",
          "chord": "C6", "luffy": "C8"}  # fmt: skip


def by_method(records: list[dict]) -> dict[str, list[dict]]:
    groups = defaultdict(list)
    for r in records:
        groups[r["method"]].append(r)
    return dict(groups)


def steps_to_target(curve: list, target: float) -> int | None:
    """First evaluated step at which accuracy reaches `target` (None when it never does)."""
    return next((step for step, _, acc in curve if acc >= target), None)


def summarize(records: list[dict], target: float) -> dict[str, dict]:
    """Per method: final accuracy with its 95% CI, accuracy at 20% and 50% of the budget, steps to `target`,
    consumption, cost per step and memory."""
    summary = {}
    for method, runs in by_method(records).items():
        steps = runs[0]["steps"]
        reached = [steps_to_target(r["curve"], target) for r in runs]
        final = mean_ci([r["final_accuracy"] for r in runs])
        summary[method] = {
            "seeds": sorted(r["seed"] for r in runs),
            "learning_rate": runs[0]["learning_rate"],
            "learning_rates": runs[0].get("learning_rates", {"learning_rate": runs[0]["learning_rate"]}),
            "final_accuracy_mean": final["mean"], "final_accuracy_std": final["std"] or 0.0,
            "final_accuracy_ci95": final["ci"],
            "accuracy_at_20pct_mean": mean_ci([accuracy_at(r["curve"], round(0.2 * steps)) for r in runs])["mean"],
            "accuracy_at_50pct_mean": mean_ci([accuracy_at(r["curve"], round(0.5 * steps)) for r in runs])["mean"],
            "initial_accuracy_mean": mean_ci([r["curve"][0][2] for r in runs])["mean"],
            "steps_to_target_mean": mean_ci([s for s in reached if s is not None])["mean"],
            "reached_target": sum(s is not None for s in reached),
            "seconds_per_step_mean": mean_ci([r["seconds_per_step"] for r in runs])["mean"],
            "sft_samples_mean": mean_ci([r["sft_samples"] for r in runs])["mean"],
            "rl_samples_mean": mean_ci([r["rl_samples"] for r in runs])["mean"],
            "tokens_mean": mean_ci([r["sft_tokens"] + r["rl_tokens"] for r in runs])["mean"],
            "peak_rss_mb_max": max(r["peak_rss_mb"] for r in runs),
            "training_state_mb": runs[0]["training_state_mb"],
            "cooperative_gain_mean": mean_ci([r["cooperative_gain_mean"] for r in runs])["mean"],
        }  # fmt: skip
    return summary


def comparisons(records: list[dict], subject: str = "bridge") -> dict[str, dict]:
    """Paired difference of final accuracy, `subject` − each other method, over the seeds both ran."""
    groups = {m: {r["seed"]: r["final_accuracy"] for r in runs} for m, runs in by_method(records).items()}
    if subject not in groups:
        return {}
    return {m: paired_difference(groups[subject], g) for m, g in groups.items() if m != subject}


def _fmt(value, spec: str = ".1f", missing: str = "–") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return format(value, spec)


def _lr_text(s: dict) -> str:
    """The lr cell: the first rate, and a second one where the method has it (BRIDGE's β, an SFT rate)."""
    lrs = s.get("learning_rates") or {}
    text = f"{s['learning_rate']:g}"
    if "adapter_learning_rate" in lrs:
        text += f" (β {lrs['adapter_learning_rate']:g})"
    if "sft_learning_rate" in lrs:
        text += f" (SFT {lrs['sft_learning_rate']:g})"
    return text


def results_table(summary: dict[str, dict], target: float) -> str:
    """The main table as GitHub markdown, one row per method, best final accuracy first."""
    rows = sorted(summary.items(), key=lambda kv: -kv[1]["final_accuracy_mean"])
    lines = [f"| method | lr | final acc. % (± 95% CI) | at 20% / 50% of budget | steps to {target:.0%} (seeds) "
             "| SFT / RL samples | tokens | s / step | peak RSS MB | train state MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for method, s in rows:
        lines.append(
            f"| {method} | {_lr_text(s)} "
            f"| {100 * s['final_accuracy_mean']:.1f} ± {_fmt(s['final_accuracy_ci95'] and 100 * s['final_accuracy_ci95'])} "
            f"| {100 * s['accuracy_at_20pct_mean']:.1f} / {100 * s['accuracy_at_50pct_mean']:.1f} "
            f"| {_fmt(s['steps_to_target_mean'], '.0f')} ({s['reached_target']}/{len(s['seeds'])}) "
            f"| {s['sft_samples_mean']:.0f} / {s['rl_samples_mean']:.0f} | {s['tokens_mean']:.0f} "
            f"| {s['seconds_per_step_mean']:.3f} | {s['peak_rss_mb_max']:.0f} | {s['training_state_mb']:.1f} |"
        )  # fmt: skip
    return "\n".join(lines)


def comparison_table(diffs: dict[str, dict], subject: str = "bridge") -> str:
    lines = [f"| {subject} − | mean (points) | 95% CI | seeds |", "|---|---|---|---|"]
    for m, d in diffs.items():
        ci = f"[{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]" if d.get("ci") is not None else "–"
        lines.append(f"| {m} | {100 * d['mean']:+.1f} | {ci} | {d['n']} |")
    return "\n".join(lines)


def luffy_fraction(records: list[dict]) -> float | None:
    """Mean `luffy/trace_group_fraction` over luffy's runs (≈ 1: every RL prompt found its trace)."""
    values = [
        r["luffy_trace_group_fraction"] for r in records if r.get("luffy_trace_group_fraction") is not None
    ]
    return sum(values) / len(values) if values else None


def write_markdown(path: str, records: list[dict], meta: dict, checks: list[dict], extra: str = "") -> dict:
    """Write `results.md`; returns {summary, comparisons, sentence}."""
    target = meta["target_accuracy"]
    summary = summarize(records, target)
    diffs = comparisons(records)
    sentence = comparison_sentence("BRIDGE", diffs) if diffs else "BRIDGE was not run."
    settings = records[0]["settings"]
    seeds = sorted({r["seed"] for r in records})
    text = [
        "# Toy reproduction of Figure 1: SFT, RL and their combinations on 3-number sums", "",
        f"Held-out greedy accuracy on {meta['num_eval']} unseen sums `a+b+c=` (a, b, c in 0–9; `{meta['eval_split']}` "
        f"split), exact match on the last `\\boxed{{}}`, after {settings['max_steps']} optimizer steps; mean ± 95% "
        f"t-interval over seeds {seeds} (paired: a seed fixes the data order of every method). Base: "
        f"{meta['base_params'] / 1e6:.2f}M-parameter Qwen2 at {100 * meta['base_accuracy']:.1f}%.", "",
        results_table(summary, target), "", "## BRIDGE against each baseline (paired over seeds)", "",
        comparison_table(diffs) if diffs else "BRIDGE was not run.", "", f"**{sentence}**", "",
        "## Calibration checks (baselines only)", "", format_checks(checks, meta["eval_split"]) or "(none)", "",
        "## How it was produced", "",
        f"- Budget, identical for every method: {settings['max_steps']} steps; each step gets the same "
        f"{settings['prompts_per_step']} RL prompts × {settings['rollouts_per_prompt']} rollouts (temperature "
        f"{settings['temperature']}, KL β = {settings['beta']}) and the same {settings['sft_batch_size']} SFT traces "
        f"of the same problems. cold_start switches to RL after {settings['cold_start_sft_ratio']:.0%} of the steps. "
        f"λ = {settings['bridge_lambda']} for mix and bridge; bridge's adapter is LoRA r = α = {settings['lora_rank']}.",
        f"- chord: CHORD-{'φ' if settings.get('chord_phi') else 'μ'}, μ from {settings.get('chord_mu_peak')} at step 0 to "
        f"{settings.get('chord_mu_valley')} by a cosine over the whole budget (the reference's schedule, scaled); luffy: "
        f"{settings.get('luffy_num_off_policy')} of the {settings['rollouts_per_prompt']} rollouts of each group is the "
        f"prompt's paired trace, γ = {settings.get('luffy_shaping_gamma')}, loss_type "
        f"{settings.get('luffy_loss_type', 'dapo')}, scale_rewards {settings.get('luffy_scale_rewards', 'group')}, "
        f"entropy bonus {settings.get('luffy_entropy_coef', 0.0)} (the reference's training script)"
        + (f" (trace found for a fraction {luffy_fraction(records):.2f} of the groups)." if luffy_fraction(records)
           is not None else "."),
        f"- Cut to fit the time limit: {meta.get('cuts', '–')}",
        f"- Learning rates: {meta['lr_selection']}",
        f"- s / step: training wall time per step, evaluation excluded ({meta['workers']} runs in parallel, "
        f"{meta.get('threads', 1)} torch thread(s) each; {meta['machine']}). Peak RSS: VmHWM, reset per run. Tokens: SFT + RL completion tokens.",
        f"- Total wall time: {meta['total_seconds'] / 60:.1f} min.", "",
        "![accuracy curves](curves.png)", "", "![reward and length](dynamics.png)", "", extra,
    ]  # fmt: skip
    with open(path, "w") as f:
        f.write("\n".join(text))
    return {"summary": summary, "comparisons": diffs, "sentence": sentence}


def _mean_series(runs: list[dict], key: str, x_index: int = 0):
    """Point-by-point mean over seeds of a series (curves share their steps)."""
    series = [r[key] for r in runs if r.get(key)]
    if not series:
        return [], []
    length = min(map(len, series))
    xs = [statistics.fmean(s[i][x_index] for s in series) for i in range(length)]
    ys = [statistics.fmean(s[i][-1] for s in series) for i in range(length)]
    return xs, ys


def _order(groups):
    return sorted(groups, key=lambda m: list(COLORS).index(m) if m in COLORS else len(COLORS))


def plot_curves(path: str, records: list[dict], target: float | None = None) -> None:
    """`curves.png`: accuracy vs optimizer steps and vs SFT + RL samples consumed, mean over seeds per method."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    groups = by_method(records)
    for method in _order(groups):
        for ax, x_index in zip(axes, (0, 1), strict=True):
            xs, ys = _mean_series(groups[method], "curve", x_index)
            ax.plot(xs, [100 * y for y in ys], label=f"{method} (n={len(groups[method])})",
                    color=COLORS.get(method), marker=".", linewidth=1.8)  # fmt: skip
    for ax, xlabel in zip(
        axes, ("optimizer step", "samples consumed (SFT examples + RL rollouts)"), strict=True
    ):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out greedy accuracy (%)")
        ax.grid(alpha=0.3)
        if target is not None:
            ax.axhline(100 * target, color="grey", linestyle=":", linewidth=1)
    axes[1].set_xscale("symlog", linthresh=500)  # linear up to 500, log beyond: early steps stay readable
    axes[1].set_xlim(left=0)
    axes[0].legend(loc="best", fontsize=9)
    axes[0].set_title("accuracy vs steps (mean over seeds)")
    axes[1].set_title("accuracy vs samples consumed (symlog x)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_dynamics(
    path: str, records: list[dict], methods=("bridge", "cold_start", "rl"), smooth: int = 5
) -> None:
    """`dynamics.png`, the paper's Figure 3 analogue: mean training reward and mean completion length over steps
    (moving average over `smooth` steps, mean over seeds). Steps without rollouts (SFT phases) have no point."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    groups = by_method(records)
    for method in [m for m in methods if m in groups]:
        for ax, key in zip(axes, ("reward_curve", "completion_length_curve"), strict=True):
            xs, ys = _mean_series(groups[method], key)
            ys = [statistics.fmean(ys[max(0, i - smooth + 1) : i + 1]) for i in range(len(ys))]
            ax.plot(xs, ys, label=method, color=COLORS.get(method), linewidth=1.8)
    for ax, label in zip(axes, ("mean training reward", "mean completion length (tokens)"), strict=True):
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="best", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tuning_table(tuned: dict) -> str:
    """The committed tuning record as markdown: per method, mean validation accuracy at each lr of its grid."""
    lines = [f"Grid {tuned.get('grid')}, seeds {tuned.get('seeds')}, split `{tuned.get('split')}`. {tuned.get('how', '')}",
             "", "| method | best lr | tuned | edge | mean val. accuracy % per lr | extensions |", "|---|---|---|---|---|---|"]  # fmt: skip
    for m, rec in tuned.get("methods", {}).items():
        scores = ", ".join(f"{lr}: {100 * v:.1f}" for lr, v in rec.get("mean_scores", {}).items()) or "–"
        lines.append(f"| {m} | {rec['best']:g} | {'yes' if rec.get('tuned') else 'NO'} | {rec.get('edge') or '–'} "
                     f"| {scores} | {'; '.join(rec.get('extensions', [])) or rec.get('note', '–')} |")  # fmt: skip
    return "\n".join(lines)
