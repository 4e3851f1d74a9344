"""The paper's Figure 1 comparison on a toy task, on the CPU in minutes, with no downloads.

    python examples/reproduce_toy.py                     # every method, 5 paired seeds, tuned lrs (the demo)
    python examples/reproduce_toy.py --quick             # every method, 1 seed, a few steps (CI smoke run)
    python examples/reproduce_toy.py --check             # the calibration checks only (rl, sft, base band)
    python examples/reproduce_toy.py --sweep             # re-tune every method's lr on the validation split
    python examples/reproduce_toy.py --methods bridge rl --seeds 1 2 --max_steps 40
    python examples/reproduce_toy.py --study plateau             # one of issue 18's studies (test seeds 101-110)
    python examples/reproduce_toy.py --study plateau --replicate --reuse  # its final comparison again on 201-210

Every method of DESIGN.md §3 trains from the calibrated tiny Qwen2 that ships with the package
(bridge_trl/toy/shipped_base/, hash-checked; nothing is pretrained) on the same budget with the learning rates
committed in bridge_trl/toy/tuned.json. `--pretrain_base` rebuilds a base from the recipe instead. Writes DIR/results.json, DIR/results.md, DIR/curves.png and DIR/dynamics.png; a sweep
writes DIR/sweep.json and updates tuned.json.
"""

import argparse
import json
import logging
import os
import platform
import time
from dataclasses import asdict

from bridge_trl.methods import METHODS
from bridge_trl.toy.base import (
    SHIPPED_BASE_DIR,
    BaseSettings,
    base_history,
    file_sha256,
    greedy_accuracy,
    toy_base_model,
)
from bridge_trl.toy.calibration import format_checks, premise_checks
from bridge_trl.toy.report import plot_curves, plot_dynamics, results_table, tuning_table, write_markdown
from bridge_trl.toy.robustness import flips, side_by_side
from bridge_trl.toy.run import Cell, ToyRunSettings, single_thread_worker
from bridge_trl.toy.run import run_cells as pool_run_cells
from bridge_trl.toy.studies import STUDIES, StudyContext, replicate_study, run_study, write_overview
from bridge_trl.toy.studies.common import (
    CALIBRATION_SEEDS,
    REPLICATION_SEEDS,
    TEST_SEEDS,
    TUNING_SEEDS,
    check_disjoint,
)
from bridge_trl.toy.studies.peers import EIGHT
from bridge_trl.toy.sweep import TUNED_PATH, load_tuned, run_sweep, tuned_lrs
from bridge_trl.toy.task import toy_splits

logger = logging.getLogger("reproduce_toy")
CALIBRATION_PATH = os.path.join(os.path.dirname(os.path.abspath(TUNED_PATH)), "CALIBRATION.md")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 seed, a few steps, the shipped base (< 2 min).")
    p.add_argument(
        "--check",
        action="store_true",
        help="Only the calibration checks: rl and sft, tuned lrs.",
    )
    p.add_argument("--strict", action="store_true", help="Exit with status 1 when a calibration check fails.")
    p.add_argument("--sweep", action="store_true", help="Tune every method's lr on the validation split.")
    p.add_argument("--study", default=None, choices=[*STUDIES, "all"],
                   help="Run one of issue 18's studies (or all four, `make study`) into OUTPUT_DIR/<name>/: parts "
                        "(C1), noise (C2), lambda (C3), plateau (C4), peers (issue 28: hpt, relift, cold start with a "
                        "val-loss switch beside the eight), attribution (issue 27: BRIDGE vs mix + LoRA at separately tuned β); "
                        "bridge_trl/toy/STUDY.md reports them.")  # fmt: skip
    p.add_argument("--replicate", action="store_true",
                   help="With --study: run the study's final comparison (regime and tuned rates fixed, no re-tuning) "
                        "on the test seeds and again on the fresh --replicate_seeds, into OUTPUT_DIR/<name>/"
                        "replication.md; a verdict that differs between the two seed sets is marked not robust.")  # fmt: skip
    p.add_argument("--followup", action="store_true",
                   help="With --study attribution, after --replicate: its power follow-up (STUDY.md), BRIDGE vs "
                        "mix + LoRA at the demo's budget, rates fixed, n from the study's pooled SD, on two fresh seed "
                        "sets (--seeds and --replicate_seeds; default 301-330 and 401-430), into followup.{md,json}.")  # fmt: skip
    p.add_argument("--replicate_seeds", nargs="+", type=int, default=None,
                   help="The second seed set of --replicate (default: as many of 201-210 as there are test seeds).")  # fmt: skip
    p.add_argument("--reuse", action="store_true",
                   help="Studies: load a run's record from OUTPUT_DIR/<name>/runs/records when the same cell, "
                        "settings and data already ran (e.g. the test seeds of --replicate after the study).")  # fmt: skip
    # The demo's eight (tuned.json); hpt and relift run in the `peers` study, which tunes them the same way.
    p.add_argument("--methods", nargs="+", default=list(EIGHT), choices=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=None,
                   help="Default 1-5 (quick: 1; sweep: 1 2; studies: test seeds from 101, never a tuning seed).")  # fmt: skip
    p.add_argument("--split", default=None, choices=["val", "test"], help="Default test (sweep: val).")
    p.add_argument("--output_dir", default=None, help="Default runs/toy_figure1 (sweep: runs/toy_sweep).")
    p.add_argument(
        "--max_steps", type=int, default=None, help=f"Default {ToyRunSettings.max_steps} (quick: 4)."
    )
    p.add_argument(
        "--eval_every", type=int, default=None, help=f"Default {ToyRunSettings.eval_every} (quick: 2)."
    )
    p.add_argument("--grid", nargs="+", type=float, default=None, help="Sweep grid (default: tuned.json's).")
    p.add_argument(
        "--tuned", default=TUNED_PATH, help="The tuning record the demo reads and a sweep rewrites."
    )
    p.add_argument(
        "--lr", type=float, default=None, help="One learning rate for every method (no tuned lrs)."
    )
    p.add_argument("--compare_with", default=None,
                   help="A results.json of another run of the same demo (e.g. the unperturbed one): results.md then "
                        "puts the two runs' checks, accuracies and verdicts side by side.")  # fmt: skip
    p.add_argument("--target", type=float, default=0.5, help="Accuracy for the steps-to-target column.")
    p.add_argument("--pretrain_base", action="store_true",
                   help="Rebuild the base from the recipe (BaseSettings) instead of loading the shipped one; it is "
                        "another model than the one tuned.json was tuned on.")  # fmt: skip
    p.add_argument("--base_path", default=None,
                   help="Train from this saved base (a `from_pretrained` folder with bridge_toy_settings.json) "
                        "instead of the shipped one: e.g. a calibration candidate.")  # fmt: skip
    p.add_argument("--base_steps", type=int, default=None,
                   help="Smoke base for tests: pretrain this many steps whatever the accuracy.")  # fmt: skip
    p.add_argument("--cache_dir", default=None, help="Where pretrained (not shipped) bases are saved.")
    p.add_argument("--eval_limit", type=int, default=None,
                   help="Evaluate on the first N sums of the split only (tests; default: all 250).")  # fmt: skip
    p.add_argument("--workers", type=int, default=2, help="Runs in parallel, one process each.")
    p.add_argument("--threads", type=int, default=1,
                   help="Torch threads per worker (1: each run is bit-identical on one machine; 2 changes the "
                        "reduction order of every parallel kernel, a perturbation test of the conclusions).")  # fmt: skip
    args = p.parse_args(argv)
    if args.followup and args.study != "attribution":
        p.error("--followup is the attribution study's power follow-up: give it with --study attribution")
    if args.check:
        args.methods = ["rl", "sft"]
    if not args.study:  # a study's default seeds depend on the study (`study_seeds`)
        args.seeds = args.seeds or ([1] if args.quick else [1, 2] if args.sweep else [1, 2, 3, 4, 5])
    args.split = args.split or ("val" if args.sweep else "test")
    args.output_dir = args.output_dir or (
        "runs/toy_sweep" if args.sweep else "runs/study" if args.study else "runs/toy_figure1"
    )
    args.max_steps = args.max_steps or (4 if args.quick else ToyRunSettings.max_steps)
    # A sweep scores the final accuracy only: it evaluates at step 0, the 20%/50% points and the end.
    args.eval_every = args.eval_every or (
        2 if args.quick else args.max_steps if args.sweep else ToyRunSettings.eval_every
    )
    return args


def base_settings(args) -> BaseSettings | None:
    """None: the shipped base (or, with --pretrain_base, the recipe's); else a smoke base of --base_steps steps."""
    if args.base_steps is None:
        return None
    # A smoke base: the band [0, 1] is met at the first evaluation, so it stops after exactly base_steps steps.
    return BaseSettings(band_low=0.0, band_high=1.0, eval_every=args.base_steps, max_steps=args.base_steps)


def numerics(threads: int) -> dict:
    """What sets the floating-point reduction order of a run: torch threads and the kernels' instruction set."""
    import torch

    return {"torch": torch.__version__, "threads_per_worker": threads, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            **{k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "DNNL_MAX_CPU_ISA")
               if k in os.environ}}  # fmt: skip


def run_cells(cells, base_path, splits, settings, args, split) -> list[dict]:
    """Train every (method, seed, lrs) cell under `settings` in worker processes (`bridge_trl.toy.run.run_cells`)."""
    cells = [Cell(m, s, lrs, settings) for m, s, lrs in cells]
    return pool_run_cells(cells, base_path, splits, split, os.path.join(args.output_dir, "runs"), args.workers,
                          args.threads)  # fmt: skip


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    single_thread_worker(args.threads)
    logging.getLogger("bridge_trl").setLevel(logging.INFO)
    os.makedirs(args.output_dir, exist_ok=True)
    splits = toy_splits()
    bs = base_settings(args)
    base_path = args.base_path or toy_base_model(
        bs, splits, cache_dir=args.cache_dir, pretrain=args.pretrain_base
    )
    settings = ToyRunSettings(max_steps=args.max_steps, eval_every=args.eval_every)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.eval_limit:  # a tiny evaluation set, for tests: the pretraining band still uses all of val
        splits = {**splits, args.split: splits[args.split].select(range(args.eval_limit))}
    if args.study:  # the test split is the report's; val is where anything is tuned or calibrated
        splits = (
            {**splits, "val": splits["val"].select(range(args.eval_limit))} if args.eval_limit else splits
        )
        return studies(args, base_path, splits, settings, start)
    base = AutoModelForCausalLM.from_pretrained(base_path)
    base_accuracy = greedy_accuracy(base, AutoTokenizer.from_pretrained(base_path), splits[args.split])
    if args.sweep:
        return sweep(args, base_path, splits, settings, start)

    tuned = load_tuned(args.tuned)
    lrs = {m: ({"learning_rate": args.lr} if args.lr else tuned_lrs(m, tuned)) for m in args.methods}
    cells = [(m, s, lrs[m]) for m in args.methods for s in args.seeds]
    records = run_cells(cells, base_path, splits, settings, args, args.split)
    checks = premise_checks(records, base_accuracy, base_history(base_path))
    untuned = [m for m in args.methods if not tuned["methods"].get(m, {}).get("tuned", False)]
    selection = (f"one lr for every method ({args.lr:g}), set by --lr." if args.lr else
                 f"from {os.path.relpath(args.tuned)} ({tuned['how']})"
                 + (f" Not tuned (edge optimum or no sweep yet): {', '.join(untuned)}." if untuned else ""))  # fmt: skip
    meta = {
        "target_accuracy": args.target, "eval_split": args.split, "num_eval": len(splits[args.split]),
        "base_path": base_path, "base_params": sum(p.numel() for p in base.parameters()),
        "base_accuracy": base_accuracy, "base": base_history(base_path), "base_sha256": file_sha256(
            os.path.join(base_path, "model.safetensors")), "shipped_base": base_path == SHIPPED_BASE_DIR,
        "lr_selection": selection, "workers": args.workers, "threads": args.threads, "cuts": CUTS,
        "numerics": numerics(args.threads),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores", "argv": vars(args),
    }  # fmt: skip
    meta["total_seconds"] = time.perf_counter() - start
    with open(
        CALIBRATION_PATH
    ) as f:  # the calibration trials, rejected ones included, travel with the results
        extra = "## Tuning record\n\n" + tuning_table(tuned) + "\n\n" + f.read().replace("# ", "## ", 1)
    robustness = None
    if args.compare_with:  # the perturbation test: this run beside the reference run
        with open(args.compare_with) as f:
            reference = json.load(f)
        robustness = {"reference": os.path.abspath(args.compare_with)}
    out = write_markdown(os.path.join(args.output_dir, "results.md"), records, meta, checks, extra)
    if robustness is not None:
        this = {"meta": meta, **out, "checks": checks, "runs": records}
        robustness.update(
            flips=flips(reference, this), table=side_by_side(reference, this, "reference", "this run")
        )
        with open(os.path.join(args.output_dir, "results.md"), "a") as f:
            f.write(
                f"\n\n## Against {args.compare_with} (floating-point perturbation)\n\n{robustness['table']}\n"
            )
        meta["robustness"] = robustness
    plot_curves(os.path.join(args.output_dir, "curves.png"), records, args.target)
    plot_dynamics(os.path.join(args.output_dir, "dynamics.png"), records)
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump({"meta": meta, **out, "checks": checks, "runs": records}, f, indent=1)
    print(results_table(out["summary"], args.target))
    print("\nCalibration checks (baselines only):\n" + format_checks(checks, args.split))
    print("\n" + out["sentence"])
    print(f"\nWrote {args.output_dir}/results.md, results.json, curves.png, dynamics.png in "
          f"{meta['total_seconds']:.0f} s")  # fmt: skip
    if args.strict and not all(c["passed"] for c in checks):
        raise SystemExit(
            "A calibration check failed: " + "; ".join(c["text"] for c in checks if not c["passed"])
        )
    return {**out, "checks": checks}


CUTS = (
    "30 optimizer steps (phase 1: 80; 8 methods x 5 seeds must fit in 10 min on 2 cores; chosen on base E, where "
    "SFT's format switch was done by step 4, before the 20% point, step 6: on the shipped base F, at SFT's tuned "
    "rate, it is not, see CALIBRATION.md phase 3); evaluation at steps 0, 6, 15, 30 only "
    "(on all 250 held-out sums: a smaller set would widen every CI); the sweep scores the final accuracy only and "
    "evaluates at steps 0, 6, 15, 30; a 0.33M-parameter model (DESIGN.md's 0.8M doubled the time for no gain); "
    "4 prompts x 8 rollouts per step kept (fewer rollouts would weaken RL's group baseline)."
)

SWEEP_HOW = (
    "`examples/reproduce_toy.py --sweep`: every method gets the same trials, the lrs of one log grid (half-decade "
    "steps, 2 decades) x the same seeds, scored by final accuracy on the validation split (never test) at the "
    "demo's budget; a best lr on the grid's edge extends that method's grid and is flagged untuned until interior. "
    "Two-rate methods tune one rate and tie the other: BRIDGE beta = alpha; alternating's and cold start's SFT rate "
    "= their RL rate x sft_ratio = (sft's best lr) / (rl's best lr), fixed by the rl and sft sweeps, which run "
    "first. chord, mix and luffy have one rate."
)


def sweep(args, base_path, splits, settings, start) -> dict:
    """Tune each method on the validation split (`bridge_trl.toy.sweep`), write DIR/sweep.json and tuned.json."""
    tuned = load_tuned(args.tuned)
    grid = args.grid or tuned["grid"]

    trials = []  # every trial's record, kept in DIR/sweep_runs.json (curves, s/step) beside the scores

    def evaluate(cells):
        records = run_cells(cells, base_path, splits, settings, args, "val")
        trials.extend(records)
        return [r["final_accuracy"] for r in records]

    # The single-kind methods first: their optima fix the SFT/RL ratio that ties alternating's second rate.
    first = [m for m in args.methods if m in ("rl", "sft")]
    result = run_sweep(first, grid, args.seeds, evaluate) if first else {}
    best = {m: (result.get(m) or tuned["methods"][m])["best"] for m in ("rl", "sft")}
    sft_ratio = best["sft"] / best["rl"]
    rest = [m for m in args.methods if m not in first]
    if rest:
        result.update(run_sweep(rest, grid, args.seeds, evaluate, sft_ratio=sft_ratio))
    tuned["sft_ratio"] = sft_ratio
    for m, rec in result.items():
        logger.info("%-11s best lr %g (%s): %s", m, rec["best"], "tuned" if rec["tuned"] else f"EDGE {rec['edge']}",
                    rec["mean_scores"])  # fmt: skip
    tuned["methods"].update(result)
    tuned.update(how=SWEEP_HOW, grid=grid, seeds=args.seeds, settings=asdict(settings), split="val",
                 seconds=time.perf_counter() - start)  # fmt: skip
    with open(os.path.join(args.output_dir, "sweep.json"), "w") as f:
        json.dump(tuned, f, indent=1)
    runs_path = os.path.join(args.output_dir, "sweep_runs.json")
    if os.path.exists(runs_path):  # a sweep of some methods keeps the other methods' earlier trials
        with open(runs_path) as f:
            trials = [t for t in json.load(f) if t["method"] not in result] + trials
    with open(runs_path, "w") as f:
        json.dump(trials, f)
    with open(args.tuned, "w") as f:
        json.dump(tuned, f, indent=1)
    print(f"Wrote {args.output_dir}/sweep.json and {args.tuned} in {time.perf_counter() - start:.0f} s")
    return tuned


def study_seeds(name: str, args) -> list[int]:
    """A study's test seeds: --seeds, else fresh ones (from 101, disjoint from every tuning and calibration seed):
    a quick mode pairs two (its CIs need them); noise and lambda 3, so that each fits 40 min on 2 cores; parts
    starts its pilot at the first; plateau 10; peers `peers.DEFAULT_SEEDS` (its replication set as many)."""
    if args.seeds:
        return list(args.seeds)
    if args.quick:
        return list(TEST_SEEDS[:2])
    if name == "peers":
        return list(TEST_SEEDS[: STUDIES[name].DEFAULT_SEEDS])
    return list(
        TEST_SEEDS if name in ("plateau", "attribution") else TEST_SEEDS[:3]
    )  # attribution: pilot + n


def studies(args, base_path, splits, settings, start) -> dict:
    """Issue 18's studies (`bridge_trl.toy.studies`), each into OUTPUT_DIR/<name>/; `all` also writes STUDY.md.
    With --replicate, each study's final comparison on the test seeds and on the replication seeds instead."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    names = list(STUDIES) if args.study == "all" else [args.study]
    tuned = load_tuned(args.tuned)
    used = {*tuned.get("seeds", ()), *TUNING_SEEDS, *CALIBRATION_SEEDS}  # never a report seed
    seeds = {name: study_seeds(name, args) for name in names}
    again = {name: args.replicate_seeds or list(REPLICATION_SEEDS[: len(seeds[name])]) for name in names}
    for name in names:  # refused before any run
        check_disjoint(seeds[name], used)
        if args.replicate:
            check_disjoint(again[name], used)
            check_disjoint(again[name], seeds[name], "test")
    model, tokenizer = (
        AutoModelForCausalLM.from_pretrained(base_path),
        AutoTokenizer.from_pretrained(base_path),
    )
    base_accuracy = {s: greedy_accuracy(model, tokenizer, splits[s]) for s in ("val", "test")}
    results = {}
    for name in names:
        ctx = StudyContext(name=name, output_dir=os.path.join(args.output_dir, name), base_path=base_path,
                           splits=splits, settings=settings, tuned=tuned, seeds=seeds[name], quick=args.quick,
                           reuse=args.reuse, workers=args.workers, threads=args.threads)  # fmt: skip
        if args.followup:
            from bridge_trl.toy.studies import attribution_power

            sets = (args.seeds or attribution_power.FOLLOWUP_SEEDS[0],
                    args.replicate_seeds or attribution_power.FOLLOWUP_SEEDS[1])  # fmt: skip
            for extra in sets:
                check_disjoint(extra, used)
            results[name] = attribution_power.run(ctx, sets)
            print(f"Study {name}: wrote {ctx.output_dir}/followup.md and followup.json in "
                  f"{results[name]['wall_seconds']:.0f} s")  # fmt: skip
            continue
        if args.replicate:
            results[name] = replicate_study(name, ctx, base_accuracy, again[name])
            print(f"Study {name}: wrote {ctx.output_dir}/replication.md and replication.json in "
                  f"{results[name]['wall_seconds']:.0f} s")  # fmt: skip
            continue
        results[name] = run_study(name, ctx, base_accuracy)
        print(f"Study {name}: wrote {ctx.output_dir}/results.md, results.json and figures in "
              f"{results[name]['wall_seconds']:.0f} s")  # fmt: skip
    if len(names) > 1 and not args.replicate:
        print(f"Wrote {write_overview(args.output_dir, names)} in {time.perf_counter() - start:.0f} s")
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
