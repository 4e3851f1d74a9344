"""Generation for every evaluation: a model (plus merged adapter) on Hugging Face `generate` or on vLLM.

A generator is a callable `generate(texts, n, sampling) -> list[list[str]]`: `n` completions per prompt text,
with `sampling` = {temperature, top_p, max_new_tokens, add_special_tokens}. vLLM is used when it is installed
and a GPU is present (or when asked), else batched `generate` on any device.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

Generate = Callable[[list[str], int, dict], list[list[str]]]
END_OF_TURN = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>")


def stop_token_ids(tokenizer, model_config=None) -> list[int]:
    """EOS ids plus the end-of-turn tokens a chat-formatted base model emits (Qwen's <|im_end|>, Llama's)."""
    ids = set()
    for value in (getattr(model_config, "eos_token_id", None), tokenizer.eos_token_id):
        ids.update(value if isinstance(value, list) else [value] if value is not None else [])
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN if t in vocab)
    return sorted(ids)


def load_model(model: str, adapter: str | None = None, dtype: str = "auto", device: str | None = None):
    """(model, tokenizer) with the PEFT adapter merged in; the tokenizer pads on the left for generation."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    has_own_tokenizer = adapter and (Path(adapter) / "tokenizer_config.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(adapter if has_own_tokenizer else model, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype))
    if adapter:
        from peft import PeftModel

        lm = PeftModel.from_pretrained(lm, adapter).merge_and_unload()
    return lm.to(device).eval(), tokenizer


def generate_hf(
    lm, tokenizer, texts: list[str], n: int, sampling: dict, batch_size: int = 16
) -> list[list[str]]:
    """`n` completions per prompt with batched `generate`, longest prompts first (an OOM shows at once)."""
    import torch
    from tqdm.auto import tqdm

    stop_ids = stop_token_ids(tokenizer, lm.generation_config)
    special = sampling.get("add_special_tokens", False)
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    outputs: list[list[str]] = [[] for _ in texts]
    do_sample = sampling["temperature"] > 0
    kwargs = {"do_sample": do_sample, "max_new_tokens": sampling["max_new_tokens"], "num_return_sequences": n}
    if do_sample:
        kwargs.update(temperature=sampling["temperature"], top_p=sampling["top_p"])
    else:  # silence the checkpoint's sampling defaults, which greedy decoding ignores
        kwargs.update(temperature=None, top_p=None, top_k=None)
    for start in tqdm(range(0, len(order), batch_size), desc="generate", unit="batch", disable=None):
        batch = order[start : start + batch_size]
        enc = tokenizer(
            [texts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=special
        )
        enc = enc.to(lm.device)
        with torch.inference_mode():
            out = lm.generate(**enc, **kwargs, eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id)
        new = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        for j, i in enumerate(batch):
            outputs[i] = new[j * n : (j + 1) * n]
    return outputs


class VLLMGenerator:
    """vLLM generation (imported lazily; not a dependency). An adapter is merged and saved first.

    `args` needs `seed`, `tensor_parallel_size` and `gpu_memory_utilization` (the CLI's flags).
    """

    def __init__(self, model: str, adapter: str | None, args: argparse.Namespace):
        from vllm import LLM

        self._tmp = None
        tokenizer_path = model
        if adapter:
            lm, tokenizer = load_model(model, adapter, dtype="bfloat16", device="cpu")
            self._tmp = tempfile.TemporaryDirectory(prefix="bridge_merged_")
            lm.save_pretrained(self._tmp.name)
            tokenizer.save_pretrained(self._tmp.name)
            model = tokenizer_path = self._tmp.name
        self.seed = args.seed
        self.llm = LLM(model=model, tokenizer=tokenizer_path, seed=args.seed,
                       tensor_parallel_size=args.tensor_parallel_size, gpu_memory_utilization=args.gpu_memory_utilization)  # fmt: skip
        self.tokenizer = self.llm.get_tokenizer()

    def __call__(self, texts: list[str], n: int, sampling: dict, seed: int | None = None) -> list[list[str]]:
        from vllm import SamplingParams

        seed = self.seed if seed is None else seed
        params = SamplingParams(n=n, temperature=sampling["temperature"], top_p=sampling["top_p"], seed=seed,
                                max_tokens=sampling["max_new_tokens"], stop_token_ids=stop_token_ids(self.tokenizer))  # fmt: skip
        special = sampling.get("add_special_tokens", False)  # tokenised here, exactly as the HF backend does
        prompts = [
            {"prompt_token_ids": self.tokenizer(t, add_special_tokens=special)["input_ids"]} for t in texts
        ]
        outs = self.llm.generate(prompts, params, use_tqdm=True)
        return [[o.text for o in out.outputs] for out in outs]


def pick_backend(backend: str) -> str:
    """'vllm' when asked or (for 'auto') when vLLM is installed and a GPU is present, else 'hf'."""
    if backend != "auto":
        return backend
    import torch

    return "vllm" if importlib.util.find_spec("vllm") is not None and torch.cuda.is_available() else "hf"


def make_generator(args: argparse.Namespace) -> tuple[Generate, object, str]:
    """(generate, tokenizer, backend name) for the flags `add_generation_args` defines."""
    backend = pick_backend(args.backend)
    logger.info("Backend: %s", backend)
    if backend == "vllm":
        generator = VLLMGenerator(args.model, args.adapter, args)
        return generator, generator.tokenizer, backend
    lm, tokenizer = load_model(args.model, args.adapter, args.dtype, args.device)

    def generate(texts: list[str], n: int, sampling: dict) -> list[list[str]]:
        return generate_hf(lm, tokenizer, texts, n, sampling, args.batch_size)

    return generate, tokenizer, backend


def add_generation_args(p: argparse.ArgumentParser, max_new_tokens: int = 5120) -> argparse.ArgumentParser:
    """The model, backend and decoding flags every evaluation CLI shares."""
    p.add_argument("--model", help="hub id or local path of the model (with --adapter: the base model)")
    p.add_argument("--adapter", help="PEFT adapter to load on top of --model and merge before generation")
    p.add_argument("--name", help="row label in the table (default: the model's/adapter's folder name)")
    p.add_argument(
        "--max_new_tokens", type=int, default=max_new_tokens, help="paper: 5120 for 3B models, 8192 for 8B"
    )
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=("auto", "hf", "vllm"), default="auto")
    p.add_argument("--batch_size", type=int, default=16, help="prompts per HF generate call")
    p.add_argument(
        "--dtype", default="auto", help="HF backend: auto (bf16 on GPU, fp32 on CPU), bfloat16, ..."
    )
    p.add_argument("--device", help="HF backend device (default: cuda if available, else cpu)")
    p.add_argument("--tensor_parallel_size", type=int, default=1, help="vLLM backend")
    p.add_argument("--gpu_memory_utilization", type=float, default=0.9, help="vLLM backend")
    return p


def default_name(args: argparse.Namespace) -> str:
    """The table row label: the model folder's name, `+adapter` folder's name when one is merged."""
    base = Path(args.model.rstrip("/")).name
    return f"{base}+{Path(args.adapter.rstrip('/')).name}" if args.adapter else base
