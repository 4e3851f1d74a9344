"""Study `noise` (claim C2, robust to noisy rewards): every RL-using method with its training reward flipped.

Each RL-using method (rl, bridge, mix, alternating, cold_start, chord, luffy) trains with the binary reward flipped
(1 − r) with probability p ∈ {0.1, 0.2, 0.4} (`NoisyReward`, seeded by the run's seed: paired seeds see the same
noise at the same step and batch position), and clean (p = 0), at its *clean* validation-tuned rates: one rule for
all methods, no re-tuning under noise. SFT-only never reads the reward; it runs clean as a reference. Evaluation is
always clean (greedy exact match on the test split), and so are LUFFY's expert traces in its rollout groups: they are
expert data, as the SFT traces of mix, BRIDGE and CHORD are, whose SFT loss reads no reward (`NoisyReward` leaves the
rows LUFFY marks as traces unflipped; the first run, 2 December 2026, flipped them, issue 24). Reported: final accuracy per (method, p); each method's drop
from clean (paired); BRIDGE − each method at each p; and BRIDGE's drop against RL-only's drop (paired
difference-in-differences). The paper's C2: at p = 0.2, BRIDGE 32.9 vs RL-zero 13.9 (Qwen2.5-3B).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace

from ..run import Cell
from ..stats import mean_ci, paired_difference, verdict
from .common import StudyContext, acc, claim_word, compare, comparison_rows, finals, pts, verdict_map
from .common import write_results as write

METHODS = ("rl", "bridge", "mix", "alternating", "cold_start", "chord", "luffy")
LEVELS = (0.0, 0.1, 0.2, 0.4)


def _arm(method: str, p: float) -> str:
    return f"{method}@p{p:g}"


def run(ctx: StudyContext) -> dict:
    started = time.perf_counter()
    levels = (0.0, 0.2) if ctx.quick else LEVELS
    methods = ("rl", "bridge") if ctx.quick else METHODS
    cells = [Cell(m, s, ctx.lrs(m), replace(ctx.settings, reward_flip_prob=p), _arm(m, p))
             for p in levels for m in methods for s in ctx.seeds]  # fmt: skip
    cells += [Cell("sft", s, ctx.lrs("sft"), ctx.settings, "sft@p0") for s in ctx.seeds]
    records = ctx.run(cells, phase="runs")

    matrix = ["| method | " + " | ".join(f"p = {p:g}" for p in levels) + " |", "|---|" + "---|" * len(levels)]
    for m in methods:
        matrix.append(
            f"| {m} | " + " | ".join(acc(finals(records, _arm(m, p)).values()) for p in levels) + " |"
        )
    matrix.append(
        f"| sft (no reward) | {acc(finals(records, 'sft@p0').values())} |" + " |" * (len(levels) - 1)
    )
    drops = [compare(records, _arm(m, p), _arm(m, 0.0)) for m in methods for p in levels if p > 0]
    vs = [compare(records, _arm("bridge", p), _arm(m, p)) for p in levels for m in methods if m != "bridge"]
    did = []
    for p in (p for p in levels if p > 0):
        drop = {m: {s: finals(records, _arm(m, p))[s] - finals(records, _arm(m, 0.0))[s] for s in ctx.seeds}
                for m in ("bridge", "rl")}  # fmt: skip
        d = paired_difference(drop["bridge"], drop["rl"])
        did.append({**d, "p": p, "verdict": verdict(d)})
    flip = {f"{p:g}": mean_ci([r["flip_rate"] for r in records if r["arm"].endswith(f"@p{p:g}") and "flip_rate" in r])
            for p in levels if p > 0}  # fmt: skip
    _plot(f"{ctx.output_dir}/noise.png", records, methods, levels)
    key = 0.2 if 0.2 in levels else levels[-1]
    c2 = next(d for d in vs if d["a"] == _arm("bridge", key) and d["b"] == _arm("rl", key))
    c2_did = next(d for d in did if d["p"] == key)
    verdict_lines = [
        f"- At p = {key:g}, BRIDGE {c2['verdict']} RL-only: {pts(c2)} points (paper: +19.0 on Qwen2.5-3B).",
        f"- BRIDGE's drop from clean minus RL-only's at p = {key:g}: {pts(c2_did)} points ({c2_did['verdict']} 0: "
        f"{'BRIDGE loses less' if c2_did['verdict'] == 'beats' else 'BRIDGE loses more' if c2_did['verdict'] == 'loses to' else 'no difference beyond the CI'}).",
        f"- **C2 {'holds' if c2['verdict'] == 'beats' else 'does not hold'} on the toy** at p = {key:g} "
        "(criterion: BRIDGE beats RL-only beyond the CI under the same noise).",
    ]  # fmt: skip
    sections = [
        "## Design\n\n" + __doc__.split("\n\n", 1)[1].strip(),
        "## Final accuracy (test split, %, mean ± 95% CI)\n\n" + "\n".join(matrix),
        "Realised flip rates (mean over runs): " + ", ".join(f"p = {p}: {v['mean']:.3f}" for p, v in flip.items()
                                                             if v["mean"] is not None),
        "## Drop from clean (paired: same method, same seed, noisy − clean)\n\n" + comparison_rows(drops),
        "## BRIDGE against each method under the same noise\n\n" + comparison_rows(vs),
        "## BRIDGE's drop against RL-only's drop (difference-in-differences)\n\n"
        + "| p | (bridge_p − bridge_0) − (rl_p − rl_0) | seeds | verdict |\n|---|---|---|---|\n"
        + "\n".join(f"| {d['p']:g} | {pts(d)} | {d['n']} | {d['verdict']} 0 |" for d in did),
        "## Verdict\n\n" + "\n".join(verdict_lines) + "\n\nFigure: `noise.png` (final accuracy against p).",
    ]  # fmt: skip
    return write(ctx, "Study `noise` (C2): BRIDGE under a flipped reward", sections,
                 {"levels": levels, "methods": methods, "drops": drops, "bridge_vs": vs, "did": did,
                  "flip_rates": flip, "c2_holds": c2["verdict"] == "beats", "claim": claim_word(c2["verdict"] == "beats"),
                  "verdicts": {**verdict_map(drops), **verdict_map(vs),
                               **{f"did at p={d['p']:g}": d for d in did}}, "runs": records}, started)  # fmt: skip


def _plot(path, records, methods, levels):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..report import COLORS

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, m in enumerate(methods):
        stats = [mean_ci(list(finals(records, _arm(m, p)).values())) for p in levels]
        xs = [p + (i - len(methods) / 2) * 0.004 for p in levels]  # dodge the error bars
        ax.errorbar(xs, [100 * s["mean"] for s in stats], yerr=[100 * (s["ci"] or 0) for s in stats], label=m,
                    color=COLORS.get(m), marker="o", capsize=3, linewidth=1.5 if m != "bridge" else 2.5)  # fmt: skip
    sft = list(finals(records, "sft@p0").values())
    if sft:
        ax.axhline(100 * statistics.fmean(sft), color=COLORS["sft"], linestyle=":", label="sft (no reward)")
    ax.set_xlabel("reward flip probability p (training only)")
    ax.set_ylabel("final held-out accuracy (%), mean ± 95% CI")
    ax.set_xticks(list(levels))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
