"""`make gpu-check`: prove the CUDA path and measure BRIDGE's cost on one GPU, in one command (≤ 8 minutes).

    python benchmarks/gpu_check.py [--output_dir runs/gpu_check] [--budget_s 420]

1. The machine: GPU, driver, CUDA, and the versions of torch, transformers, trl, peft, accelerate, deepspeed,
   datasets and vLLM.
2. Correctness: `pytest -m gpu tests/test_gpu.py` (bf16 step-0 identity, β = 0 against mix, exact resume, pinned
   `shadow_offload: cpu`, gradient checkpointing, merged save/reload, ZeRO-2 and ZeRO-3 over NCCL); each test's
   outcome and duration. With vLLM importable, `pytest -m vllm` too; otherwise the report says it was not tried.
3. Cost, the paper's Table 5 shape (`benchmarks/step_cost.py`): Qwen2.5 architectures with random weights,
   completions forced to 3,072 and 1,024 tokens, 5 rollouts per prompt, the paper's per-GPU share of its batch
   (64 prompts on 4 GPUs: 16 prompts × 5 = 80 completions, 16 SFT examples), HF generation decoded once and
   replayed. Rows run in order of importance until the time budget is spent (the rest is listed as skipped).

Writes `report.md` and `report.json` under the output directory. Without CUDA it collects the GPU tests (so they
cannot rot unseen: CI runs this), says that it skipped, and exits 0.
"""

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "deepspeed", "datasets", "vllm")
PAPER = {"time": 1.13, "memory": 1.14}  # Table 5 read as BRIDGE / RL-zero, Qwen2.5-3B on 4×A100 at 3k tokens
# The paper's per-GPU share: 64 prompts × 5 rollouts over 4 GPUs, 16 SFT examples; micro-batches of two groups.
SHAPE = ["--batch", "80", "--micro_batch", "10", "--generations", "5", "--sft_batch", "16", "--steps", "1",
         "--time_first_step", "--replay", "--decode_tokens", "512"]  # fmt: skip
# (architecture, length, variants) in order of importance: the 3,072-token row on one model is the must.
COST_ROWS = [
    (
        "qwen2.5-0.5b",
        3072,
        [
            "rl",
            "bridge",
            "bridge:merge_adapter_for_generation=false",
            "bridge:shadow_offload=cpu",
            "bridge:shadow_optimizer=sgd",
        ],
    ),
    ("qwen2.5-1.5b", 3072, ["rl", "bridge"]),
    ("qwen2.5-0.5b", 1024, ["rl", "bridge"]),
]


def versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine() -> dict:
    import torch

    info = {
        "cuda_available": torch.cuda.is_available(),
        "torch_cuda": torch.version.cuda,
        "versions": versions(),
    }
    if info["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=round(props.total_memory / 2**30, 1))
        try:
            smi = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            info["driver"] = subprocess.run(smi, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            info["driver"] = None
    return info


def run_pytest(marker: str, junit: Path, timeout: float) -> dict:
    """Run the tests of one marker; per-test outcome and seconds from pytest's JUnit XML."""
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-m",
        marker,
        f"--junitxml={junit}",
    ]
    if marker == "gpu":
        command.append("tests/test_gpu.py")
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-4000:]
    except subprocess.TimeoutExpired as e:
        rc, tail = "timeout", str(e.stdout or "")[-4000:]
    tests = []
    if junit.exists():
        for case in ET.parse(junit).getroot().iter("testcase"):
            outcome = "passed"
            for kind in ("failure", "error", "skipped"):
                node = case.find(kind)
                if node is not None:
                    outcome = {"failure": "failed"}.get(kind, kind)
                    detail = " ".join((node.get("message") or "").split())[:300]  # one table row
                    break
            else:
                detail = ""
            tests.append({"name": case.get("name"), "outcome": outcome, "seconds": float(case.get("time", 0)),
                          "detail": detail})  # fmt: skip
    return {
        "marker": marker,
        "returncode": rc,
        "seconds": time.perf_counter() - start,
        "tests": tests,
        "tail": tail,
    }


def run_cost(output_dir: Path, deadline: float) -> dict:
    """step_cost.py rows in order, each in its own process, while time is left."""
    rows, skipped, failures = [], [], []
    for arch, length, variants in COST_ROWS:
        left = deadline - time.perf_counter()
        if left < 60:
            skipped.append(f"{arch} {length} tokens")
            continue
        out = output_dir / f"cost_{arch}_{length}.json"
        command = [sys.executable, "benchmarks/step_cost.py", "--arch", arch, "--lengths", str(length), *SHAPE,
                   "--variants", *variants, "--output", str(out)]  # fmt: skip
        start = time.perf_counter()
        try:
            proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=left)
            ok, tail = proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        except subprocess.TimeoutExpired as e:
            ok, tail = False, f"stopped at the time budget after {left:.0f} s\n" + str(e.stdout or "")[-2000:]
        if out.exists():  # written after each row, so a stopped run keeps what it measured
            rows.extend(json.loads(out.read_text())["rows"])
        if not ok:
            failures.append({"row": f"{arch} {length}", "tail": tail})
        print(
            f"cost {arch} {length}: {'ok' if ok else 'FAILED'} in {time.perf_counter() - start:.0f} s",
            flush=True,
        )
    return {"rows": rows, "skipped_for_time": skipped, "failures": failures}


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = ["# `make gpu-check` report", ""]
    if not m["cuda_available"]:
        c = report["collected"]
        lines += [
            f"No CUDA device here: skipped. {c['count']} GPU tests collected (rc {c['returncode']}).",
            "",
        ]
        return "\n".join(lines)
    v = m["versions"]
    lines += [f"- GPU: {m['gpu']} ({m['gpu_memory_gib']} GiB), driver {m.get('driver')}, CUDA {m['torch_cuda']}",
              "- " + ", ".join(f"{k} {v[k]}" for k in PACKAGES), f"- wall time: {report['wall_s']:.0f} s", ""]  # fmt: skip
    for suite in report["tests"]:
        counts = {}
        for t in suite["tests"]:
            counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
        lines += [f"## Tests `-m {suite['marker']}`: {counts} (rc {suite['returncode']}, {suite['seconds']:.0f} s)", "",
                  "| test | outcome | s | detail |", "|---|---|---|---|"]  # fmt: skip
        lines += [
            f"| {t['name']} | {t['outcome']} | {t['seconds']:.1f} | {t['detail']} |" for t in suite["tests"]
        ]
        lines.append("")
    if report["vllm"]:
        lines += [report["vllm"], ""]
    cost = report["cost"]
    lines += ["## Cost against GRPO (`benchmarks/step_cost.py`, HF generation, bf16 autocast)", "",
              "80 completions (16 prompts × 5) and 16 SFT examples per step, micro-batches of 10; decoding timed once, "
              "replayed; 512 tokens decoded and timed, charged ×length/512; one step, timed (its one-time costs included; decoding warmed up on 8 tokens). `limit` = GRPO's step + the unavoidable extra (SFT pass + "
              f"shadow pass + θ̂'s optimizer step). Paper (Table 5, Qwen2.5-3B, 4×A100): time ×{PAPER['time']}, "
              f"memory ×{PAPER['memory']}.", "",
              "| model | length | variant | time bridge/rl | memory bridge/rl | limit/rl | over limit | rl step s | "
              "bridge step s | decode s (rl / bridge) | peak GiB (rl / bridge) |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in cost["rows"]:
        rl = r["rl"]
        for b, c in zip(r["bridges"], r["comparisons"], strict=True):
            lines.append(
                f"| {r['arch']} ({r['params'] / 1e6:.0f}M) | {r['length']} | {c['variant']} | {c['time_ratio']:.2f} | "
                f"{c['memory_ratio']:.2f} | {c['limit_ratio']:.2f} | {c['over_limit']:+.1%} | {rl['step_s']:.1f} | "
                f"{b['step_s']:.1f} | {rl['phases_s']['decode']:.1f} / {b['phases_s']['decode']:.1f} | "
                f"{rl['peak_mb'] / 1024:.1f} / {b['peak_mb'] / 1024:.1f} |"
            )  # fmt: skip
    lines += ["", "Per phase (seconds per step):", "", "| model | length | variant | step | "
              + " | ".join(PHASE_NAMES) + " |", "|---|---|---|---|" + "---|" * len(PHASE_NAMES)]  # fmt: skip
    for r in cost["rows"]:
        for x in (r["rl"], *r["bridges"]):
            cells = " | ".join(f"{x['phases_s'][k]:.2f}" for k in PHASE_NAMES)
            lines.append(f"| {r['arch']} | {r['length']} | {x['variant']} | {x['step_s']:.2f} | {cells} |")
    if cost["skipped_for_time"]:
        lines += ["", f"Skipped for the time budget: {', '.join(cost['skipped_for_time'])}."]
    for f in cost["failures"]:
        lines += ["", f"**{f['row']} failed**:", "```", f["tail"][-1500:], "```"]
    return "\n".join(lines) + "\n"


PHASE_NAMES = ("decode", "generation", "sft_fwd_bwd", "rl_fwd_bwd", "shadow_fwd_bwd", "shadow_swap", "optimizer",
               "shadow_optimizer")  # fmt: skip


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output_dir", default="runs/gpu_check")
    parser.add_argument(
        "--budget_s", type=float, default=420, help="the whole command stops starting work after this"
    )
    parser.add_argument("--skip_tests", action="store_true", help="only the cost rows")
    parser.add_argument("--skip_cost", action="store_true", help="only the tests")
    args = parser.parse_args()
    start = time.perf_counter()
    deadline = start + args.budget_s
    output_dir = Path(args.output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    report = {"machine": machine(), "tests": [], "vllm": None, "cost": {"rows": [], "skipped_for_time": [],
              "failures": []}}  # fmt: skip
    if not report["machine"]["cuda_available"]:
        command = [sys.executable, "-m", "pytest", "-q", "--collect-only", "-m", "gpu", "tests/test_gpu.py"]
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        count = sum(1 for line in proc.stdout.splitlines() if "::" in line)
        report["collected"] = {"count": count, "returncode": proc.returncode}
        print(
            f"gpu-check: no CUDA device here; {count} GPU tests collected (pytest rc {proc.returncode}), skipped."
        )
        if proc.returncode != 0 or count == 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:])
            sys.exit(1)
    else:
        if not args.skip_tests:
            report["tests"].append(
                run_pytest("gpu", output_dir / "junit_gpu.xml", max(60, deadline - time.perf_counter()))
            )
            print(f"gpu tests: rc {report['tests'][-1]['returncode']}", flush=True)
            if report["machine"]["versions"]["vllm"]:
                report["tests"].append(
                    run_pytest("vllm", output_dir / "junit_vllm.xml", max(60, deadline - time.perf_counter()))
                )
            else:
                report["vllm"] = (
                    "vLLM is not importable here: its tests and the vLLM cost rows were not tried."
                )
        if not args.skip_cost:
            report["cost"] = run_cost(
                output_dir, deadline + 60
            )  # a row started in time may run past the budget
    report["wall_s"] = time.perf_counter() - start
    (output_dir / "report.json").write_text(json.dumps(report, indent=1))
    (output_dir / "report.md").write_text(markdown(report))
    print((output_dir / "report.md").read_text())


if __name__ == "__main__":
    main()
