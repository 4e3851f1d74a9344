"""Study `attribution` (issue 27): does BRIDGE's upper level, the cooperative-gain term of w's update, change the
result, once w's rate β is tuned as carefully for BRIDGE as for the ablation without it?

Arms (λ = 0.5, the demo's budget unless stated):

- `bridge`: Algorithm 2 at θ rate α_B (BRIDGE's validation-tuned lr of the regime) and adapter rate β_B;
- `mix_lora`: the joint loss on θ and a LoRA w (per-group clipping as BRIDGE's), at the same α_B and its own β_L:
  BRIDGE without the gain term (and without θ̂), so BRIDGE − mix_lora is what the upper level adds;
- `mix`: the joint loss on θ alone at its own tuned lr (the baseline every study compares with).

Regimes: `demo` (clean traces; α_B = 1e-4, mix 3e-4 from `tuned.json`) and `plateau` (the plateau study's committed
regime, `plateau.COMMITTED_REGIME`: 60% of the SFT traces slipped up; α_B = 3e-4, mix 1e-4). The plateau premise
P3 failed on test on all three seed sets of issue 24 and is not re-checked here: `plateau` names the data, not a
plateau, and no claim C4 is made.

1. Tuning, per regime, on the validation split with the tuning seeds 1-2, the same grid and budget for both arms:
   β/α_B ∈ {1, 10, 100}, scored by mean final accuracy (ties: the smaller β); an optimum on an edge adds the next
   decade on that side, at most once (`sweep.run_sweep`). Every trial is recorded.
2. Test, per regime, at the tuned β: a pilot of 3 test seeds (101-103) of the three arms; n is the smallest number
   whose 95% CI half-width of BRIDGE − mix_lora at the pilot's paired SD (the larger of the two regimes') is ≤ 3
   points, capped at `MAX_SEEDS` = 4. The cap is compute: one demo run took 84 s of wall time (2 workers, 3.4-3.8
   s/step on 2 cores shared with four other jobs), so the study (about 95 run-equivalents) takes ~2 h; the report
   gives the half-width reached.
3. Longer budget, demo regime only (compute): BRIDGE and mix_lora at their tuned rates (not re-tuned) for 4x the
   demo's steps on the first 2 test seeds, evaluated also at 1x and 2x: with a constant lr and λ a run's first k
   steps do not depend on its length, so the 4x run read at 2x is the 2x budget (the 1x read is checked against
   the demo-budget run of the same seed).
4. `--replicate`: steps 2-3 again, every rate and n fixed, on the replication seeds 201-...: first both sets'
   step 2, then both sets' step 3. Nothing else changes.

Readings, per (regime, budget), of BRIDGE − mix_lora, generated: "the gain term changes the result" when the paired
CI excludes 0; "no effect beyond ±3 points" when the whole CI lies inside [−3, +3]; otherwise "not shown" (a tie
whose CI admits more than 3 points: a lack of power). Premise: both β optima of the regime interior to the (extended)
grid; where one is not, no reading is given. A reading stands only where it is the same on both seed sets.
Diagnostics (the trainer's `bridge/*` upper-level series, when it logs them): per arm, the median over seeds and
steps, and the median trajectory over seeds (`diagnostics.png`); they do not change training.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import replace

from ..calibration import accuracy_at
from ..run import Cell
from ..sweep import _nice, run_sweep
from .common import (
    TUNING_SEEDS,
    StudyContext,
    arm_table,
    check_disjoint,
    compare,
    comparison_rows,
    plot_arms,
    pts,
    robustness_table,
    seeds_for_halfwidth,
)
from .common import write_results as write
from .plateau import COMMITTED_REGIME, regime_splits

RATIOS, MAX_EXTENSIONS = (1, 10, 100), 1
PILOT, TARGET_HALFWIDTH, MAX_SEEDS = 3, 0.03, 4
LONG_SEEDS, LONG_BUDGET, LONG_REGIMES = 2, 4, ("demo",)
KINDS = ("bridge", "mix_lora", "mix")
DIAGNOSTICS = ("bridge/cooperative_gain", "bridge/gain_grad_ratio", "bridge/gain_grad_cos", "bridge/shadow_drift",
               "bridge/adapter_share", "bridge/adapter_update", "bridge/theta_update")  # fmt: skip


def regimes(ctx: StudyContext) -> dict:
    """Per regime: its splits, BRIDGE's θ rate α_B (shared with mix_lora) and mix's lr."""
    plateau = COMMITTED_REGIME
    return {"demo": {"splits": ctx.splits, "alpha": ctx.lrs("bridge")["learning_rate"],
                     "mix": ctx.lrs("mix")["learning_rate"]},
            "plateau": {"splits": regime_splits(ctx, plateau["share"], plateau["direction"]),
                        "alpha": plateau["best"]["bridge"], "mix": plateau["best"]["mix"]}}  # fmt: skip


def arm(kind: str, regime: str, budget: int = 1) -> str:
    return f"{kind}@{regime}" + (f"x{budget}" if budget > 1 else "")


def cell(
    ctx: StudyContext, kind: str, regime: str, reg: dict, beta: float | None, seed: int, budget: int = 1
) -> Cell:
    settings = ctx.settings
    if budget > 1:
        # evaluated at 0, 20%, the demo's budget, 2x it, 50% and the end
        base = settings.max_steps
        settings = replace(settings, max_steps=budget * base, eval_every=2 * base, extra_eval_steps=(base,))
    if kind == "mix":
        return Cell("mix", seed, {"learning_rate": reg["mix"]}, settings, arm(kind, regime, budget))
    lrs = {"learning_rate": reg["alpha"], "adapter_learning_rate": beta}
    return Cell("bridge" if kind == "bridge" else "mix", seed, lrs, replace(settings, adapter=kind == "mix_lora"),
                arm(kind, regime, budget))  # fmt: skip


def tune(ctx: StudyContext, name: str, reg: dict, trials: list) -> dict:
    """Step 1: β for bridge and mix_lora on validation; every trial's record is appended to `trials`."""

    def evaluate(cells):
        records = ctx.run([cell(ctx, m, name, reg, lrs["learning_rate"], s) for m, s, lrs in cells], "val",
                          reg["splits"], phase=f"tuning ({name})")  # fmt: skip
        trials.extend({**r, "regime": name} for r in records)
        return [r["final_accuracy"] for r in records]

    ratios = RATIOS[:1] if ctx.quick else RATIOS
    grid = [_nice(reg["alpha"] * r) for r in ratios]
    seeds = list(TUNING_SEEDS[:1] if ctx.quick else TUNING_SEEDS)
    return run_sweep(["bridge", "mix_lora"], grid, seeds, evaluate, 0 if ctx.quick else MAX_EXTENSIONS)


def reading(d: dict, tuned: bool) -> str:
    """The generated reading of one BRIDGE − mix_lora difference (design: `Readings`)."""
    if not tuned:
        return "no reading (a β optimum on the grid's edge)"
    if d.get("ci") is None:
        return "no reading (fewer than 2 seeds)"
    if d["low"] > 0 or d["high"] < 0:
        return f"the gain term changes the result ({'up' if d['low'] > 0 else 'down'})"
    if d["low"] >= -TARGET_HALFWIDTH and d["high"] <= TARGET_HALFWIDTH:
        return f"no effect beyond ±{100 * TARGET_HALFWIDTH:.0f} points"
    return "not shown (a tie whose CI admits more than 3 points)"


def diagnostics(records: list[dict]) -> dict:
    """{arm: {key: median over seeds and steps}} of the upper-level series a run recorded."""
    out = {}
    for r in records:
        for key in DIAGNOSTICS:
            series = r.get("diagnostics", {}).get(key) or (r.get("cooperative_gain_curve") if key == DIAGNOSTICS[0]
                                                           else None)  # fmt: skip
            if series:
                out.setdefault(r["arm"], {}).setdefault(key, []).extend(v for _, v in series)
    return {a: {k: statistics.median(v) for k, v in keys.items()} for a, keys in out.items()}


def plot_diagnostics(path: str, records: list[dict], arms: list[str]) -> list[str]:
    """One panel per logged diagnostic: the median over seeds per step, per arm. Returns the keys plotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in DIAGNOSTICS[1:] if any(r.get("diagnostics", {}).get(k) for r in records)]
    if not keys:
        return []
    fig, axes = plt.subplots(len(keys), 1, figsize=(7.5, 2.4 * len(keys)), squeeze=False)
    for ax, key in zip(axes[:, 0], keys, strict=True):
        for i, a in enumerate(arms):
            series = [
                r["diagnostics"][key] for r in records if r["arm"] == a and r.get("diagnostics", {}).get(key)
            ]
            if series:
                n = min(map(len, series))
                ax.plot([series[0][j][0] for j in range(n)], [statistics.median(s[j][1] for s in series)
                        for j in range(n)], color=f"C{i}", label=a)  # fmt: skip
        ax.set_ylabel(key.replace("bridge/", ""), fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[-1, 0].set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return keys


def main_comparison(ctx: StudyContext, regs: dict, betas: dict, seeds: list[int], n: int | None = None,
                    tag: str = "") -> dict:  # fmt: skip
    """Step 2 on `seeds`: the three arms per regime on a pilot, then up to n seeds (n given: those seeds at once)."""
    pilot = seeds[: 2 if ctx.quick else PILOT]

    def arms_on(run_seeds):  # each regime reads its own splits
        out = []
        for name, reg in regs.items():
            cells = [cell(ctx, k, name, reg, betas[name].get(k), s) for s in run_seeds for k in KINDS]
            out += ctx.run(cells, "test", reg["splits"], phase=f"test{tag}")
        return out

    records = arms_on(seeds[:n] if n else pilot)
    sds = {name: compare(records, arm("bridge", name), arm("mix_lora", name))["std"] for name in regs}
    if n is None:
        known = [s for s in sds.values() if s is not None]
        cap = len(pilot) if ctx.quick else MAX_SEEDS
        n = seeds_for_halfwidth(max(known), TARGET_HALFWIDTH, len(pilot), cap) if known else len(pilot)
        records += arms_on(seeds[len(pilot) : n])
    return {"seeds": seeds[:n], "n": n, "pilot_sd": sds, "runs": records}


def long_budgets(ctx: StudyContext, regs: dict, betas: dict, seeds: list[int], tag: str = "") -> list[dict]:
    """Step 3: BRIDGE and mix_lora for `LONG_BUDGET` x the demo's steps in `LONG_REGIMES`, on `seeds`; each run
    also yields views at the demo's budget and at 2x it (`views`)."""
    out = []
    for name in LONG_REGIMES:
        cells = [
            cell(ctx, k, name, regs[name], betas[name][k], s, LONG_BUDGET) for s in seeds for k in KINDS[:2]
        ]
        out += ctx.run(cells, "test", regs[name]["splits"], phase=f"longer budget{tag}")
    return out


def views(records: list[dict], steps: int) -> list[dict]:
    """Each long run read at `steps` (constant lr and λ: a run's first k steps do not depend on its length, which
    the x1 view checks against the demo-budget run of the same seed): a record labelled `<kind>@<regime>x<k>`."""
    out = []
    for r in records:
        budget = r["steps"] // steps
        for b in sorted({1, 2, budget}):
            kind, rest = r["arm"].split("@")
            label = arm(kind, rest.split("x")[0], b) + ("~" if b == 1 else "")
            out.append(
                {**r, "arm": label, "steps": b * steps, "final_accuracy": accuracy_at(r["curve"], b * steps)}
            )
    return out


def evaluate(ctx: StudyContext, regs: dict, tuned_ok: dict, main: dict, long: list[dict]) -> dict:
    """The differences, the generated readings and the diagnostics of one seed set."""
    steps = ctx.settings.max_steps
    records = main["runs"] + views(long, steps)
    diffs, readings = [], {}
    for name in regs:
        for b in (1, 2, LONG_BUDGET) if name in LONG_REGIMES else (1,):
            d = compare(records, arm("bridge", name, b), arm("mix_lora", name, b))
            diffs.append(d)
            readings[f"{name} x{b}"] = {"difference": d, "reading": reading(d, tuned_ok[name])}
        diffs += [compare(records, arm("bridge", name), arm("mix", name)),
                  compare(records, arm("mix_lora", name), arm("mix", name))]  # fmt: skip
    prefix = [abs(x["final_accuracy"] - y["final_accuracy"]) for x in records if x["arm"].endswith("~")
              for y in records if y["arm"] == x["arm"][:-1] and y["seed"] == x["seed"]]  # fmt: skip
    return {**{k: main[k] for k in ("seeds", "n", "pilot_sd")}, "long_seeds": sorted({r["seed"] for r in long}),
            "prefix_check": max(prefix) if prefix else None, "diffs": diffs, "readings": readings,
            "diagnostics": diagnostics(main["runs"] + long), "runs": main["runs"] + long,
            "views": [r for r in records if r not in main["runs"]]}  # fmt: skip


def sections(result: dict, title: str) -> list[str]:
    runs = result["runs"] + [v for v in result["views"] if v["arm"].endswith("x2")]
    arms = sorted({r["arm"] for r in runs}, key=lambda a: (a.split("@")[1], a))
    rows = ["| regime, budget | BRIDGE − mix_lora (points) | seeds | reading |", "|---|---|---|---|"]
    rows += [f"| {k} | {pts(v['difference'])} | {v['difference']['n']} | {v['reading']} |"
             for k, v in result["readings"].items()]  # fmt: skip
    keys = [k for k in DIAGNOSTICS if any(k in v for v in result["diagnostics"].values())]
    diag = [
        "| arm | " + " | ".join(k.replace("bridge/", "") for k in keys) + " |",
        "|---" * (len(keys) + 1) + "|",
    ]
    diag += [f"| {a} | " + " | ".join(f"{v[k]:.3g}" if k in v else "–" for k in keys) + " |"
             for a, v in sorted(result["diagnostics"].items())]  # fmt: skip
    return [
        f"## {title}: final accuracy (test split)\n\n"
        + arm_table(runs, arms)
        + f"\n\nx2: the x4 runs read at step 2x the demo's; the x4 runs read at the demo's budget differ from the "
        f"demo-budget runs of the same seeds by at most {result['prefix_check']} (0: the read is exact).",
        f"## {title}: paired differences\n\n" + comparison_rows(result["diffs"]),
        f"## {title}: readings (BRIDGE − mix_lora)\n\n" + "\n".join(rows),
        f"## {title}: upper-level diagnostics, median over seeds and steps\n\n" + "\n".join(diag),
    ]


def run(ctx: StudyContext) -> dict:
    started = time.perf_counter()
    regs, trials, tuning = regimes(ctx), [], {}
    for name, reg in regs.items():
        tuning[name] = tune(ctx, name, reg, trials)
    betas = {name: {k: rec["best"] for k, rec in tuning[name].items()} for name in regs}
    tuned_ok = {name: all(rec["tuned"] for rec in tuning[name].values()) for name in regs}
    main = main_comparison(ctx, regs, betas, list(ctx.seeds))
    long = long_budgets(ctx, regs, betas, list(ctx.seeds[: 2 if ctx.quick else LONG_SEEDS]))
    result = evaluate(ctx, regs, tuned_ok, main, long)
    return report(ctx, regs, tuning, betas, tuned_ok, result, trials, started)


def report(ctx, regs, tuning, betas, tuned_ok, result, trials, started) -> dict:
    plot_arms(f"{ctx.output_dir}/curves.png", result["runs"], sorted({r["arm"] for r in result["runs"]}),
              "attribution: accuracy over steps (test)")  # fmt: skip
    plotted = plot_diagnostics(
        f"{ctx.output_dir}/diagnostics.png",
        result["runs"],
        [arm(k, n, b) for n in regs for k in ("bridge", "mix_lora") for b in (1, 2, 4)],
    )
    tune_rows = [
        "| regime | arm | α | β per trial: mean val acc. | best β (β/α) | edge |",
        "|---|---|---|---|---|---|",
    ]
    for name, recs in tuning.items():
        for k, rec in recs.items():
            tune_rows.append(
                f"| {name} | {k} | {regs[name]['alpha']:g} | {rec['mean_scores']} | {rec['best']:g} "
                f"({rec['best'] / regs[name]['alpha']:g}) | {rec['edge'] or 'interior'} |"
            )
    words = [f"- {k}: {v['reading']} ({pts(v['difference'])} points, {v['difference']['n']} seeds)"
             for k, v in result["readings"].items()]  # fmt: skip
    secs = ["## Design (fixed before any run)\n\n" + __doc__.split("\n\n", 1)[1].strip(),
            "## Tuning β (validation split, seeds 1-2; every trial)\n\n" + "\n".join(tune_rows),
            "## Seeds\n\nPilot paired SD of BRIDGE − mix_lora: "
            + ", ".join(f"{n} {_pct(s)}" for n, s in result["pilot_sd"].items())
            + f"; n = {result['n']} (target half-width {100 * TARGET_HALFWIDTH:.0f} points, cap "
            f"{2 if ctx.quick else MAX_SEEDS}); longer budgets on seeds {result['long_seeds']}.",
            *sections(result, "Test seeds"),
            "## Verdict\n\n" + "\n".join(words) + "\n\nFigures: `curves.png`, `diagnostics.png` ("
            + (", ".join(plotted) if plotted else "no upper-level series logged by this trainer") + ")."]  # fmt: skip
    data = {"regimes": {n: {"alpha": r["alpha"], "mix": r["mix"]} for n, r in regs.items()}, "tuning": tuning,
            "betas": betas, "tuned": tuned_ok, "trials": trials, **result}  # fmt: skip
    data["claim"] = {k: v["reading"] for k, v in result["readings"].items()}
    data["verdicts"] = {d["a"] + " vs " + d["b"]: d for d in result["diffs"]}
    return write(
        ctx, "Study `attribution` (issue 27): what does BRIDGE's upper level add?", secs, data, started
    )


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f} points"


def replicate(ctx: StudyContext, base_accuracy: dict, replication_seeds) -> dict:
    """Steps 2-3 with every rate and n fixed (this study's results.json) on the test seeds (with `ctx.reuse`,
    loaded) and on `replication_seeds`; a reading that differs between the two is "not robust"."""
    started = time.perf_counter()
    with open(os.path.join(ctx.output_dir, "results.json")) as f:
        data = json.load(f)
    check_disjoint(replication_seeds, ctx.seeds, "test")
    regs = regimes(ctx)
    for name in regs:
        regs[name].update(data["regimes"][name])
    # both seed sets' demo-budget comparisons run before either set's long runs (the long runs cost the most)
    sets = ((ctx.seeds, "test seeds"), (replication_seeds, "replication"))
    betas, n, k = data["betas"], data["n"], 2 if ctx.quick else LONG_SEEDS
    mains = [main_comparison(ctx, regs, betas, list(s), n, f" ({t})") for s, t in sets]
    longs = [long_budgets(ctx, regs, betas, list(s[:k]), f" ({t})") for s, t in sets]
    first, second = (evaluate(ctx, regs, data["tuned"], m, lg) for m, lg in zip(mains, longs, strict=True))
    same = {k: first["readings"][k]["reading"] == second["readings"][k]["reading"] for k in first["readings"]}
    rows = ["| regime, budget | test seeds | replication seeds | across the two |", "|---|---|---|---|"]
    rows += [f"| {k} | {pts(first['readings'][k]['difference'])}: {first['readings'][k]['reading']} | "
             f"{pts(second['readings'][k]['difference'])}: {second['readings'][k]['reading']} | "
             f"{'robust' if same[k] else '**not robust**'} |" for k in first["readings"]]  # fmt: skip
    secs = [f"## Fixed rates\n\nFrom {ctx.output_dir}/results.json: β " + json.dumps(data["betas"]) + f", n = "
            f"{data['n']}. No re-tuning.",
            "## Readings on the two seed sets\n\n" + "\n".join(rows) + "\n\nA reading stands only where it is "
            "robust. Every paired comparison on the two sets:\n\n"
            + robustness_table({d["a"] + " vs " + d["b"]: d for d in first["diffs"]},
                               {d["a"] + " vs " + d["b"]: d for d in second["diffs"]}),
            *sections(first, "Test seeds"), *sections(second, "Replication seeds")]  # fmt: skip
    return write(ctx, "Study `attribution`, replicated on a second seed set", secs,
                 {"betas": data["betas"], "n": data["n"], "robust": same, "test": first, "replication": second},
                 started, stem="replication")  # fmt: skip
