"""Study `plateau` (claim C4): a regime where SFT-only plateaus below RL-only, calibrated on the baselines alone.

SFT's data is made imperfect the way distilled traces are: a share of the traces has one arithmetic slip (the last
partial sum off by one, the boxed answer following it: `bridge_trl.toy.task.slip_traces`), the same rows for every
method and run. The RL reward stays the true one. Calibration, before any other method is run in the regime:

1. candidates, in this order (round 2; round 1's random slips at 0.25/0.5/0.75 failed premise 3): a share of
   0.6, then 0.75, of the traces slipped systematically upward (`direction="up"`);
2. per candidate, SFT-only's lr is tuned on validation as every method is in the regime (3 points half a decade
   apart around its clean tuned lr, seeds 1-2, an edge optimum extends the grid); RL-only never reads SFT data,
   so its clean tuning and runs hold for every candidate;
3. premises, on validation over paired seeds 1-5, at the tuned rates: (P1) RL-only gains over the base beyond its
   CI; (P2) SFT-only is ahead of RL-only at 20% of the budget, beyond the CI; (P3) SFT-only ends below RL-only
   beyond the CI, or gains nothing over its last half (the CI of final − 50% accuracy reaches 0);
4. the first candidate that passes all three is the regime; if none does, the one passing most (ties: the larger
   share) is run anyway and the report says the regime was not reached.

Then every other method is tuned on validation in the regime with the same grid, seeds and rule (alternating's and
cold start's SFT rate tied by the regime's SFT/RL ratio), and all eight run on the test split with 10 paired seeds,
evaluated also 3 and 6 steps after cold start's switch, so that its dip shows. The premises are re-checked on test,
and C4's verdict is given only if they hold there (otherwise the comparison is reported without one).

Seeds (issue 24): tuning uses seeds 1-2 and calibration 1-5, on validation; the test runs use the fresh seeds
101-110, and `--replicate` runs the final comparison again, regime and rates fixed, on 201-210 (the first run of this
study, 2 December 2026, reported seeds 1-10, which include the tuning seeds).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace

from ...methods import METHODS
from ..calibration import accuracy_at, format_checks, premise_checks
from ..report import comparisons, plot_curves, results_table, summarize
from ..run import Cell
from ..stats import comparison_sentence, paired_difference, verdict
from ..sweep import _nice, lrs_for, run_sweep, tuned_lrs
from ..task import slip_traces
from .common import (
    CALIBRATION_SEEDS,
    TEST_SEEDS,
    TUNING_SEEDS,
    StudyContext,
    check_disjoint,
    claim_word,
    gated_verdict,
    pts,
    robustness_table,
)
from .common import write_results as write

# (share of traces slipped, direction). Round 1, random ±1 slips at 0.25/0.5/0.75, was rejected on every premise 3
# (every trial in STUDY.md): a random slip leaves the right sum the greedy mode, so SFT still ends at 55-57%.
CANDIDATES = ((0.6, "up"), (0.75, "up"))
PREMISE_SEEDS, FINAL_SEEDS = CALIBRATION_SEEDS, TEST_SEEDS
PEERS = ("cold_start", "alternating", "mix", "chord", "luffy")  # C4: BRIDGE beats each of them
# The regime and validation-tuned rates of the committed run (STUDY.md, 2 December 2026): what `--replicate` runs
# when no results.json of this study is at hand. `best`: each method's tuned lr; the second rates follow from it
# as in the sweep (`lrs_for`, SFT/RL ratio = sft's lr / rl's lr).
COMMITTED_REGIME = {"share": 0.6, "direction": "up",
                    "best": {"rl": 1e-4, "sft": 3e-4, "bridge": 3e-4, "mix": 1e-4, "alternating": 1e-5,
                             "cold_start": 3e-5, "chord": 1e-4, "luffy": 1e-4}}  # fmt: skip


def regime_lrs(regime: dict) -> dict:
    """Every method's learning rates in a regime, from its tuned lrs (`best`) and the SFT/RL ratio."""
    ratio = regime["best"]["sft"] / regime["best"]["rl"]
    return {m: lrs_for(m, lr, ratio) for m, lr in regime["best"].items()}


def plateau_check(records: list[dict]) -> dict:
    """P3: SFT-only ends below RL-only beyond the CI, or its last-half gain's CI reaches 0 (or lies below)."""
    sft = {r["seed"]: r for r in records if r["method"] == "sft"}
    rl = {r["seed"]: r["final_accuracy"] for r in records if r["method"] == "rl"}
    below = paired_difference({s: r["final_accuracy"] for s, r in sft.items()}, rl)
    mid = round(0.5 * next(iter(sft.values()))["steps"])
    gain = paired_difference({s: r["final_accuracy"] for s, r in sft.items()},
                             {s: accuracy_at(r["curve"], mid) for s, r in sft.items()})  # fmt: skip
    ok = (below.get("ci") is not None and below["high"] < 0) or (
        gain.get("ci") is not None and gain["low"] <= 0
    )
    return {"name": "sft_plateau", "passed": ok, "numbers": {"sft_minus_rl": below, "last_half_gain": gain},
            "text": f"SFT-only ends below RL-only ({pts(below)} points) or gains nothing over its last half "
                    f"(step {mid} to the end: {pts(gain)} points)"}  # fmt: skip


def _checks(records, base_accuracy):
    checks = [c for c in premise_checks(records, base_accuracy) if c["name"] in ("rl_gain", "sft_fast")]
    return checks + [plateau_check(records)]


def calibrate(
    ctx: StudyContext, base_accuracy: dict, trials: list | None = None
) -> tuple[list[dict], dict, bool]:
    """Steps 1-4 of the design, on the baselines alone: (every candidate's record, the chosen one, reached?)."""
    quick = ctx.quick
    premise_seeds = (1, 2) if quick else PREMISE_SEEDS
    rl_lrs = tuned_lrs("rl", ctx.tuned)
    trials = [] if trials is None else trials
    rl_runs = ctx.run(
        [Cell("rl", s, rl_lrs, ctx.settings) for s in premise_seeds], "val", phase="calibration"
    )
    log, chosen = [], None
    for share, direction in ((0.6, "up"),) if quick else CANDIDATES:
        sft_data, slipped = slip_traces(ctx.splits["sft"], share, direction=direction)
        splits = {**ctx.splits, "sft": sft_data, "share": share, "direction": direction}
        go = _evaluate(ctx, splits, "calibration", ctx.settings, trials)
        sft_tuning = run_sweep(["sft"], _grid(ctx, ["sft"]), list(_tuning_seeds(ctx)), go, 0 if quick else 3)[
            "sft"
        ]
        sft_runs = ctx.run([Cell("sft", s, sft_tuning["learning_rates"], ctx.settings) for s in premise_seeds],
                           "val", splits, phase="calibration")  # fmt: skip
        checks = _checks(rl_runs + sft_runs, base_accuracy["val"])
        log.append({"share": share, "direction": direction, "slipped": len(slipped), "sft_tuning": sft_tuning, "checks": checks,
                    "passed": all(c["passed"] for c in checks), "sft_runs": sft_runs, "rl_runs": rl_runs})  # fmt: skip
        if log[-1]["passed"]:
            chosen = log[-1]
            break
    reached = chosen is not None
    chosen = chosen or max(log, key=lambda e: (sum(c["passed"] for c in e["checks"]), e["share"]))
    return log, chosen, reached


def _grid(ctx, methods) -> dict:
    """Per method, 3 points half a decade apart centred on its clean tuned lr (quick: that lr alone)."""
    out = {}
    for m in methods:
        lr = tuned_lrs(m, ctx.tuned)["learning_rate"]
        out[m] = [lr] if ctx.quick else [_nice(lr / 10**0.5), lr, _nice(lr * 10**0.5)]
    return out


def _tuning_seeds(ctx):
    return TUNING_SEEDS[:1] if ctx.quick else TUNING_SEEDS


def regime_splits(ctx: StudyContext, share: float, direction: str) -> dict:
    """The splits with the regime's slipped traces (the same rows for every method and run)."""
    sft = slip_traces(ctx.splits["sft"], share, direction=direction)[0]
    return {**ctx.splits, "sft": sft, "share": share, "direction": direction}


def final_comparison(
    ctx: StudyContext, base_accuracy: dict, regime: dict, seeds, phase: str = "final"
) -> dict:
    """All eight methods on the test split over `seeds` at the regime's fixed rates: the premises re-checked on
    test, BRIDGE against each method, cold start's dip, and C4's verdict, gated on the premises."""
    check_disjoint(seeds, (*PREMISE_SEEDS, *TUNING_SEEDS))
    lrs = regime_lrs(regime)
    switch = round(ctx.settings.cold_start_sft_ratio * ctx.settings.max_steps)
    # Only the final runs evaluate 3 and 6 steps after cold start's switch (its dip); tuning scores final accuracy.
    settings = replace(ctx.settings, extra_eval_steps=(switch + 3, switch + 6))
    splits = regime_splits(ctx, regime["share"], regime["direction"])
    records = ctx.run([Cell(m, s, lrs[m], settings) for m in METHODS for s in seeds], "test", splits,
                      phase=phase)  # fmt: skip
    test_checks = _checks(records, base_accuracy["test"])
    diffs = comparisons(records)
    c4 = {m: verdict(diffs[m]) for m in PEERS if m in diffs}
    holds = all(v == "beats" for v in c4.values())
    reached = all(c["passed"] for c in test_checks)
    cold = [r for r in records if r["method"] == "cold_start"]
    dip = paired_difference({r["seed"]: min(accuracy_at(r["curve"], switch + k) for k in (3, 6)) for r in cold},
                            {r["seed"]: accuracy_at(r["curve"], switch) for r in cold})  # fmt: skip
    peers = "; ".join(f"{c4[m]} {m} ({pts(diffs[m])})" for m in c4)
    text = gated_verdict("C4", test_checks, "test",
                         f"**C4 {'holds' if holds else 'does not hold'} on the toy**: BRIDGE {peers}.")  # fmt: skip
    return {"seeds": list(seeds), "lrs": lrs, "switch": switch, "test_checks": test_checks, "premises_hold": reached,
            "summary": summarize(records, 0.5), "diffs": diffs, "c4": c4, "c4_holds": holds,
            "claim": claim_word(holds, reached), "verdict_text": text, "cold_start_dip": dip,
            "verdicts": {f"bridge vs {m}": d for m, d in diffs.items()}, "runs": records}  # fmt: skip


def final_sections(result: dict) -> list[str]:
    """The report's sections on one final comparison."""
    n, switch, dip = len(result["seeds"]), result["switch"], result["cold_start_dip"]
    seeds = (
        f"{result['seeds'][0]}-{result['seeds'][-1]}" if len(result["seeds"]) > 1 else str(result["seeds"][0])
    )
    return [
        "## Premises on the test split (the final runs)\n\n" + format_checks(result["test_checks"], "test"),
        f"## All eight methods (test split, {n} paired seeds: {seeds})\n\n" + results_table(result["summary"], 0.5),
        "## BRIDGE against each method\n\n" + comparison_sentence("BRIDGE", result["diffs"]),
        f"## Cold start's dip after its switch (step {switch})\n\nLowest accuracy 3 or 6 steps after the switch "
        f"minus accuracy at the switch: {pts(dip)} points over {dip['n']} seeds ({verdict(dip)} 0).",
    ]  # fmt: skip


def _evaluate(ctx, splits, phase, settings, trials):
    """run_sweep's `evaluate`: train [(method, seed, lrs)] on validation, keep every trial's record."""

    def go(cells):
        records = ctx.run([Cell(m, s, lrs, settings) for m, s, lrs in cells], "val", splits, phase=phase)
        trials.extend({**r, "candidate": splits["share"]} for r in records)
        return [r["final_accuracy"] for r in records]

    return go


def run(ctx: StudyContext, base_accuracy: dict) -> dict:
    """`base_accuracy`: the base's greedy accuracy per split ({'val': ..., 'test': ...})."""
    started = time.perf_counter()
    trials = []
    log, chosen, reached = calibrate(ctx, base_accuracy, trials)
    rl_lrs = tuned_lrs("rl", ctx.tuned)
    tuning_seeds, final_seeds = _tuning_seeds(ctx), tuple(ctx.seeds)
    extensions = 0 if ctx.quick else 3
    share, direction = chosen["share"], chosen["direction"]
    splits = regime_splits(ctx, share, direction)
    sft_best = chosen["sft_tuning"]["best"]
    sft_ratio = sft_best / rl_lrs["learning_rate"]
    others = [m for m in METHODS if m not in ("rl", "sft")]
    go = _evaluate(ctx, splits, "tuning", ctx.settings, trials)
    tuning = run_sweep(others, _grid(ctx, others), list(tuning_seeds), go, extensions, sft_ratio)
    regime = {
        "share": share,
        "direction": direction,
        "best": {
            "rl": rl_lrs["learning_rate"],
            "sft": sft_best,
            **{m: rec["best"] for m, rec in tuning.items()},
        },
    }
    final = final_comparison(ctx, base_accuracy, regime, final_seeds)
    plot_curves(f"{ctx.output_dir}/curves.png", final["runs"], 0.5)

    calib_rows = ["| share slipped | SFT lr (val-tuned; mean val acc. per lr) | premise | val | numbers |",
                  "|---|---|---|---|---|"]  # fmt: skip
    for e in log:
        for c in e["checks"]:
            calib_rows.append(f"| {e['share']:g} {e['direction']} ({e['slipped']} traces) | {e['sft_tuning']['best']:g} "
                              f"({e['sft_tuning']['mean_scores']}) | {c['name']} | {'PASS' if c['passed'] else 'FAIL'}"
                              f" | {c['text']} |")  # fmt: skip
    tuning_rows = ["| method | best lr | mean val accuracy per lr | edge |", "|---|---|---|---|"]
    for m, rec in {"sft": chosen["sft_tuning"], **tuning}.items():
        tuning_rows.append(f"| {m} | {rec['best']:g} | {rec['mean_scores']} | {rec['edge'] or 'interior'} |")
    sections = [
        "## Design (fixed before any run)\n\n" + __doc__.split("\n\n", 1)[1].strip(),
        "## Calibration, every trial (validation split; baselines only)\n\n" + "\n".join(calib_rows)
        + f"\n\nRL-only at its clean tuned lr {rl_lrs['learning_rate']:g}; base val accuracy "
        f"{100 * base_accuracy['val']:.1f}%. **Regime {'reached' if reached else 'NOT reached'}: share {share:g}, {direction}.**",
        "## Tuning in the regime (validation split, seeds " + ", ".join(map(str, tuning_seeds)) + ")\n\n"
        + "\n".join(tuning_rows) + f"\n\nSFT/RL ratio for alternating and cold start: {sft_ratio:g}.",
        *final_sections(final),
        "## Verdict\n\n- " + final["verdict_text"]
        + ("" if reached else " (The regime was not reached on validation: read it as outside C4's premise.)")
        + "\n\nFigure: `curves.png` (accuracy over steps and over samples).",
    ]  # fmt: skip
    return write(ctx, "Study `plateau` (C4): imperfect traces, SFT plateaus below RL", sections,
                 {"reached": reached, "share": share, "regime": regime, "calibration": log, "tuning": tuning,
                  "sft_ratio": sft_ratio, "trials": trials, **final}, started)  # fmt: skip


def replicate(ctx: StudyContext, base_accuracy: dict, replication_seeds, regime: dict | None = None) -> dict:
    """The final comparison, regime and rates fixed (from this study's results.json, else `COMMITTED_REGIME`), on
    the test seeds (`ctx.seeds`; with `ctx.reuse` the study's own runs are loaded) and on `replication_seeds`; a
    verdict that differs between the two seed sets is "not robust". Writes replication.{md,json}."""
    started = time.perf_counter()
    path = os.path.join(ctx.output_dir, "results.json")
    source = "the committed regime (STUDY.md, 2 December 2026)"
    if regime is None and os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
        if "regime" in data and not data.get("quick"):
            regime, source = data["regime"], path
    regime = regime or COMMITTED_REGIME
    check_disjoint(replication_seeds, ctx.seeds, "test")
    first = final_comparison(ctx, base_accuracy, regime, tuple(ctx.seeds), phase="test seeds")
    second = final_comparison(ctx, base_accuracy, regime, tuple(replication_seeds), phase="replication seeds")
    robust = first["claim"] == second["claim"]
    sections = [
        f"## Fixed regime and rates\n\nFrom {source}: share {regime['share']:g} slipped {regime['direction']}; "
        "tuned lrs " + ", ".join(f"{m} {lr:g}" for m, lr in regime["best"].items()) + ". No re-tuning.",
        "## Verdicts on the two seed sets\n\n" + robustness_table(first["verdicts"], second["verdicts"])
        + f"\n\n- Test seeds: {first['verdict_text']}\n- Replication seeds: {second['verdict_text']}\n\n"
        f"**C4's verdict is {'robust' if robust else 'not robust'} across the two seed sets** "
        f"({first['claim']} / {second['claim']}).",
        *(f"## {name}\n\n" + "\n\n".join(x.replace("## ", "### ", 1) for x in final_sections(part))
          for name, part in (("Test seeds", first), ("Replication seeds", second))),
    ]  # fmt: skip
    return write(ctx, "Study `plateau` (C4), replicated on a second seed set", sections,
                 {"regime": regime, "regime_source": source, "robust": robust, "test": first, "replication": second},
                 started, stem="replication")  # fmt: skip
