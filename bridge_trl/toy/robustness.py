"""Do the demo's conclusions survive floating-point noise? Two runs of the whole demo side by side.

Per-seed numbers are bit-identical on one machine only: another CPU sums in another order, and after a few dozen
optimizer steps the runs part ways. A claim of the demo holds only if it survives that. The perturbed run changes
the reduction order of the kernels (for example `ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2`, the
kernels of a CPU without AVX; `make demo-perturbed`), and this module puts its calibration checks, each method's
mean ± CI and its verdicts beside the reference run's, flagging every verdict that flips.
"""

from __future__ import annotations

from .stats import verdict


def _acc(s: dict) -> str:
    mean, ci = s["final_accuracy_mean"], s.get("final_accuracy_ci95")
    return f"{100 * mean:.1f} ± {100 * ci:.1f}" if ci is not None else f"{100 * mean:.1f}"


def _diff(d: dict) -> str:
    if d.get("ci") is None:
        return f"{100 * d['mean']:+.1f}"
    return f"{100 * d['mean']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"


def _numerics(meta: dict) -> str:
    n = meta.get("numerics", {})
    env = ", ".join(f"{k}={n[k]}" for k in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "DNNL_MAX_CPU_ISA")
                    if k in n)  # fmt: skip
    return (f"kernels {n.get('cpu_capability', '?')}, {n.get('threads_per_worker', '?')} thread(s) per worker"
            + (f", {env}" if env else ""))  # fmt: skip


def _check(c: dict | None) -> str:
    if c is None:
        return "–"
    n = c["numbers"]
    return ("PASS" if c["passed"] else "FAIL") + (
        f" {100 * n['mean']:+.1f} ± {100 * n['ci']:.1f}" if n.get("ci") else ""
    )


def _per_run(a: dict, b: dict) -> list[str]:
    """How far apart the runs are underneath the verdicts: identical accuracy and reward curves, and the largest
    difference of a float-valued log (the cooperative gain), which shows the perturbation took effect."""
    ra = {(r["method"], r["seed"]): r for r in a.get("runs", [])}
    rb = {(r["method"], r["seed"]): r for r in b.get("runs", [])}
    common = sorted(set(ra) & set(rb))
    if not common:
        return []
    same_acc = sum(ra[k]["curve"] == rb[k]["curve"] for k in common)
    same_reward = sum(ra[k]["reward_curve"] == rb[k]["reward_curve"] for k in common)
    gains = [abs(x[1] - y[1]) for k in common
             for x, y in zip(ra[k].get("cooperative_gain_curve") or [], rb[k].get("cooperative_gain_curve") or [],
                             strict=False)]  # fmt: skip
    return [f"| runs with identical accuracy curves | {same_acc} of {len(common)} | |",
            f"| runs with identical training-reward curves | {same_reward} of {len(common)} | |",
            f"| largest difference of a logged cooperative gain | {max(gains):.2g} | |" if gains else ""]  # fmt: skip


def flips(a: dict, b: dict) -> list[str]:
    """The baselines whose verdict (beats / ties with / loses to) differs between the two runs, and failed checks."""
    out = [m for m in a["comparisons"] if m in b["comparisons"]
           and verdict(a["comparisons"][m]) != verdict(b["comparisons"][m])]  # fmt: skip
    checks_b = {c["name"]: c["passed"] for c in b["checks"]}
    out += [f"check {c['name']}" for c in a["checks"] if checks_b.get(c["name"], c["passed"]) != c["passed"]]
    return out


def side_by_side(a: dict, b: dict, label_a: str = "reference", label_b: str = "perturbed") -> str:
    """Markdown: the two runs' numerics, checks, per-method accuracy, BRIDGE's paired differences and verdicts."""
    lines = [f"| | {label_a} | {label_b} |", "|---|---|---|",
             f"| numerics | {_numerics(a['meta'])} | {_numerics(b['meta'])} |",
             f"| base accuracy on {a['meta']['eval_split']} | {100 * a['meta']['base_accuracy']:.1f}% | "
             f"{100 * b['meta']['base_accuracy']:.1f}% |"]  # fmt: skip
    checks_b = {c["name"]: c for c in b["checks"]}
    for c in a["checks"]:
        other = checks_b.get(c["name"])
        lines.append(f"| check {c['name']} | {_check(c)} | {_check(other)} |")
    for m, s in a["summary"].items():
        if m in b["summary"]:
            lines.append(f"| {m}: final accuracy % | {_acc(s)} | {_acc(b['summary'][m])} |")
    for m, d in a["comparisons"].items():
        if m in b["comparisons"]:
            e = b["comparisons"][m]
            flag = "" if verdict(d) == verdict(e) else " **(flips)**"
            row = f"| bridge − {m} (points, 95% CI) | {_diff(d)}: {verdict(d)} | {_diff(e)}: {verdict(e)}{flag} |"
            lines.append(row)
    lines += _per_run(a, b)
    changed = flips(a, b)
    summary = ("Every verdict and every calibration check agrees between the two runs." if not changed else
               f"Verdicts or checks that differ between the runs: {', '.join(changed)}. A conclusion that flips "
               "rests on floating-point luck and is not claimed.")  # fmt: skip
    sentences = [f"- {label_a}: {a['sentence']}", f"- {label_b}: {b['sentence']}"]
    return "\n".join([*lines, "", summary, "", *sentences])
