"""When does BRIDGE help? The later paper's four claims tested on the toy, with the demo's protocol (issue 18).

- `parts` (C1): BRIDGE against mix and the ablations that isolate its pieces;
- `noise` (C2): every RL-using method with its training reward flipped at p = 0.1, 0.2, 0.4;
- `lambda` (C3): λ constant 0.3/0.5/0.7 and annealed 0 → 1, for bridge and mix;
- `plateau` (C4): a regime of imperfect traces where SFT plateaus below RL, calibrated on the baselines alone.

Each writes `<output_dir>/<name>/results.{json,md}` and its figures; `write_overview` joins the four reports.
`replicate_study` runs a study's final comparison on its test seeds and on a second, fresh seed set, and marks every
verdict that differs between the two "not robust" (`<output_dir>/<name>/replication.{json,md}`).
"""

from __future__ import annotations

import os
import time
from dataclasses import replace

from . import attribution, lam, noise, parts, peers, plateau
from .common import StudyContext, robustness_table, write_results

STUDIES = {"parts": parts, "noise": noise, "lambda": lam, "plateau": plateau, "peers": peers,
           "attribution": attribution}  # fmt: skip


def run_study(name: str, ctx: StudyContext, base_accuracy: dict) -> dict:
    """Run one study; `base_accuracy` is the base's greedy accuracy per split (the plateau premises need it)."""
    if name not in STUDIES:
        raise ValueError(f"Unknown study {name!r}; expected one of {sorted(STUDIES)}.")
    if name == "plateau":
        return plateau.run(ctx, base_accuracy)
    return STUDIES[name].run(ctx)


def replicate_study(name: str, ctx: StudyContext, base_accuracy: dict, replication_seeds) -> dict:
    """The study's final comparison on `ctx.seeds` and on `replication_seeds`, rates (and, for plateau, the regime)
    fixed: parts, noise and lambda tune nothing themselves (their rates are `tuned.json`'s), so they are run whole
    on each seed set (with `ctx.reuse`, the test seeds' finished runs are loaded); plateau runs its final
    comparison only (`plateau.replicate`)."""
    if name in ("plateau", "peers", "attribution"):  # each runs both seed sets itself (`<study>.replicate`)
        return STUDIES[name].replicate(ctx, base_accuracy, replication_seeds)
    started = time.perf_counter()
    first = run_study(name, ctx, base_accuracy)
    second_ctx = replace(ctx, output_dir=os.path.join(ctx.output_dir, "replicate"), seeds=list(replication_seeds),
                         phases={})  # fmt: skip
    second = run_study(name, second_ctx, base_accuracy)
    robust = first["claim"] == second["claim"]
    sections = [
        "## Verdicts on the two seed sets\n\n" + robustness_table(first["verdicts"], second["verdicts"])
        + f"\n\n**The study's verdict is {'robust' if robust else 'not robust'} across the two seed sets** "
        f"(test seeds {first['seeds']}: {first['claim']}; replication seeds {second['seeds']}: {second['claim']}). "
        f"Each set's full report: `results.md` and `replicate/results.md`.",
    ]  # fmt: skip
    return write_results(replace(ctx, phases={"test seeds": first["wall_seconds"],
                                              "replication seeds": second["wall_seconds"]}),
                         f"Study `{name}`, replicated on a second seed set", sections,
                         {"robust": robust, "test": {k: first[k] for k in ("seeds", "claim", "verdicts")},
                          "replication": {k: second[k] for k in ("seeds", "claim", "verdicts")}},
                         started, stem="replication")  # fmt: skip


def write_overview(output_dir: str, names: list[str]) -> str:
    """`<output_dir>/STUDY.md`: every study's results.md in turn (headings one level down)."""
    parts_md = ["# What the toy says about BRIDGE: the four studies\n"]
    for name in names:
        path = os.path.join(output_dir, name, "results.md")
        if os.path.exists(path):
            with open(path) as f:
                parts_md.append(f.read().replace("\n## ", "\n### ").replace("# ", "## ", 1))
    out = os.path.join(output_dir, "STUDY.md")
    with open(out, "w") as f:
        f.write("\n\n".join(parts_md))
    return out


__all__ = ["STUDIES", "StudyContext", "replicate_study", "run_study", "write_overview"]
