"""What a BRIDGE step costs against a GRPO (`rl`) step on the same model and batch, broken down by phase.

    python benchmarks/step_cost.py                        # CPU sweep over model size and completion length
    python benchmarks/step_cost.py --arch qwen2.5-0.5b --lengths 1024 3072 --batch 80 --micro_batch 5 \\
        --generations 5 --sft_batch 16 --replay --variants rl bridge bridge:shadow_offload=cpu
                                                          # a GPU: the paper's Table 5 shape (`make gpu-check`)
    python benchmarks/step_cost.py --model PATH --lengths 128 --batch 8 --generations 4 --sft_batch 2 --steps 2
                                                          # a real checkpoint, e.g. SmolLM2-135M-Instruct
    python benchmarks/step_cost.py --model PATH ... --vllm   # the same, generation by a colocated vLLM engine,
                                                          # beside HF generation in the same run

`--arch` builds a model from the architecture's config with random weights (no download): the cost of a step
depends on the shapes, not on the values. Completions are forced to exactly `--lengths` tokens (`min_new_tokens`).

`--replay`: the first step generates for real (its decoding time is the `decode` phase) and later steps replay
those completions, so the training phases of a 3,072-token step can be timed in minutes; `decode` is the same work
at every step (fixed length), so each step's time is the replayed step plus the first step's decoding. Variants
that generate from the same policy shape (BRIDGE with another `shadow_offload` or `shadow_optimizer`) reuse the
first BRIDGE variant's completions and decoding time (`decode_reused` in the JSON). `--decode_tokens N` decodes
only N tokens, times them and charges length/N times that (a decoding step of a small model at a few thousand
tokens of context is bound by kernel launches, not by attention over the cache, so its cost per token is flat), and
trains on the N tokens tiled to the full length: the training phases see full-length completions.

With `--vllm`, each method is measured twice in one run, with HF generation and with vLLM (colocate, TRL's
default engine dtype), and the sync of π(θ, w) into the engine (`bridge_trl/vllm_sync.py`, inside generation) is
timed as its own phase `vllm_sync`; `generation` then excludes it. On vLLM's CPU build the test-side sync workaround
(`tests/vllm_cpu.py`) is installed first; a GPU run does not use it.

On the CPU each configuration runs in its own process so that peak memory is its own (peak resident set); on a GPU
they run one after another in this process and peak memory is `max_memory_allocated` above what was allocated
before the run's model was built. Times are per optimizer step, averaged after a warm-up step.

BRIDGE's extra compute over GRPO is the SFT forward/backward, the shadow's forward/backward and θ̂'s optimizer
step: the "unavoidable extra". `limit` = GRPO's step + that extra; `over_limit` = BRIDGE's step / limit − 1. The
LoRA adapter w also makes generation, the joint pass and the optimizer step dearer (reported apart as `adapter`).
Bookkeeping is the rest: swapping θ̂ in and out, metric syncs, Python; the target is bookkeeping ≤ 10% of the
extra compute.
"""

import argparse
import gc
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

PHASES = ("decode", "generation", "sft_fwd_bwd", "rl_fwd_bwd", "shadow_fwd_bwd", "shadow_swap", "optimizer",
          "shadow_optimizer")  # fmt: skip
VLLM_PHASES = (*PHASES, "vllm_sync")
# Qwen2.5 architectures (their config.json), built with random weights.
ARCHS = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2),
    "qwen2.5-3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                       num_key_value_heads=2),
}  # fmt: skip
QWEN_VOCAB = 151936
# Completions decoded once per (architecture, length, policy shape), replayed by later variants (`--replay`).
GENERATION_CACHE: dict = {}
# (architecture, batch) whose decoding path has been warmed up over `--decode_tokens` tokens in this process. The
# H200 run of 4 Dec 2026 timed the first policy decoded in the process at 38.8 s per 512 tokens and the second at
# 12.0 s after the same 8-token warm-up: kernels and allocator blocks for the longer KV caches are first met by the
# timed decode. The first decode of a shape now warms up over the full timed length, untimed.
DECODE_WARMED: set = set()


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


def build_model_and_data(hidden: int, length: int, model_path: str | None, arch: str | None = None):
    """A tiny Qwen2 on sums (the sweep), an architecture with random weights, or a real checkpoint."""
    if model_path is None:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        from bridge_trl.tiny import build_tiny_model, build_tokenizer

        tokenizer = build_tokenizer()
        if arch is None:
            model = build_tiny_model(tokenizer, hidden_size=hidden, num_hidden_layers=4, intermediate_size=3 * hidden,
                                     num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
        else:  # the byte-level tokenizer decodes the sampled ids it knows; the vocabulary is the real one
            config = Qwen2Config(vocab_size=QWEN_VOCAB, tie_word_embeddings=True, max_position_embeddings=32768,
                                 rope_theta=1e6, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id, **ARCHS[arch])  # fmt: skip
            with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
                model = Qwen2ForCausalLM(config)
            model.generation_config.pad_token_id = tokenizer.pad_token_id
            model.generation_config.eos_token_id = tokenizer.eos_token_id
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


def short_decode(trainer, decode, args, kwargs, tokens: int = 8):
    """Decode exactly `tokens` tokens with HF generation (the warm-up of the generation path, or `--decode_tokens`)."""
    config, gen_kwargs = trainer.generation_config, trainer.generation_kwargs
    saved = config.max_new_tokens, config.min_new_tokens, dict(gen_kwargs)
    for key in ("max_new_tokens", "min_new_tokens"):
        setattr(config, key, tokens)
        gen_kwargs[key] = tokens
    try:
        return decode(*args, **kwargs)
    finally:
        config.max_new_tokens, config.min_new_tokens, trainer.generation_kwargs = saved


def parse_variant(variant: str) -> tuple[str, dict]:
    """'bridge:shadow_offload=cpu,merge_adapter_for_generation=false' → ('bridge', {...})."""
    method, _, rest = variant.partition(":")
    fields = {}
    for item in filter(None, rest.split(",")):
        key, value = item.split("=")
        fields[key] = {"true": True, "false": False}.get(value.lower(), value)
    return method, fields


def run_one(variant: str, hidden: int, length: int, steps: int, queue=None, model_path=None, batch=32,
            generations=8, sft_batch=4, vllm=False, arch=None, micro_batch=None, replay=False,
            gradient_checkpointing=False, decode_tokens=None, time_first_step=False) -> dict:  # fmt: skip
    """Train `steps + 1` steps, time each phase from step 2 on; the result goes to `queue` or is returned."""
    if vllm:
        setup_vllm()
    from bridge_trl import BridgeConfig, BridgeTrainer

    method, fields = parse_variant(variant)
    cuda = torch.cuda.is_available()
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    model, tokenizer, rl, sft = build_model_and_data(hidden, length, model_path, arch)
    micro_batch = micro_batch or batch
    accumulation = batch // micro_batch
    args = BridgeConfig(
        output_dir=f"/tmp/step_cost_{method}", method=method, per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=accumulation, num_generations=generations,
        per_device_sft_batch_size=max(1, sft_batch // accumulation), max_completion_length=length,
        max_steps=steps + (0 if time_first_step else 1), learning_rate=1e-4, gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if gradient_checkpointing else None,
        report_to="none", save_strategy="no", logging_steps=1000, disable_tqdm=True, bf16=cuda, use_cpu=not cuda,
        # Completions of exactly `length` tokens: HF's and vLLM's names for the same bound.
        generation_kwargs={"min_tokens": length} if vllm else {"min_new_tokens": length},
        **(dict(use_vllm=True, vllm_mode="colocate", vllm_max_model_length=1024, vllm_gpu_memory_utilization=0.3)
           if vllm else {}),
        **fields,
    )  # fmt: skip
    peft = LoraConfig(r=16, lora_alpha=16, target_modules="all-linear") if method == "bridge" else None
    trainer = BridgeTrainer(model, length_reward, args=args,
                            train_dataset=rl, sft_dataset=sft, processing_class=tokenizer, peft_config=peft)  # fmt: skip

    times, step_times = defaultdict(float), []
    inner = defaultdict(float)  # phases are timed into `inner` and copied into `times` once warm-up is over
    # The policy's shape decides what decoding costs: no adapter, merged adapter, unmerged adapter.
    merged = args.merge_adapter_for_generation
    cache_key = (arch or model_path or hidden, length, batch, peft is not None and (merged or "unmerged"))
    decode = trainer._generate_single_turn
    cached = GENERATION_CACHE.get(cache_key) if replay else None
    decode_reused = cached is not None

    def decode_or_replay(*a, **k):
        nonlocal cached
        if cached is None:
            real_start = time.perf_counter()
            if (
                replay and not vllm
            ):  # first-call costs (kernels, handles, KV-cache shapes) out of the one decoding that is timed
                shape = (arch or model_path or hidden, batch)
                short_decode(trainer, decode, a, k, 8 if shape in DECODE_WARMED else decode_tokens or 8)
                DECODE_WARMED.add(shape)
            inner_start = time.perf_counter()
            sync()
            # --decode_tokens: N tokens decoded and timed, tiled to `length` for training, time scaled by length/N
            if decode_tokens:
                completion_ids, logprobs = short_decode(trainer, decode, a, k, decode_tokens)
                out = ([(c * -(-length // len(c)))[:length] for c in completion_ids], logprobs)
            else:
                out = decode(*a, **k)
            sync()
            cached = (
                out,
                (time.perf_counter() - inner_start) * (length / decode_tokens if decode_tokens else 1),
            )
            if replay:
                GENERATION_CACHE[cache_key] = cached
            inner["decode"] += cached[1]
            inner["decode_spent"] += time.perf_counter() - real_start  # warm-up decode included
            if not replay:
                cached = None
            return out
        inner["decode"] += cached[1]  # the same decoding work, replayed
        return cached[0]

    trainer._generate_single_turn = decode_or_replay
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
    # The upper-level diagnostics (issue 27) run inside other phases (the optimizer's hooks, the SFT pass): timed
    # on their own as well, and reported beside the phases, not as one.
    for hook in ("before_sft", "after_sft", "pre_step", "post_step"):
        setattr(trainer.diagnostics, hook, timed(inner, "diagnostics", getattr(trainer.diagnostics, hook)))
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
            if state.global_step > (0 if time_first_step else 1):  # skip the warm-up step
                elapsed = time.perf_counter() - self.start
                # A step is charged the decoding it did or replayed (`decode`), not the time it spent decoding
                # (`decode_spent`: the real decoding, the short warm-up one included; nothing when replayed).
                step_times.append(elapsed - inner["decode_spent"] + inner["decode"])
                for key in (*phases, "decode_spent", "diagnostics"):
                    times[key] += inner[key]

    trainer.add_callback(StepTimer())
    trainer.train()
    n = len(step_times)
    per_step = {key: times[key] / n for key in phases}
    # The optimizer timer includes θ̂'s step, which runs in its post-step hook; `generation` includes decoding
    # (when not replayed) and the vLLM sync.
    per_step["optimizer"] -= per_step["shadow_optimizer"]
    per_step["generation"] -= times["decode_spent"] / n  # the decoding it did (charged as `decode`)
    if vllm:
        per_step["generation"] -= per_step["vllm_sync"]
    if cuda:
        peak = (torch.cuda.max_memory_allocated() - baseline) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    params = sum(p.numel() for p in model.parameters())
    result = {"method": method, "variant": variant, "vllm": vllm, "hidden": hidden, "arch": arch, "length": length,
              "params": params, "sft_tokens_per_step": trainer.consumed["sft_tokens"] / (steps + 1),
              "step_s": sum(step_times) / n, "phases_s": per_step, "peak_mb": peak, "decode_reused": decode_reused,
              "diagnostics_s": times["diagnostics"] / n}  # fmt: skip
    if queue is not None:
        queue.put(result)
    return result


def measure(variant, hidden, length, steps, **kwargs):
    if torch.cuda.is_available() and not kwargs.get("vllm"):  # peak memory is per run on a GPU: one process
        return run_one(variant, hidden, length, steps, **kwargs)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=run_one, args=(variant, hidden, length, steps, queue), kwargs=kwargs)
    proc.start()
    while True:  # a child that dies (e.g. an engine that fails to start) must not leave this waiting
        try:
            result = queue.get(timeout=10)
            break
        except Empty:
            if not proc.is_alive():
                raise RuntimeError(
                    f"{variant} run exited with code {proc.exitcode} before reporting"
                ) from None
    proc.join()
    return result


def compare(rl: dict, bridge: dict) -> dict:
    """BRIDGE against GRPO: ratios, the unavoidable extra and what is beyond it."""
    extra = sum(bridge["phases_s"][k] for k in ("sft_fwd_bwd", "shadow_fwd_bwd", "shadow_optimizer"))
    # The adapter w makes decoding, scoring, the joint pass and the optimizer step dearer; BRIDGE needs w.
    adapter = sum(
        bridge["phases_s"][k] - rl["phases_s"][k] for k in ("decode", "generation", "rl_fwd_bwd", "optimizer")
    )
    # Bookkeeping: the swaps plus whatever no phase accounts for, beyond what GRPO's step leaves unaccounted.
    untimed = {m: x["step_s"] - sum(x["phases_s"].values()) for m, x in (("rl", rl), ("bridge", bridge))}
    bookkeeping = bridge["phases_s"]["shadow_swap"] + untimed["bridge"] - untimed["rl"]
    limit = rl["step_s"] + extra
    return {"variant": bridge["variant"], "time_ratio": bridge["step_s"] / rl["step_s"],
            "memory_ratio": bridge["peak_mb"] / rl["peak_mb"], "extra_compute_s": extra, "adapter_s": adapter,
            "bookkeeping_s": bookkeeping, "bookkeeping_over_extra_compute": bookkeeping / extra,
            "diagnostics_s": bridge["diagnostics_s"], "diagnostics_over_extra_compute": bridge["diagnostics_s"] / extra,
            "limit_s": limit, "limit_ratio": limit / rl["step_s"], "over_limit": bridge["step_s"] / limit - 1}  # fmt: skip


def print_tables(rows, phases, vllm_column: bool) -> None:
    gen = "generated by | " if vllm_column else ""
    header = f"| params | length | {gen}variant | step s | " + " | ".join(phases) + " | peak MB |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in rows:
        by = f"{'vLLM' if r['vllm'] else 'HF'} | " if vllm_column else ""
        for x in (r["rl"], *r["bridges"]):
            cells = " | ".join(f"{x['phases_s'].get(k, 0.0):.3f}" for k in phases)
            print(f"| {r['params'] / 1e6:.2f}M | {r['length']} | {by}{x['variant']} | {x['step_s']:.3f} | {cells} | "
                  f"{x['peak_mb']:.0f} |")  # fmt: skip
    print(f"\n| params | length | {gen}variant | time bridge/rl | peak memory bridge/rl | limit/rl | over limit | "
          "extra compute s | adapter s | bookkeeping / extra compute | diagnostics / extra compute |")  # fmt: skip
    print("|---|---|" + "---|" * (9 + vllm_column))
    for r in rows:
        by = f"{'vLLM' if r['vllm'] else 'HF'} | " if vllm_column else ""
        for c in r["comparisons"]:
            print(f"| {r['params'] / 1e6:.2f}M | {r['length']} | {by}{c['variant']} | {c['time_ratio']:.2f} | "
                  f"{c['memory_ratio']:.2f} | {c['limit_ratio']:.2f} | {c['over_limit']:+.1%} | {c['extra_compute_s']:.3f} | "
                  f"{c['adapter_s']:.3f} | {c['bookkeeping_over_extra_compute']:.1%} | "
                  f"{c['diagnostics_over_extra_compute']:.1%} |")  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 192])
    parser.add_argument(
        "--arch", nargs="+", choices=sorted(ARCHS), help="architectures built with random weights"
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 64])
    parser.add_argument(
        "--steps", type=int, default=4, help="timed steps per configuration (after one warm-up)"
    )
    parser.add_argument("--model", help="a checkpoint to load with from_pretrained instead of the tiny sweep")
    parser.add_argument("--batch", type=int, default=32, help="completions per step (per device)")
    parser.add_argument(
        "--micro_batch", type=int, help="completions per micro-batch (default: --batch, no accumulation)"
    )
    parser.add_argument("--generations", type=int, default=8, help="completions per prompt")
    parser.add_argument("--sft_batch", type=int, default=4, help="SFT examples per step (per device)")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["rl", "bridge"],
        help="'rl' first, then BRIDGE variants as 'bridge:field=value,...' (BridgeConfig fields)",
    )
    parser.add_argument(
        "--replay", action="store_true", help="decode once, replay the completions (see above)"
    )
    parser.add_argument(
        "--decode_tokens",
        type=int,
        help="with --replay: decode this many tokens, time them, scale to the length (see above)",
    )
    parser.add_argument(
        "--time_first_step",
        action="store_true",
        help="no warm-up step: time every step (for steps of tens of seconds on a GPU, where one-time "
        "costs are small; decoding is warmed up on 8 tokens either way)",
    )
    parser.add_argument("--gradient_checkpointing", action="store_true", help="non-reentrant checkpointing")
    parser.add_argument("--budget_s", type=float, help="start no configuration after this many seconds")
    parser.add_argument(
        "--vllm",
        action="store_true",
        help="also measure every configuration with a colocated vLLM engine generating (same run)",
    )
    parser.add_argument("--output", default="benchmarks/step_cost.json")
    args = parser.parse_args(argv)
    # vLLM loads the model by its path, and its CPU attention kernels want head size 64: a saved checkpoint.
    if args.vllm and args.model is None:
        parser.error("--vllm needs --model: a saved checkpoint (e.g. SmolLM2-135M-Instruct)")
    if args.decode_tokens and not args.replay:
        parser.error("--decode_tokens needs --replay")
    if args.variants[0] != "rl" or any(parse_variant(v)[0] != "bridge" for v in args.variants[1:]):
        parser.error("--variants: 'rl' first, then bridge variants")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    shape = {"model_path": args.model, "batch": args.batch, "micro_batch": args.micro_batch,
             "generations": args.generations, "sft_batch": args.sft_batch, "replay": args.replay,
             "gradient_checkpointing": args.gradient_checkpointing, "decode_tokens": args.decode_tokens, "time_first_step": args.time_first_step}  # fmt: skip
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    what = args.model or (", ".join(args.arch) + " (random weights)" if args.arch else "tiny Qwen2 models")

    start, rows, skipped = time.perf_counter(), [], []
    backends = (False, True) if args.vllm else (False,)
    sizes = (
        [(None, h) for h in args.hidden]
        if args.model is None and not args.arch
        else [(a, 0) for a in args.arch or [None]]
    )
    configs = [(a, h, n, v) for a, h in sizes for n in args.lengths for v in backends]
    for arch, hidden, length, vllm in configs:  # one row per (model, completion length, generation backend)
        if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
            skipped.append({"arch": arch, "hidden": hidden, "length": length, "vllm": vllm})
            continue
        runs = []
        for variant in args.variants:  # the row is written after each variant: a run stopped early keeps them
            runs.append(measure(variant, hidden, length, args.steps, vllm=vllm, arch=arch, **shape))
            rl, bridges = runs[0], runs[1:]
            row = {"arch": arch, "hidden": hidden, "length": length, "params": rl["params"], "vllm": vllm,
                   "rl": rl, "bridges": bridges, "comparisons": [compare(rl, b) for b in bridges]}  # fmt: skip
            with open(args.output, "w") as f:
                json.dump({"device": device, "model": what, "shape": shape, "steps": args.steps, "rows": [*rows, row],
                           "skipped_for_time": skipped, "wall_s": time.perf_counter() - start}, f, indent=1)  # fmt: skip
        rows.append(row)
    with open(args.output, "w") as f:
        json.dump({"device": device, "model": what, "shape": shape, "steps": args.steps, "rows": rows,
                   "skipped_for_time": skipped, "wall_s": time.perf_counter() - start}, f, indent=1)  # fmt: skip

    print(
        f"step_cost of {what} on {device}; seconds per optimizer step, {args.steps} timed steps after one warm-up"
    )
    print(
        f"{args.batch} completions per step in groups of {args.generations}, {args.sft_batch} SFT examples\n"
    )
    print_tables(rows, VLLM_PHASES if args.vllm else PHASES, bool(args.vllm))
    if skipped:
        print(f"\nskipped for the time budget: {skipped}")
    return rows


if __name__ == "__main__":
    main()
