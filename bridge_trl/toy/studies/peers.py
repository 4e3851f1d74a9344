"""Study `peers` (issue 28): HPT, ReLIFT and cold start with a measured switch beside the eight methods of the demo,
at the same tuning budget.

New arms: `hpt` (per prompt, SFT on its trace when ≤ `hpt_switch_gate` of its G rollouts are right, else GRPO;
one update on the sum, arXiv 2509.04419), `relift` (GRPO every step; failed prompts' traces buffered, one SFT update
at `sft_learning_rate` when the buffer is full, arXiv 2506.07527) and `cold_start_val_loss` (cold start whose SFT
phase ends when SFT's held-out loss stops improving, `cold_start_switch: val_loss`, arXiv 2512.11470). Their own
knobs stay at the toy's defaults (`ToyRunSettings`), as the eight's λ, μ and γ do.

1. Tuning, exactly as the eight got it (`tuned.json`): the same log grid (1e-5 to 1e-3, half a decade apart), the
   same seeds (1-2), the validation split (never test), final accuracy at the demo's budget, a best lr on an edge
   extends that arm's grid by one point (up to 3 times) and leaves it flagged untuned while it stays there. One rate
   per arm: `hpt` has one update; `relift` and `cold_start_val_loss` tie their SFT rate to it by the sweep's
   SFT/RL ratio (`tuned.json`'s `sft_ratio`), as alternating and cold start do. Every trial is recorded.
2. Final comparison on the test split, at the tuned rates (the eight: `tuned.json`), every arm on the same paired
   test seeds (fresh: never a tuning or calibration seed). The eight are re-run (their cached runs' cells differ).
3. The same final comparison, rates fixed, on the replication seeds (201-...), for the arms of `REPLICATION_ARMS`.

Comparisons, fixed beforehand: each new arm against BRIDGE and against the best of the eight, chosen on validation
(the largest mean validation accuracy at its tuned rate in `tuned.json`, never on test); paired differences with
95% CIs on each seed set. Premises of a comparison on a seed set: both arms' tuned lr is interior (not on a grid
edge), and the new arm did what it is for in every run of the set (`hpt` and `relift`: SFT traces consumed;
`cold_start_val_loss`: its SFT phase ended by the val-loss rule, before the ratio cap,
15 of 30 steps). A verdict ('beats', 'ties with', 'loses to') is given only where the premises held on both seed
sets and the two sets agree; otherwise the comparison is reported with the reason it has none.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace

from ..run import Cell
from ..sweep import run_sweep
from .common import (
    REPLICATION_SEEDS,
    TUNING_SEEDS,
    StudyContext,
    acc,
    arm_table,
    check_disjoint,
    compare,
    comparison_rows,
    plot_arms,
    pts,
    robustness_table,
    verdict_map,
)
from .common import write_results as write

EIGHT = ("bridge", "mix", "alternating", "rl", "sft", "cold_start", "chord", "luffy")
# arm: (method, ToyRunSettings overrides, the config field of a second rate tied to the tuned one by sft_ratio)
NEW_ARMS = {
    "hpt": ("hpt", {}, None),
    "relift": ("relift", {}, "sft_learning_rate"),
    "cold_start_val_loss": ("cold_start", {"cold_start_switch": "val_loss"}, "sft_learning_rate"),
}


def _sft_steps_below_cap(r: dict) -> bool:
    """Cold start's SFT phase ended before its cap (round(cold_start_sft_ratio · max_steps)): the val-loss rule
    switched, not the cap. Its SFT steps are its SFT samples over the SFT batch (one batch per SFT step)."""
    cap = round(r["settings"]["cold_start_sft_ratio"] * r["steps"])
    return r.get("sft_samples", 0) / r["settings"]["sft_batch_size"] < cap


# What each new arm must have done in every run of a seed set for its comparisons to count: (test, what it says).
MECHANISM = {
    "hpt": (
        lambda r: r.get("sft_samples", 0) > 0,
        "switched some prompts to SFT on their traces (SFT samples > 0)",
    ),
    "relift": (
        lambda r: r.get("sft_samples", 0) > 0,
        "made at least one SFT update on its buffer (SFT samples > 0)",
    ),
    "cold_start_val_loss": (
        _sft_steps_below_cap,
        "ended its SFT phase by the val-loss rule, before the ratio cap",
    ),
}
DESCRIBE = {"hpt": "HPT (SFT where rollouts fail, else GRPO)", "relift": "ReLIFT (GRPO + buffered SFT)",
            "cold_start_val_loss": "cold start, switch at SFT val-loss saturation"}  # fmt: skip
# Which arms the replication seed set runs: "all" or the new arms + BRIDGE + the best of the eight (pre-registered
# in STUDY.md from one run's measured time, so that the whole study fits ~35 min on 2 loaded cores).
REPLICATION_ARMS = "reduced"
# Test seeds 101-108 and the replication set 201-208 (`examples/reproduce_toy.py`'s `study_seeds`).
DEFAULT_SEEDS = 8


def arm_lrs(arm: str, lr: float, sft_ratio: float) -> dict:
    """One arm's rates at tuned lr `lr`: the eight as the sweep ties them (`lrs_for`), a new arm by `NEW_ARMS`."""
    if arm not in NEW_ARMS:
        from ..sweep import lrs_for

        return lrs_for(arm, lr, sft_ratio)
    lrs = {"learning_rate": lr}
    if NEW_ARMS[arm][2]:
        lrs[NEW_ARMS[arm][2]] = float(f"{lr * sft_ratio:.3g}")
    return lrs


def arm_cell(arm: str, seed: int, lrs: dict, settings) -> Cell:
    """The run of `arm` at `lrs` on `seed`: a new arm's method with its setting overrides, labelled `arm`."""
    method, overrides, _ = NEW_ARMS.get(arm, (arm, {}, None))
    return Cell(method, seed, lrs, replace(settings, **overrides), arm)


def best_baseline(tuned: dict) -> str:
    """The best of the eight on validation: the largest mean validation accuracy at its tuned lr (`tuned.json`)."""

    def val(m):
        rec = tuned["methods"][m]
        return rec["mean_scores"][f"{rec['best']:g}"]

    return max(EIGHT, key=val)


def tune(ctx: StudyContext, trials: list) -> dict:
    """Step 1: each new arm on `tuned.json`'s grid and seeds, validation split, edge extension (quick: one point
    of the grid, 1 seed, no extension). Every trial's record is appended to `trials`."""
    grid = ctx.tuned["grid"][2:3] if ctx.quick else ctx.tuned["grid"]
    seeds = TUNING_SEEDS[:1] if ctx.quick else tuple(ctx.tuned["seeds"])
    sft_ratio = ctx.tuned["sft_ratio"]
    # the sweep scored the final accuracy only (`reproduce_toy.parse_args`: eval_every = max_steps)
    settings = replace(ctx.settings, eval_every=ctx.settings.max_steps)

    def evaluate(cells):  # run_sweep hands (arm, seed, lrs_for's rates); an arm's rates are `arm_lrs`'
        records = ctx.run([arm_cell(a, s, arm_lrs(a, lrs["learning_rate"], sft_ratio), settings) for a, s, lrs in cells],
                          "val", phase="tuning")  # fmt: skip
        trials.extend(records)
        return [r["final_accuracy"] for r in records]

    result = run_sweep(list(NEW_ARMS), grid, list(seeds), evaluate, 0 if ctx.quick else 3)
    for arm, rec in result.items():
        rec["learning_rates"] = arm_lrs(arm, rec["best"], sft_ratio)
    return {"grid": grid, "seeds": list(seeds), "sft_ratio": sft_ratio, "arms": result}


def final_arms(best: str, quick: bool = False) -> tuple[list[str], list[str]]:
    """(arms on the test seeds, arms on the replication seeds): all eleven, then `REPLICATION_ARMS`; the quick mode
    (a smoke test of the pipeline in the default test suite) runs the reduced set on both."""
    reduced = list(dict.fromkeys(("bridge", best, *NEW_ARMS)))
    if quick:
        return reduced, reduced
    arms = [*EIGHT, *NEW_ARMS]
    return arms, arms if REPLICATION_ARMS == "all" else reduced


def final(ctx: StudyContext, plan: dict, lrs: dict) -> dict:
    """Steps 2-3: {seed set: (arms, seeds)} on the test split at fixed rates, in one pool (no idle worker between
    the two sets); {seed set: records}."""
    cells = [
        arm_cell(a, s, lrs[a], ctx.settings) for arms, seeds in plan.values() for a in arms for s in seeds
    ]
    records = ctx.run(cells, "test", phase="final comparisons (both seed sets)")
    return {n: [r for r in records if r["seed"] in seeds] for n, (_, seeds) in plan.items()}


def mechanism_check(records: list[dict], arm: str) -> dict:
    """Premise: the new arm's mechanism acted in every run of this seed set (`MECHANISM`)."""
    acted_in, what = MECHANISM[arm]
    runs = [r for r in records if r["arm"] == arm]
    acted = sum(bool(acted_in(r)) for r in runs)
    return {"name": f"{arm}_mechanism", "passed": bool(runs) and acted == len(runs),
            "text": f"{arm} {what} in {acted} of {len(runs)} runs"}  # fmt: skip


def tuned_check(arm: str, tuned: dict) -> dict:
    """Premise: the arm's tuned lr is interior, not on an edge of its (extended) grid."""
    rec = tuned[arm]
    return {"name": f"{arm}_tuned", "passed": bool(rec["tuned"]),
            "text": f"{arm}'s best lr {rec['best']:g} is " + ("interior" if rec["tuned"] else f"on the {rec['edge']} edge")}  # fmt: skip


def comparisons(records: list[dict], pairs: list[tuple[str, str]], tuned: dict) -> list[dict]:
    """Paired difference a − b per pair, with the premises of that comparison on this seed set."""
    out = []
    for a, b in pairs:
        checks = [tuned_check(a, tuned), tuned_check(b, tuned), mechanism_check(records, a)]
        out.append(
            {**compare(records, a, b), "premises": checks, "premises_hold": all(c["passed"] for c in checks)}
        )
    return out


def final_verdict(first: dict, second: dict | None) -> dict:
    """The verdict of one comparison over the two seed sets: given only where the premises held on both and the
    two sets' verdicts agree (`verdict`, else None with the `reason`)."""
    a, b = first["a"], first["b"]
    failed = [c["text"] for d in (first, second) if d is not None for c in d["premises"] if not c["passed"]]
    if second is None:
        return {"a": a, "b": b, "verdict": None, "reason": "not run on the replication seeds"}
    if failed:
        return {
            "a": a,
            "b": b,
            "verdict": None,
            "reason": "premise failed: " + "; ".join(dict.fromkeys(failed)),
        }
    if first["verdict"] != second["verdict"]:
        return {"a": a, "b": b, "verdict": None,
                "reason": f"not robust: {first['verdict']} on the test seeds, {second['verdict']} on the replication seeds"}  # fmt: skip
    return {"a": a, "b": b, "verdict": first["verdict"], "reason": None}


def verdict_sentence(v: dict, first: dict, second: dict | None) -> str:
    numbers = f"points: {pts(first)} on the test seeds" + (
        f", {pts(second)} on the replication seeds" if second else ""
    )
    if v["verdict"] is None:
        return f"- **No verdict on {v['a']} vs {v['b']}** ({numbers}): {v['reason']}."
    return f"- **{v['a']} {v['verdict']} {v['b']}** ({numbers}; premises held on both sets)."


def summary_table(sets: dict, arms: list[str], lrs: dict, val: dict, best: str) -> str:
    """All arms: tuned rates, validation score, final test accuracy and the paired differences on each seed set."""
    names = list(sets)
    head = ("| arm | tuned rates | val acc. at them | " + " | ".join(f"final % ({n})" for n in names) + " | "
            + " | ".join(f"− bridge ({n})" for n in names) + " | " + " | ".join(f"− {best} ({n})" for n in names) + " |")  # fmt: skip
    lines = [head, "|---" * (3 + 3 * len(names)) + "|"]
    rank = sorted(arms, key=lambda a: -statistics.fmean(
        [r["final_accuracy"] for r in sets[names[0]] if r["arm"] == a] or [-1]))  # fmt: skip
    for arm in rank:
        rates = ", ".join(
            f"{k.replace('_learning_rate', '').replace('learning_rate', 'lr')} {v:g}"
            for k, v in lrs[arm].items()
        )
        cells = [acc(r["final_accuracy"] for r in sets[n] if r["arm"] == arm) for n in names]
        for other in ("bridge", best):
            cells += ["–" if arm == other or not any(r["arm"] == arm for r in sets[n])
                      else pts(compare(sets[n], arm, other)) for n in names]  # fmt: skip
        lines.append(f"| {arm} | {rates} | {100 * val[arm]:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(ctx: StudyContext, replication_seeds=None, stem: str = "results") -> dict:
    """Tuning (validation), the final comparison on `ctx.seeds` (test) and on `replication_seeds` (default: as many
    of 201-210 as there are test seeds); writes `<stem>.{md,json}` and `curves.png`."""
    started = time.perf_counter()
    replication_seeds = list(replication_seeds or REPLICATION_SEEDS[: len(ctx.seeds)])
    used = {*ctx.tuned["seeds"], *TUNING_SEEDS}
    check_disjoint(ctx.seeds, used)
    check_disjoint(replication_seeds, used)
    check_disjoint(replication_seeds, ctx.seeds, "test")
    trials = []
    tuning = tune(ctx, trials)
    tuned = {**{m: ctx.tuned["methods"][m] for m in EIGHT}, **tuning["arms"]}
    lrs = {a: rec["learning_rates"] for a, rec in tuned.items()}
    val = {a: rec["mean_scores"][f"{rec['best']:g}"] for a, rec in tuned.items()}
    best = best_baseline(ctx.tuned)
    arms, again = final_arms(best, ctx.quick)
    sets = final(
        ctx, {"test seeds": (arms, list(ctx.seeds)), "replication seeds": (again, replication_seeds)}, lrs
    )
    pairs = [(a, b) for a in NEW_ARMS for b in dict.fromkeys(("bridge", best))]
    diffs = {n: comparisons(records, pairs, tuned) for n, records in sets.items()}
    verdicts = [
        final_verdict(d1, d2) for d1, d2 in zip(diffs["test seeds"], diffs["replication seeds"], strict=True)
    ]
    bridge_vs = {n: [compare(records, "bridge", a) for a in dict.fromkeys(r["arm"] for r in records) if a != "bridge"]
                 for n, records in sets.items()}  # fmt: skip
    top = {n: max(dict.fromkeys(r["arm"] for r in rs), key=lambda a, rs=rs: statistics.fmean(
        [r["final_accuracy"] for r in rs if r["arm"] == a])) for n, rs in sets.items()}  # fmt: skip
    plot_arms(
        f"{ctx.output_dir}/curves.png", sets["test seeds"], arms, "peers: accuracy over steps (test seeds)"
    )

    tuning_rows = ["| arm | grid (mean val acc. per lr, seeds " + ", ".join(map(str, tuning["seeds"])) + ") | best | "
                   "edge | extensions |", "|---|---|---|---|---|"]  # fmt: skip
    for a, rec in tuning["arms"].items():
        tuning_rows.append(f"| {a} | {rec['mean_scores']} | {rec['best']:g} | {rec['edge'] or 'interior'} | "
                           f"{'; '.join(rec['extensions']) or '–'} |")  # fmt: skip
    bridge_line = "\n".join(
        f"- {n} ({', '.join(map(str, sorted({r['seed'] for r in sets[n]})))}): best arm **{top[n]}**; BRIDGE "
        + "; ".join(f"{d['verdict']} {d['b']} ({pts(d)})" for d in bridge_vs[n]) + "." for n in sets)  # fmt: skip
    sections = [
        "## Design (pre-registered in STUDY.md before any run)\n\n" + __doc__.split("\n\n", 1)[1].strip(),
        "## Tuning of the new arms (validation split)\n\n" + "\n".join(tuning_rows)
        + f"\n\nSFT/RL ratio for the tied SFT rates: {tuning['sft_ratio']:g}. The best of the eight on validation: "
        f"**{best}** ({100 * val[best]:.1f}% at its tuned rate). Trials: {len(trials)} runs (all in `{stem}.json`).",
        "## All arms (test split; mean ± 95% CI over paired seeds; differences in points)\n\n"
        + summary_table(sets, arms, lrs, val, best),
        *(f"## {n.capitalize()}: {len(sorted({r['seed'] for r in rs}))} paired seeds\n\n"
          + arm_table(rs, [a for a in arms if any(r['arm'] == a for r in rs)], DESCRIBE)
          + "\n\n" + comparison_rows(diffs[n]) for n, rs in sets.items()),
        "## The pre-registered comparisons on the two seed sets\n\n"
        + robustness_table(verdict_map(diffs["test seeds"]), verdict_map(diffs["replication seeds"])),
        "## BRIDGE against every other arm\n\n" + bridge_line,
        "## Verdict\n\n" + "\n".join(verdict_sentence(v, d1, d2) for v, d1, d2 in
                                     zip(verdicts, diffs["test seeds"], diffs["replication seeds"], strict=True))
        + "\n\nFigure: `curves.png` (accuracy over steps, test seeds).",
    ]  # fmt: skip
    return write(ctx, "Study `peers` (issue 28): HPT, ReLIFT and cold start (val-loss switch) beside the eight",
                 sections,
                 {"tuning": tuning, "best_baseline": best, "learning_rates": lrs, "val_scores": val,
                  "replication_seeds": replication_seeds, "replication_arms": again, "diffs": diffs,
                  "final_verdicts": verdicts, "bridge_vs": bridge_vs, "top_arm": top,
                  "claim": "; ".join(f"{v['a']} vs {v['b']}: {v['verdict'] or 'no verdict'}" for v in verdicts),
                  "verdicts": verdict_map(diffs["test seeds"]), "trials": trials,
                  "runs": sets["test seeds"], "replication_runs": sets["replication seeds"]},
                 started, stem=stem)  # fmt: skip


def replicate(ctx: StudyContext, base_accuracy: dict, replication_seeds) -> dict:
    """`--replicate`: the study already runs both seed sets; this runs it on the given replication seeds (with
    `ctx.reuse`, tuning and the test seeds' runs are loaded) into `replication.{md,json}`."""
    return run(ctx, replication_seeds, stem="replication")


__all__ = ["EIGHT", "NEW_ARMS", "arm_lrs", "best_baseline", "final_verdict", "replicate", "run"]
