"""When does BRIDGE help? The later paper's four claims tested on the toy, with the demo's protocol (issue 18).

- `parts` (C1): BRIDGE against mix and the ablations that isolate its pieces;
- `noise` (C2): every RL-using method with its training reward flipped at p = 0.1, 0.2, 0.4;
- `lambda` (C3): λ constant 0.3/0.5/0.7 and annealed 0 → 1, for bridge and mix;
- `plateau` (C4): a regime of imperfect traces where SFT plateaus below RL, calibrated on the baselines alone.

Each writes `<output_dir>/<name>/results.{json,md}` and its figures; `write_overview` joins the four reports.
"""

from __future__ import annotations

import os

from . import lam, noise, parts, plateau
from .common import StudyContext

STUDIES = {"parts": parts, "noise": noise, "lambda": lam, "plateau": plateau}


def run_study(name: str, ctx: StudyContext, base_accuracy: dict) -> dict:
    """Run one study; `base_accuracy` is the base's greedy accuracy per split (the plateau premises need it)."""
    if name not in STUDIES:
        raise ValueError(f"Unknown study {name!r}; expected one of {sorted(STUDIES)}.")
    if name == "plateau":
        return plateau.run(ctx, base_accuracy)
    return STUDIES[name].run(ctx)


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


__all__ = ["STUDIES", "StudyContext", "run_study", "write_overview"]
