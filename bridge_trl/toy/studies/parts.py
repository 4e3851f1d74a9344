"""Study `parts` (claim C1, the upper level matters): BRIDGE against mix and the ablations that isolate its pieces.

Arms, each at both validation-tuned θ rates of the demo (BRIDGE's and mix's, `tuned.json`), β = α wherever there is
an adapter, λ = 0.5:

- `bridge`: Algorithm 2 (joint update of θ and w, RL-only θ̂, cooperative gain in w's update);
- `mix`: the joint loss on θ alone (BRIDGE without its upper level);
- `mix_lora`: mix with a LoRA adapter trained on the joint loss, clipped per group as BRIDGE is: BRIDGE without the
  cooperative-gain term of w's update (and without θ̂);
- `bridge_beta0`: BRIDGE with β = 0 (w frozen at its zero-initialised value): it must equal mix exactly (a bitwise
  test in `tests/test_studies.py`; here on the pilot seeds' accuracies).

Seeds: a pilot of 5 paired seeds; n is then the smallest number whose 95% CI half-width of BRIDGE − mix, at the
pilot's paired SD (the larger of the two rates), is ≤ 4 points, capped at 20; the report gives the half-width
reached and the power to detect 3 and 4 points. `bridge/cooperative_gain` over steps shows whether w's objective
moves at all.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace

from ..run import Cell
from ..stats import mean_ci, paired_difference
from .common import (
    StudyContext,
    arm_table,
    claim_word,
    compare,
    comparison_rows,
    finals,
    plot_arms,
    power,
    pts,
    seeds_for_halfwidth,
    verdict_map,
)
from .common import write_results as write

PILOT, TARGET_HALFWIDTH, MAX_SEEDS = 5, 0.04, 20
DESCRIBE = {"bridge": "BRIDGE (Algorithm 2)", "mix": "joint loss on θ", "mix_lora": "joint loss on θ and LoRA w",
            "bridge_beta0": "BRIDGE, β = 0 (w frozen)"}  # fmt: skip


def plot_gain(path: str, records: list[dict], rates: list[float]) -> None:
    """The gain per step: median over seeds, on [-1, 1], the range of a true difference of two mean {0, 1} rewards
    (single-step importance-sampling estimates beyond it exist: the sequence ratio is heavy-tailed)."""
    plot_arms(path, records, [_arm("bridge", r) for r in rates], "bridge/cooperative_gain, J_RL(θ, w) − J_RL(θ̂, w): "
              "median over seeds", "cooperative gain (reward units)", key="cooperative_gain_curve", scale=1.0,
              center=statistics.median, ylim=(-1, 1))  # fmt: skip


def gain_outside(records: list[dict], rates) -> tuple[int, int]:
    """(per-step gain estimates outside [−1, 1], all per-step estimates) of the `bridge@rate` arms only: the β = 0
    arms run method "bridge" too, and their w never moves, so counting them would add estimates of a different
    quantity to both numbers."""
    arms = {_arm("bridge", r) for r in rates}
    series = [g for x in records if x["arm"] in arms for _, g in x["cooperative_gain_curve"]]
    return sum(abs(g) > 1 for g in series), len(series)


def _num(x, spec: str = ".2f") -> str:
    return "–" if x is None else format(x, spec)


def _arm(kind: str, rate: float) -> str:
    return f"{kind}@{rate:g}"


def _cells(ctx: StudyContext, kinds, rates, seeds) -> list[Cell]:
    cells = []
    for seed in seeds:
        for rate in rates:
            for kind in kinds:
                method = "bridge" if kind.startswith("bridge") else "mix"
                lrs = {"learning_rate": rate}
                if kind != "mix":
                    lrs["adapter_learning_rate"] = 0.0 if kind == "bridge_beta0" else rate
                settings = replace(ctx.settings, adapter=kind == "mix_lora")
                cells.append(Cell(method, seed, lrs, settings, _arm(kind, rate)))
    return cells


def run(ctx: StudyContext) -> dict:
    started = time.perf_counter()
    rates = sorted({ctx.lrs("bridge")["learning_rate"], ctx.lrs("mix")["learning_rate"]})
    kinds = ("bridge", "mix", "mix_lora")
    pilot_n = 2 if ctx.quick else PILOT
    max_n = 3 if ctx.quick else MAX_SEEDS
    pilot = [ctx.seeds[0] + i for i in range(pilot_n)]
    records = ctx.run(_cells(ctx, kinds, rates, pilot) + _cells(ctx, ("bridge_beta0",), rates, pilot[:2]),
                      phase="pilot")  # fmt: skip
    sds = {r: paired_difference(finals(records, _arm("bridge", r)), finals(records, _arm("mix", r)))["std"]
           for r in rates}  # fmt: skip
    sd = max(s for s in sds.values() if s is not None) if any(s is not None for s in sds.values()) else None
    n = seeds_for_halfwidth(sd, TARGET_HALFWIDTH, pilot_n, max_n) if sd else pilot_n
    more = [pilot[0] + i for i in range(pilot_n, n)]
    if more:
        records += ctx.run(_cells(ctx, kinds, rates, more), phase="more seeds")
    seeds = pilot + more

    diffs, beta0 = [], {}
    for r in rates:
        b, m, lo, z = (_arm(k, r) for k in ("bridge", "mix", "mix_lora", "bridge_beta0"))
        diffs += [compare(records, b, m), compare(records, b, lo), compare(records, lo, m)]
        fz, fm = finals(records, z), finals(records, m)
        beta0[r] = {
            "seeds": sorted(fz),
            "max_abs_difference": max(abs(fz[s] - fm[s]) for s in fz) if fz else None,
        }
    gains = {r: mean_ci([x["cooperative_gain_mean"] for x in records if x["arm"] == _arm("bridge", r)])
             for r in rates}  # fmt: skip
    for r in rates:  # the median of every per-step estimate: robust to the heavy tail
        per_step = [
            g for x in records if x["arm"] == _arm("bridge", r) for _, g in x["cooperative_gain_curve"]
        ]
        gains[r]["median_per_step"] = statistics.median(per_step) if per_step else None
    reached = {d["a"]: d for d in diffs if d["a"].startswith("bridge@") and d["b"].startswith("mix@")}
    power_rows = [f"| {a} − mix | {len(seeds)} | {100 * d['std']:.1f} | {100 * d['ci']:.1f} | "
                  f"{_num(power(d['std'], d['n'], 0.03))} | {_num(power(d['std'], d['n'], 0.04))} |"
                  for a, d in reached.items() if d.get("ci") is not None]  # fmt: skip
    arms = [_arm(k, r) for r in rates for k in (*kinds, "bridge_beta0")]
    plot_arms(
        f"{ctx.output_dir}/curves.png", records, arms[:4] + arms[4:], "parts: accuracy over steps (test)"
    )
    plot_gain(f"{ctx.output_dir}/cooperative_gain.png", records, rates)
    outside, steps = gain_outside(records, rates)
    verdicts = [f"- At θ rate {r:g}: BRIDGE {next(d['verdict'] for d in diffs if d['a'] == _arm('bridge', r) and d['b'] == _arm('mix', r))} "
                f"mix ({pts(next(d for d in diffs if d['a'] == _arm('bridge', r) and d['b'] == _arm('mix', r)))} points); "
                f"mean cooperative gain {_num(gains[r]['mean'], '+.4f')} ± {_num(gains[r]['ci'], '.4f')} (reward units, mean of "
                f"per-run means; median per-step estimate {_num(gains[r]['median_per_step'], '+.4f')})." for r in rates]  # fmt: skip
    holds = all(d["verdict"] == "beats" for d in reached.values())
    verdicts.append(f"- **C1 {'holds' if holds else 'does not hold'} on the toy**: BRIDGE "
                    f"{'beats mix beyond the CI at both rates' if holds else 'does not beat mix beyond the CI at both rates'}.")  # fmt: skip
    sections = [
        "## Design\n\n" + __doc__.split("\n\n", 1)[1].strip(),
        f"## Seeds and power\n\nPilot: seeds {pilot}, paired SD of BRIDGE − mix: "
        + ", ".join(f"{100 * s:.1f} points at {r:g}" for r, s in sds.items() if s is not None)
        + f". Chosen n = {n} (target half-width {100 * TARGET_HALFWIDTH:.0f} points, cap {max_n}).\n\n"
        "| difference | seeds | paired SD (pts) | 95% CI half-width (pts) | power, 3 pts | power, 4 pts |\n"
        "|---|---|---|---|---|---|\n" + "\n".join(power_rows),
        "## Final accuracy (test split)\n\n" + arm_table(records, arms, {a: DESCRIBE[a.split("@")[0]] for a in arms}),
        "## Paired differences\n\n" + comparison_rows(diffs),
        "## β = 0 against mix\n\n" + "\n".join(
            f"- rate {r:g}: seeds {v['seeds']}, largest |final accuracy difference| {v['max_abs_difference']}"
            for r, v in beta0.items()),
        "## Verdict\n\n" + "\n".join(verdicts)
        + f"\n\nPer-step gain estimates outside [−1, 1] (impossible for a true gain; the importance-sampling estimate "
        f"is unbiased but heavy-tailed; BRIDGE arms only, β = 0 excluded): {outside} of {steps}.\n\nFigures: `curves.png` (accuracy over steps), "
        "`cooperative_gain.png` (the gain over steps, per seed, median bold).",
    ]  # fmt: skip
    gain_curves = {f"{r:g}": [statistics.fmean(v) for v in zip(*[[g for _, g in x["cooperative_gain_curve"]]
                   for x in records if x["arm"] == _arm("bridge", r)], strict=False)] for r in rates}  # fmt: skip
    return write(ctx, "Study `parts` (C1): does BRIDGE's upper level matter?", sections,
                 {"rates": rates, "pilot_sd": {f"{r:g}": s for r, s in sds.items()}, "chosen_seeds": n,
                  "diffs": diffs, "beta0": {f"{r:g}": v for r, v in beta0.items()}, "cooperative_gain": gains,
                  "cooperative_gain_curves": gain_curves, "c1_holds": holds, "claim": claim_word(holds),
                  "verdicts": verdict_map(diffs), "gain_outside": [outside, steps], "runs": records},
                 started)  # fmt: skip
