"""The premise checks of the toy (issue 9 §1), computed on the baselines alone and printed with their numbers:

1. RL-only ends clearly above the base: the paired mean gain over seeds exceeds its 95% CI.
2. SFT-only is the fast learner: at 20% of the budget it is ahead of RL-only (paired over seeds).
3. The base is reproducible: its validation accuracy was inside the pretraining band when pretraining stopped.

They never read BRIDGE's (or any combined method's) numbers.
"""

from __future__ import annotations

from .stats import mean_ci, paired_difference


def accuracy_at(curve: list, step: int) -> float:
    """Accuracy at the last evaluation at or before `step` (curves hold (step, samples, accuracy))."""
    return [acc for s, _, acc in curve if s <= step][-1]


def _by_seed(records: list[dict], method: str, step: int | None = None) -> dict[int, float]:
    return {r["seed"]: (r["final_accuracy"] if step is None else accuracy_at(r["curve"], step))
            for r in records if r["method"] == method}  # fmt: skip


def premise_checks(records: list[dict], base_accuracy: float, base_info: dict | None = None,
                   early_fraction: float = 0.2) -> list[dict]:  # fmt: skip
    """The checks as [{name, passed, numbers, text}], from `rl` and `sft` records on one split."""
    checks = []
    rl = _by_seed(records, "rl")
    if rl:
        gain = paired_difference(rl, dict.fromkeys(rl, base_accuracy))
        ok = gain["ci"] is not None and gain["low"] > 0
        checks.append({"name": "rl_gain", "passed": ok, "numbers": gain, "text":
            f"RL-only ends above the base: gain {_pts(gain)} over {gain['n']} seeds "
            f"(base {100 * base_accuracy:.1f}%, RL-only {100 * mean_ci(list(rl.values()))['mean']:.1f}%)"})  # fmt: skip
    if rl and _by_seed(records, "sft"):
        max_steps = next(r["steps"] for r in records if r["method"] == "rl")
        step = round(early_fraction * max_steps)
        sft_e, rl_e = _by_seed(records, "sft", step), _by_seed(records, "rl", step)
        diff = paired_difference(sft_e, rl_e)
        ok = diff["ci"] is not None and diff["low"] > 0
        checks.append({"name": "sft_fast", "passed": ok, "numbers": {**diff, "step": step}, "text":
            f"SFT-only is ahead of RL-only at {early_fraction:.0%} of the budget (step {step}): "
            f"SFT {100 * mean_ci(list(sft_e.values()))['mean']:.1f}% vs RL {100 * mean_ci(list(rl_e.values()))['mean']:.1f}%, "
            f"difference {_pts(diff)}"})  # fmt: skip
    if base_info is not None:
        s, history = base_info["settings"], base_info["history"]
        stop_step, stop_acc = history[-1]
        ok = s["band_low"] <= stop_acc <= s["band_high"]
        checks.append({"name": "base_in_band", "passed": ok,
                       "numbers": {"band": [s["band_low"], s["band_high"]], "stop_step": stop_step,
                                   "val_accuracy_at_stop": stop_acc, "history": history},
                       "text": f"The base's validation accuracy is in the band [{100 * s['band_low']:.0f}%, "
                               f"{100 * s['band_high']:.0f}%]: {100 * stop_acc:.1f}% when pretraining stopped at step "
                               f"{stop_step} (evaluated every {s['eval_every']} steps)"})  # fmt: skip
    return checks


def _pts(d: dict) -> str:
    if d["ci"] is None:
        return f"{100 * d['mean']:+.1f} points (no CI: one seed)"
    return f"{100 * d['mean']:+.1f} ± {100 * d['ci']:.1f} points (95% CI [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}])"


def format_checks(checks: list[dict], split: str) -> str:
    """One line per check: PASS/FAIL, then its numbers."""
    return "\n".join(f"- [{'PASS' if c['passed'] else 'FAIL'}] ({split}) {c['text']}." for c in checks)
