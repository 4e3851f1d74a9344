r"""Evaluate a model on the paper's five benchmarks: `python -m bridge_trl.maths.evaluate --model PATH_OR_ID`.

MATH500, Minerva Math, OlympiadBench (English text-only maths), AIME24 and AMC23. Decoding is greedy
pass@1 by default with the paper's token limit for 3B models (5,120 new tokens; use 8192 for 8B);
`--num_samples k` (optionally per benchmark, `--samples_per_benchmark aime24=32`) reports avg@k with
sampling. Prompts use the training template (`--prompt_template`). Answers are scored by the same
math-verify reward as training (`bridge_trl.maths.rewards`), in killable worker processes.

Generation runs on vLLM when it is installed and a GPU is present, else on batched Hugging Face
`generate` on any device. `--adapter` loads a PEFT adapter over `--model` and merges it first.

Outputs in `--output_dir`: `results.json` (every problem's completions, extracted answers and verdicts,
plus `scores`), `results.md` (the paper's Table 1 layout) and `results.png` (a bar chart). Results of
several runs render into one table with `--results a.json b.json` (alone, nothing is generated).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .eval_report import average, load_results, plot_results, render_table
from .prompts import DEFAULT_TEMPLATE, PROMPT_TEMPLATES, format_prompt, get_template, render_prompt
from .rewards import MathVerifier, last_boxed

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchmarkSpec:
    """Where a benchmark lives on the hub. Field names differ between copies, so they are looked up by
    preference: questions in `problem`/`question`; golds in `answer`, `final_answer` (OlympiadBench, a
    list) or, failing both, the last `\\boxed{}` of `solution` (Minerva Math's local copy)."""

    hub_id: str
    split: str
    config: str | None = None


BENCHMARKS = {
    "math500": BenchmarkSpec("HuggingFaceH4/MATH-500", "test"),
    "minerva_math": BenchmarkSpec("math-ai/minervamath", "test"),
    "olympiadbench": BenchmarkSpec("Hothan/OlympiadBench", "train", "OE_TO_maths_en_COMP"),
    "aime24": BenchmarkSpec("HuggingFaceH4/aime_2024", "train"),
    "amc23": BenchmarkSpec("math-ai/amc23", "test"),
}
QUESTION_FIELDS = ("problem", "question")
ANSWER_FIELDS = ("answer", "final_answer")


def _filled(row: dict) -> list[str]:
    """The fields a row really has: `datasets` fills fields missing from some rows with None."""
    return sorted(k for k, v in row.items() if v not in (None, "", []))


def _gold_from_row(row: dict, name: str, index: int) -> Any:
    for field in ANSWER_FIELDS:
        if row.get(field) not in (None, "", []):
            return row[field]
    if isinstance(row.get("solution"), str):
        boxed = last_boxed(row["solution"])
        if boxed:
            return boxed.replace("$", "").strip()  # `$` inside a box is a typo (one Minerva gold has `+$ $`)
    raise ValueError(
        f"{name} row {index}: no gold answer (looked for {', '.join(ANSWER_FIELDS)}, or a \\boxed{{}} in "
        f"'solution'); non-empty fields present: {_filled(row)}."
    )


def load_benchmark(
    name: str, data_dir: str | Path | None = None, source: str | None = None, limit=None
) -> list[dict]:
    """The problems of benchmark `name` as dicts with `question` and `gold`.

    From `source` (a hub id or local path) if given, else `<data_dir>/<name>/test.jsonl`, else the hub.
    """
    from datasets import load_dataset

    from .data import load_source

    if name not in BENCHMARKS:
        raise ValueError(f"Unknown benchmark {name!r}; valid: {', '.join(BENCHMARKS)}.")
    spec = BENCHMARKS[name]
    if source is None and data_dir is not None:
        source = str(Path(data_dir) / name / "test.jsonl")
        if not Path(source).exists():
            raise FileNotFoundError(
                f"{source} not found (--data_dir expects <data_dir>/<benchmark>/test.jsonl)."
            )
    if source is None:
        rows = load_dataset(spec.hub_id, spec.config, split=spec.split)
    elif Path(source).expanduser().exists():
        rows = load_source(source)
    else:
        rows = load_dataset(source, split=spec.split)
    problems = []
    for index, row in enumerate(rows):
        if limit is not None and index >= limit:
            break
        question = next(
            (row[f] for f in QUESTION_FIELDS if isinstance(row.get(f), str) and row[f].strip()), None
        )
        if question is None:
            raise ValueError(
                f"{name} row {index}: no question text (looked for {', '.join(QUESTION_FIELDS)}); "
                f"non-empty fields present: {_filled(row)}."
            )
        problems.append({"index": index, "question": question, "gold": _gold_from_row(row, name, index)})
    logger.info("%s: %d problems from %s", name, len(problems), source or spec.hub_id)
    return problems


# --------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------
def _stop_token_ids(tokenizer, model_config=None) -> list[int]:
    """EOS ids plus the end-of-turn tokens a chat-formatted base model emits (Qwen's <|im_end|>, Llama's)."""
    ids = set()
    for value in (getattr(model_config, "eos_token_id", None), tokenizer.eos_token_id):
        ids.update(value if isinstance(value, list) else [value] if value is not None else [])
    vocab = tokenizer.get_vocab()
    ids.update(
        vocab[t] for t in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>") if t in vocab
    )
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

    stop_ids = _stop_token_ids(tokenizer, lm.generation_config)
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
    """vLLM generation (imported lazily; not a dependency). An adapter is merged and saved first."""

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
        self.llm = LLM(model=model, tokenizer=tokenizer_path, seed=args.seed,
                       tensor_parallel_size=args.tensor_parallel_size, gpu_memory_utilization=args.gpu_memory_utilization)  # fmt: skip
        self.tokenizer = self.llm.get_tokenizer()

    def __call__(self, texts: list[str], n: int, sampling: dict, seed: int) -> list[list[str]]:
        from vllm import SamplingParams

        params = SamplingParams(n=n, temperature=sampling["temperature"], top_p=sampling["top_p"], seed=seed,
                                max_tokens=sampling["max_new_tokens"], stop_token_ids=_stop_token_ids(self.tokenizer))  # fmt: skip
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


# --------------------------------------------------------------------------------------------------
# The evaluation
# --------------------------------------------------------------------------------------------------
def _samples_for(name: str, args: argparse.Namespace) -> int:
    for item in args.samples_per_benchmark or []:
        key, _, value = item.partition("=")
        if key == name:
            return int(value)
    return args.num_samples


def evaluate(args: argparse.Namespace) -> dict:
    """Generate, score and summarise; returns the results dict that `main` writes as JSON."""
    import torch

    torch.manual_seed(args.seed)
    sources = dict(item.split("=", 1) for item in args.source or [])
    benchmarks = {
        name: load_benchmark(name, args.data_dir, sources.get(name), args.limit) for name in args.benchmarks
    }
    backend = pick_backend(args.backend)
    logger.info("Backend: %s", backend)
    if backend == "vllm":
        generator = VLLMGenerator(args.model, args.adapter, args)
        tokenizer = generator.tokenizer
    else:
        lm, tokenizer = load_model(args.model, args.adapter, args.dtype, args.device)
    template = get_template(args.prompt_template)
    verifier = MathVerifier(timeout_s=args.verify_timeout_s)
    results = {"name": args.name, "model": args.model, "adapter": args.adapter, "backend": backend,
               "config": {k: v for k, v in vars(args).items() if k != "results"}, "scores": {}, "benchmarks": {}}  # fmt: skip
    try:
        for name, problems in benchmarks.items():
            n = _samples_for(name, args)
            temperature = args.temperature if args.temperature is not None else (0.6 if n > 1 else 0.0)
            sampling = {
                "temperature": temperature,
                "top_p": args.top_p,
                "max_new_tokens": args.max_new_tokens,
                # A chat template writes its own BOS; a plain-text prompt (abel) needs the tokenizer's.
                "add_special_tokens": not template.conversational,
            }
            texts = [render_prompt(format_prompt(p["question"], template), tokenizer) for p in problems]
            logger.info(
                "%s: %d problems x %d samples (temperature %.2f)", name, len(problems), n, temperature
            )
            if backend == "vllm":
                completions = generator(texts, n, sampling, args.seed)
            else:
                completions = generate_hf(lm, tokenizer, texts, n, sampling, args.batch_size)
            if not template.conversational:  # a base model may go on to invent the next "Question:"
                completions = [[re.split(r"\n\s*Question:", c)[0] for c in cs] for cs in completions]
            before = verifier.num_timeouts
            verdicts = verifier.verify(
                [p["gold"] for p in problems for _ in range(n)], [c for cs in completions for c in cs]
            )
            rows = []
            for i, (problem, cs) in enumerate(zip(problems, completions, strict=True)):
                vs = verdicts[i * n : (i + 1) * n]
                samples = [
                    {"completion": c, "extracted": v.extracted, "correct": v.correct}
                    for c, v in zip(cs, vs, strict=True)
                ]
                rows.append({**problem, "accuracy": sum(v.correct for v in vs) / n, "samples": samples})
            accuracy = 100.0 * sum(r["accuracy"] for r in rows) / max(1, len(rows))
            results["scores"][name] = accuracy
            results["benchmarks"][name] = {"accuracy": accuracy, "num_problems": len(rows), "num_samples": n,
                                           "temperature": temperature, "verify_timeouts": verifier.num_timeouts - before,
                                           "problems": rows}  # fmt: skip
            logger.info("%s: %.1f%% (avg@%d)", name, accuracy, n)
    finally:
        verifier.close()
    results["average"] = average(results["scores"])
    return results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bridge_trl.maths.evaluate", description=__doc__.split("\n")[0]
    )
    p.add_argument("--model", help="hub id or local path of the model (with --adapter: the base model)")
    p.add_argument("--adapter", help="PEFT adapter to load on top of --model and merge before generation")
    p.add_argument("--name", help="row label in the table (default: the model's/adapter's folder name)")
    p.add_argument("--benchmarks", nargs="+", default=list(BENCHMARKS), choices=list(BENCHMARKS))
    p.add_argument("--data_dir", help="local copies laid out as <data_dir>/<benchmark>/test.jsonl")
    p.add_argument(
        "--source", action="append", metavar="NAME=ID_OR_PATH", help="override one benchmark's source"
    )
    p.add_argument("--limit", type=int, help="evaluate only the first N problems of each benchmark")
    p.add_argument("--prompt_template", default=DEFAULT_TEMPLATE, choices=list(PROMPT_TEMPLATES))
    p.add_argument("--max_new_tokens", type=int, default=5120, help="paper: 5120 for 3B models, 8192 for 8B")
    p.add_argument("--num_samples", type=int, default=1, help="samples per problem; >1 reports avg@k")
    p.add_argument("--samples_per_benchmark", nargs="*", metavar="NAME=K", help="e.g. aime24=32 amc23=8")
    p.add_argument("--temperature", type=float, help="default: 0 (greedy) for 1 sample, 0.6 for several")
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
    p.add_argument("--verify_timeout_s", type=float, default=10.0, help="hard time limit per answer check")
    p.add_argument("--output_dir", help="default: eval_results/<name>")
    p.add_argument("--results", nargs="+", help="results.json files to add to the table (alone: render only)")
    return p


def _default_name(args: argparse.Namespace) -> str:
    base = Path(args.model.rstrip("/")).name
    return f"{base}+{Path(args.adapter.rstrip('/')).name}" if args.adapter else base


def main(argv: list[str] | None = None) -> dict | None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.model and not args.results:
        parser.error("give --model (to evaluate) and/or --results (to render a table)")
    for item in (args.samples_per_benchmark or []) + (args.source or []):
        key, sep, value = item.partition("=")
        if key not in BENCHMARKS or not sep or not value:
            parser.error(f"{item!r}: expected NAME=VALUE with NAME one of {', '.join(BENCHMARKS)}")
    previous = load_results(args.results or [])
    result = None
    if args.model:
        args.name = args.name or _default_name(args)
        result = evaluate(args)
    out_dir = (
        Path(args.output_dir) if args.output_dir else (Path("eval_results") / args.name if result else None)
    )
    rows = previous + ([result] if result else [])
    table = render_table(rows)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        if result:
            with open(out_dir / "results.json", "w", encoding="utf-8") as f:
                json.dump(result, f, indent=1, ensure_ascii=False)
        (out_dir / "results.md").write_text(table, encoding="utf-8")
        plot_results(rows, out_dir / "results.png")
        logger.info("Wrote %s", out_dir)
    print(table)  # the CLI's product; the library itself logs
    return result


if __name__ == "__main__":
    main()
