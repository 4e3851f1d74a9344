"""What a BRIDGE step costs against a GRPO (`rl`) step on the same model and batch, broken down by phase.

    python benchmarks/step_cost.py                        # CPU sweep over model size and completion length
    python benchmarks/step_cost.py --hidden 512 --lengths 256 --steps 10   # on a GPU
    python benchmarks/step_cost.py --model PATH --lengths 128 --batch 8 --generations 4 --sft_batch 2 --steps 2
                                                          # a real checkpoint, e.g. SmolLM2-135M-Instruct
    python benchmarks/step_cost.py --model PATH ... --vllm   # the same, generation by a colocated vLLM engine,
                                                          # beside HF generation in the same run

With `--vllm`, each method is measured twice in one run, with HF generation and with vLLM (colocate, TRL's
default engine dtype), and the sync of π(θ, w) into the engine (`bridge_trl/vllm_sync.py`, inside generation) is
timed as its own phase `vllm_sync`; `generation` then excludes it. On vLLM's CPU build the test-side sync workaround
(`tests/vllm_cpu.py`) is installed first; a GPU run does not use it.

Each (method, model size, completion length) runs in its own process so that peak memory is its own (CUDA:
`max_memory_allocated`; CPU: peak resident set). Times are per optimizer step, averaged after a warm-up step.

BRIDGE's extra compute over GRPO is the SFT forward/backward, the shadow's forward/backward and θ̂'s optimizer
step. The LoRA adapter w also makes generation, the joint pass and the optimizer step dearer (reported apart).
Bookkeeping is the rest: swapping θ̂ in and out, metric syncs, Python; the target is bookkeeping ≤ 10% of the
extra compute.
"""

import argparse
import json
import multiprocessing as mp
import os
import resource
import time
from collections import defaultdict
from queue import Empty

import torch
from datasets import Dataset
from peft import LoraConfig

PHASES = (
    "generation",
    "sft_fwd_bwd",
    "rl_fwd_bwd",
    "shadow_fwd_bwd",
    "shadow_swap",
    "optimizer",
    "shadow_optimizer",
)
VLLM_PHASES = (*PHASES, "vllm_sync")


def setup_vllm() -> None:
    """Engine settings for a small CPU and, on vLLM's CPU build, the test-side sync workaround (DESIGN.md §7)."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from tests.vllm_cpu import setup_process

    setup_process(float32=False)  # TRL's own engine dtype (bf16 for a float32 checkpoint)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(times, key, fn):
    def wrapper(*args, **kwargs):
        sync()
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            sync()
            times[key] += time.perf_counter() - start

    return wrapper


def build_model_and_data(hidden: int, length: int, model_path: str | None):
    """A tiny Qwen2 on sums (the sweep), or a real checkpoint on chat-formatted questions of the same shape."""
    if model_path is None:
        from bridge_trl.tiny import build_tiny_model, build_tokenizer

        tokenizer = build_tokenizer()
        model = build_tiny_model(tokenizer, hidden_size=hidden, num_hidden_layers=4, intermediate_size=3 * hidden,
                                 num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
        rl = Dataset.from_dict({"prompt": [f"{i}+{i + 1}+{i + 2}=" for i in range(256)]})
        sft = Dataset.from_dict(
            {"prompt": [f"{i}+{i}=" for i in range(64)], "completion": ["1+1=2." * (length // 6)] * 64}
        )
        return model, tokenizer, rl, sft
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype="auto")

    def ask(i):
        return [{"role": "user", "content": f"What is {i} + {i + 1} + {i + 2}? Reason step by step."}]

    rl = Dataset.from_dict({"prompt": [ask(i) for i in range(256)]})
    # SFT completions of about `length` tokens (a BPE token is a few characters of this text).
    trace = " ".join(f"{i} + {i} = {2 * i}." for i in range(length))
    trace = tokenizer.decode(tokenizer(trace, add_special_tokens=False)["input_ids"][: length - 1])
    sft = Dataset.from_dict(
        {
            "prompt": [ask(i) for i in range(64)],
            "completion": [[{"role": "assistant", "content": trace}]] * 64,
        }
    )
    return model, tokenizer, rl, sft


def length_reward(completions, **kwargs):
    """A reward that varies across completions (so advantages are not all zero), strings or chat messages."""
    return [float(len(c if isinstance(c, str) else c[0]["content"]) % 3) for c in completions]


def run_one(method: str, hidden: int, length: int, steps: int, queue, model_path=None, batch=32, generations=8,
            sft_batch=4, vllm=False) -> None:  # fmt: skip
    """Train `steps + 1` steps, time each phase from step 2 on, and report through `queue`."""
    if vllm:
        setup_vllm()
    from bridge_trl import BridgeConfig, BridgeTrainer

    torch.manual_seed(0)
    model, tokenizer, rl, sft = build_model_and_data(hidden, length, model_path)
    args = BridgeConfig(
        output_dir=f"/tmp/step_cost_{method}", method=method, per_device_train_batch_size=batch,
        num_generations=generations, per_device_sft_batch_size=sft_batch, max_completion_length=length,
        max_steps=steps + 1, learning_rate=1e-4,
        report_to="none", save_strategy="no", logging_steps=1000, disable_tqdm=True, bf16=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(), gradient_checkpointing=False,
        # Completions of exactly `length` tokens: HF's and vLLM's names for the same bound.
        generation_kwargs={"min_tokens": length} if vllm else {"min_new_tokens": length},
        **(dict(use_vllm=True, vllm_mode="colocate", vllm_max_model_length=1024, vllm_gpu_memory_utilization=0.3)
           if vllm else {}),
    )  # fmt: skip
    peft = LoraConfig(r=16, lora_alpha=16, target_modules="all-linear") if method == "bridge" else None
    trainer = BridgeTrainer(model, length_reward, args=args,
                            train_dataset=rl, sft_dataset=sft, processing_class=tokenizer, peft_config=peft)  # fmt: skip

    times, step_times, _measuring = defaultdict(float), [], {"on": False}
    inner = defaultdict(float)  # phases are timed into `inner` and copied into `times` once warm-up is over
    trainer._generate_and_score_completions = timed(
        inner, "generation", trainer._generate_and_score_completions
    )
    backward = trainer._weighted_backward

    def classified_backward(compute, weight, kind=""):
        key = {"sft": "sft_fwd_bwd", "rl": "rl_fwd_bwd", "shadow": "shadow_fwd_bwd"}[kind]
        return timed(inner, key, backward)(compute, weight, kind)

    trainer._weighted_backward = classified_backward
    if trainer.shadow is not None:
        trainer.shadow._exchange = timed(inner, "shadow_swap", trainer.shadow._exchange)
        trainer._extra_step = timed(inner, "shadow_optimizer", trainer._extra_step)
    create = trainer.create_optimizer

    def create_optimizer(*a, **k):
        optimizer = create(*a, **k)
        optimizer.step = timed(inner, "optimizer", optimizer.step)
        return optimizer

    trainer.create_optimizer = create_optimizer
    phases = VLLM_PHASES if vllm else PHASES
    if vllm:  # the sync runs inside generation: timed on its own, then taken out of `generation`
        vg = trainer.vllm_generation
        vg.sync_weights = timed(inner, "vllm_sync", vg.sync_weights)

    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            inner.clear()
            sync()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, *a, **k):
            sync()
            if state.global_step > 1:  # skip the warm-up step
                step_times.append(time.perf_counter() - self.start)
                for key in phases:
                    times[key] += inner[key]

    trainer.add_callback(StepTimer())
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    n = len(step_times)
    per_step = {key: times[key] / n for key in phases}
    # The optimizer timer includes θ̂'s step, which runs in its post-step hook.
    per_step["optimizer"] -= per_step["shadow_optimizer"]
    if vllm:
        per_step["generation"] -= per_step["vllm_sync"]
    peak = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20  # fmt: skip
    params = sum(p.numel() for p in model.parameters())
    queue.put({"method": method, "vllm": vllm, "hidden": hidden, "length": length, "params": params,
               "sft_tokens_per_step": trainer.consumed["sft_tokens"] / (steps + 1),
               "step_s": sum(step_times) / n, "phases_s": per_step, "peak_mb": peak})  # fmt: skip


def measure(method, hidden, length, steps, **kwargs):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=run_one, args=(method, hidden, length, steps, queue), kwargs=kwargs)
    proc.start()
    while True:  # a child that dies (e.g. an engine that fails to start) must not leave this waiting
        try:
            result = queue.get(timeout=10)
            break
        except Empty:
            if not proc.is_alive():
                raise RuntimeError(
                    f"{method} run exited with code {proc.exitcode} before reporting"
                ) from None
    proc.join()
    return result


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 192])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 64])
    parser.add_argument(
        "--steps", type=int, default=4, help="timed steps per configuration (after one warm-up)"
    )
    parser.add_argument("--model", help="a checkpoint to load with from_pretrained instead of the tiny sweep")
    parser.add_argument("--batch", type=int, default=32, help="completions per step")
    parser.add_argument("--generations", type=int, default=8, help="completions per prompt")
    parser.add_argument("--sft_batch", type=int, default=4, help="SFT examples per step")
    parser.add_argument(
        "--vllm",
        action="store_true",
        help="also measure every configuration with a colocated vLLM engine generating (same run)",
    )
    parser.add_argument("--output", default="benchmarks/step_cost.json")
    args = parser.parse_args()
    # vLLM loads the model by its path, and its CPU attention kernels want head size 64: a saved checkpoint.
    if args.vllm and args.model is None:
        parser.error("--vllm needs --model: a saved checkpoint (e.g. SmolLM2-135M-Instruct)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    shape = {
        "model_path": args.model,
        "batch": args.batch,
        "generations": args.generations,
        "sft_batch": args.sft_batch,
    }

    rows = []
    backends = (False, True) if args.vllm else (False,)
    configs = [
        (h, n, v)
        for h in (args.hidden if args.model is None else [0])
        for n in args.lengths
        for v in backends
    ]
    for hidden, length, vllm in configs:  # one row per (model size, completion length, generation backend)
        rl, bridge = (measure(m, hidden, length, args.steps, vllm=vllm, **shape) for m in ("rl", "bridge"))
        extra_compute = sum(
            bridge["phases_s"][k] for k in ("sft_fwd_bwd", "shadow_fwd_bwd", "shadow_optimizer")
        )
        # The adapter w makes generation, the joint pass and the optimizer step dearer; BRIDGE needs w.
        adapter = sum(
            bridge["phases_s"][k] - rl["phases_s"][k] for k in ("generation", "rl_fwd_bwd", "optimizer")
        )
        # Bookkeeping: the swaps plus whatever no phase accounts for, beyond what GRPO's step leaves unaccounted.
        untimed = {m: x["step_s"] - sum(x["phases_s"].values()) for m, x in (("rl", rl), ("bridge", bridge))}
        bookkeeping = bridge["phases_s"]["shadow_swap"] + untimed["bridge"] - untimed["rl"]
        rows.append({"hidden": hidden, "length": length, "params": rl["params"], "rl": rl, "bridge": bridge, "vllm": vllm,
                     "time_ratio": bridge["step_s"] / rl["step_s"], "memory_ratio": bridge["peak_mb"] / rl["peak_mb"],
                     "extra_compute_s": extra_compute, "adapter_s": adapter, "bookkeeping_s": bookkeeping,
                     "bookkeeping_over_extra_compute": bookkeeping / extra_compute})  # fmt: skip

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    what = args.model or "tiny Qwen2 models"
    print(
        f"step_cost of {what} on {device}; seconds per optimizer step, {args.steps} timed steps after one warm-up"
    )
    print(
        f"{args.batch} completions per step in groups of {args.generations}, {args.sft_batch} SFT examples\n"
    )
    phases = VLLM_PHASES if args.vllm else PHASES
    gen = "generated by | " if args.vllm else ""
    header = f"| params | length | {gen}method | step s | " + " | ".join(phases) + " | peak MB |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in rows:
        for m in ("rl", "bridge"):
            x = r[m]
            cells = " | ".join(f"{x['phases_s'].get(k, 0.0):.3f}" for k in phases)
            by = f"{'vLLM' if r['vllm'] else 'HF'} | " if args.vllm else ""
            print(
                f"| {r['params'] / 1e6:.2f}M | {r['length']} | {by}{m} | {x['step_s']:.3f} | {cells} | {x['peak_mb']:.0f} |"
            )
    print(
        f"\n| params | length | {gen}time bridge/rl | peak memory bridge/rl | extra compute s | adapter s | bookkeeping s "
        "| bookkeeping / extra compute |"
    )
    print("|---|---|" + "---|" * (6 + bool(args.vllm)))
    for r in rows:
        by = f"{'vLLM' if r['vllm'] else 'HF'} | " if args.vllm else ""
        print(f"| {r['params'] / 1e6:.2f}M | {r['length']} | {by}{r['time_ratio']:.2f} | {r['memory_ratio']:.2f} | "
              f"{r['extra_compute_s']:.3f} | {r['adapter_s']:.3f} | {r['bookkeeping_s']:.3f} | {r['bookkeeping_over_extra_compute']:.1%} |")  # fmt: skip
    with open(args.output, "w") as f:
        json.dump({"device": device, "model": args.model, "shape": shape, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
