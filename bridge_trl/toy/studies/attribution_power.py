"""Study `attribution`, the power follow-up (`--study attribution --followup`; STUDY.md, "Follow-up").

The study's own comparison was capped at n = 4 seeds per set for compute (its sizing assumed ~2 h; it ran in 12
min). At the demo's budget its readings of BRIDGE − mix_lora were underpowered (95% CI half-widths 4.7 to 17.5
points): demo "not shown" on the test seeds and "changes the result (up)" on the replication seeds (not robust),
plateau "not shown" on both. This follow-up asks the same question with the power the design targeted, changing
nothing else:

- arms `bridge` and `mix_lora` (the reading is BRIDGE − mix_lora; `mix` is left out), both regimes, the demo's
  budget only (the x4 runs' pooled paired SD, 12.9 points over 2 + 2 seeds, would need ~75 seeds of 120 steps), every rate fixed from the study's
  `results.json` (no re-tuning);
- n per seed set: the study's rule (the smallest n whose t-based 95% CI half-width is ≤ 3 points) at the pooled
  paired SD of BRIDGE − mix_lora over the study's two seed sets (8 seeds), the larger of the two regimes', capped
  at `MAX_SEEDS`;
- two fresh seed sets (default 301-... and 401-..., disjoint from every seed used so far);
- the same generated readings; a reading stands only where it is the same on both follow-up sets. The study's
  own readings are reported unchanged beside them.
"""

from __future__ import annotations

import json
import os
import statistics
import time

from .attribution import TARGET_HALFWIDTH, arm, cell, reading, regimes
from .common import StudyContext, arm_table, check_disjoint, compare, pts, seeds_for_halfwidth
from .common import write_results as write

MAX_SEEDS = (
    30  # compute: 2 arms x 2 regimes x 30 seeds x 2 sets = 240 runs, ~30 min on 2 cores at ~0.35 s/step
)
FOLLOWUP_SEEDS = (tuple(range(301, 301 + MAX_SEEDS)), tuple(range(401, 401 + MAX_SEEDS)))
KINDS = ("bridge", "mix_lora")


def pooled_sd(replication: dict, regime: str) -> float:
    """Pooled paired SD of BRIDGE − mix_lora at the demo's budget over the study's two seed sets."""
    variances = []
    for part in ("test", "replication"):
        d = compare(replication[part]["runs"], arm("bridge", regime), arm("mix_lora", regime))
        variances.append(d["std"] ** 2)
    return statistics.fmean(variances) ** 0.5


def run(ctx: StudyContext, seed_sets=FOLLOWUP_SEEDS) -> dict:
    started = time.perf_counter()
    with open(os.path.join(ctx.output_dir, "results.json")) as f:
        data = json.load(f)
    with open(os.path.join(ctx.output_dir, "replication.json")) as f:
        study = json.load(f)
    used = {r["seed"] for part in ("test", "replication") for r in study[part]["runs"]}
    for seeds in seed_sets:
        check_disjoint(seeds, used, "the study's")
    check_disjoint(seed_sets[1], seed_sets[0], "the first follow-up set's")
    regs = regimes(ctx)
    for name in regs:
        regs[name].update(data["regimes"][name])
    sds = {name: pooled_sd(study, name) for name in regs}
    cap = 2 if ctx.quick else MAX_SEEDS
    n = seeds_for_halfwidth(max(sds.values()), TARGET_HALFWIDTH, 2, cap)
    sets = {}
    for label, seeds in zip(("follow-up A", "follow-up B"), seed_sets, strict=True):
        records = []
        for name, reg in regs.items():
            cells = [cell(ctx, k, name, reg, data["betas"][name][k], s) for s in seeds[:n] for k in KINDS]
            records += ctx.run(cells, "test", reg["splits"], phase=f"{label} ({name})")
        sets[label] = records
    readings = {
        label: {name: (d := compare(rs, arm("bridge", name), arm("mix_lora", name)), reading(d, data["tuned"][name]))
                for name in regs}
        for label, rs in sets.items()
    }  # fmt: skip
    robust = {name: len({readings[label][name][1] for label in sets}) == 1 for name in regs}
    rows = ["| regime (demo's budget) | the study: test / replication seeds (n = 4 each) | follow-up A | follow-up B | "
            "across A and B |", "|---|---|---|---|---|"]  # fmt: skip
    for name in regs:
        old = " / ".join(study[p]["readings"][f"{name} x1"]["reading"].split(" (")[0] + " "
                         + pts(study[p]["readings"][f"{name} x1"]["difference"]) for p in ("test", "replication"))  # fmt: skip
        new = [f"{pts(readings[label][name][0])}: {readings[label][name][1]}" for label in sets]
        rows.append(
            f"| {name} | {old} | {' | '.join(new)} | {'robust' if robust[name] else '**not robust**'} |"
        )
    verdict = [
        f"- {name}: " + (f"**{readings['follow-up A'][name][1]}** on both follow-up sets" if robust[name]
                         else "no reading stands (the two follow-up sets differ)")
        + f" (BRIDGE − mix_lora {pts(readings['follow-up A'][name][0])} and {pts(readings['follow-up B'][name][0])} points)."
        for name in regs
    ]  # fmt: skip
    secs = [
        "## Design (fixed before any follow-up run)\n\n" + __doc__.split("\n\n", 1)[1].strip(),
        "## Seeds\n\nPooled paired SD of BRIDGE − mix_lora over the study's 8 seeds: "
        + ", ".join(f"{k} {100 * v:.1f} points" for k, v in sds.items())
        + f"; n = {n} per set (target half-width {100 * TARGET_HALFWIDTH:.0f} points, cap {cap}); sets "
        + "; ".join(f"{label}: {min(s[:n])}-{max(s[:n])}" for label, s in zip(sets, seed_sets, strict=True)) + ".",
        "## Readings (BRIDGE − mix_lora, test split)\n\n" + "\n".join(rows),
        *(f"## {label}: final accuracy (test split)\n\n" + arm_table(rs, [arm(k, r) for r in regs for k in KINDS])
          for label, rs in sets.items()),
        "## Verdict\n\n" + "\n".join(verdict),
    ]  # fmt: skip
    out = {"betas": data["betas"], "pooled_sd": sds, "n": n, "robust": robust,
           "readings": {label: {name: {"difference": d, "reading": w} for name, (d, w) in r.items()}
                        for label, r in readings.items()},
           "runs": sets["follow-up A"], "replication_runs": sets["follow-up B"]}  # fmt: skip
    return write(
        ctx,
        "Study `attribution`, power follow-up on two fresh seed sets",
        secs,
        out,
        started,
        stem="followup",
    )


__all__ = ["FOLLOWUP_SEEDS", "MAX_SEEDS", "pooled_sd", "run"]
