"""One benchmark through generation and scoring: how every kit (maths, logic, code, science) plugs in.

A `Benchmark` is its problems plus two functions: `build_prompt(problem)` gives the prompt (a list of chat
messages, rendered with the tokenizer's chat template, or a plain string fed as is), and
`score(problems, completions)` gives, for every problem, one dict per completion with at least `correct`
(bool) — it sees the whole benchmark at once, so it can verify in parallel. `run_benchmark` samples
`num_samples` completions per problem and reports accuracy (the mean over samples: pass@1, or avg@n) and the
unbiased pass@k for every k in `ks`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from .generation import Generate
from .passk import default_ks, mean_pass_at_k

logger = logging.getLogger(__name__)

Prompt = str | list[dict[str, str]]


@dataclass
class Benchmark:
    """A benchmark as the runner sees it. Problems are JSON-serialisable dicts (they go into results.json)."""

    name: str
    problems: list[dict]
    build_prompt: Callable[[dict], Prompt]
    score: Callable[[list[dict], list[list[str]]], list[list[dict]]]
    title: str | None = None  # column title in the table (default: name)
    metric: str = "accuracy"  # what the table's number is called: accuracy, pass@1, ...
    postprocess: Callable[[str], str] | None = None  # applied to each completion before scoring and saving
    extra: dict = field(default_factory=dict)  # copied into the benchmark's results entry


def render_prompt(prompt: Prompt, tokenizer) -> str:
    """The text a model is fed: the chat template with the generation prompt, or the string itself."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def sampling_for(num_samples: int, temperature: float | None, top_p: float, max_new_tokens: int) -> dict:
    """Decoding settings: greedy for one sample unless a temperature is given, 0.6 for several."""
    if temperature is None:
        temperature = 0.6 if num_samples > 1 else 0.0
    return {"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens}


def run_benchmark(
    benchmark: Benchmark,
    generate: Generate,
    tokenizer,
    num_samples: int = 1,
    sampling: dict | None = None,
    ks: list[int] | None = None,
) -> dict:
    """Generate, score and summarise one benchmark; returns its entry of results.json's `benchmarks`.

    Entry: accuracy (percent, mean over problems of the fraction of correct samples), pass_at_k (percent,
    keyed by k as a string, JSON-style), num_problems, num_samples, temperature and `problems`, each problem
    dict with `accuracy` and `samples` (`completion` plus the scorer's fields).
    """
    sampling = dict(sampling or sampling_for(num_samples, None, 1.0, 1024))
    prompts = [benchmark.build_prompt(p) for p in benchmark.problems]
    # A chat template writes its own BOS; a plain-text prompt needs the tokenizer's.
    sampling.setdefault("add_special_tokens", bool(prompts) and isinstance(prompts[0], str))
    texts = [render_prompt(p, tokenizer) for p in prompts]
    logger.info(
        "%s: %d problems x %d samples (temperature %.2f)",
        benchmark.name,
        len(texts),
        num_samples,
        sampling["temperature"],
    )
    completions = generate(texts, num_samples, sampling) if texts else []
    if benchmark.postprocess is not None:
        completions = [[benchmark.postprocess(c) for c in cs] for cs in completions]
    verdicts = benchmark.score(benchmark.problems, completions)
    if len(verdicts) != len(benchmark.problems):
        raise ValueError(
            f"{benchmark.name}: the scorer returned {len(verdicts)} rows for {len(texts)} problems."
        )
    rows = []
    for i, (problem, cs, vs) in enumerate(zip(benchmark.problems, completions, verdicts, strict=True)):
        if len(vs) != len(cs) or any("correct" not in v for v in vs):
            raise ValueError(
                f"{benchmark.name} problem {i}: the scorer must give one dict with 'correct' per sample."
            )
        samples = [{"completion": c, **v} for c, v in zip(cs, vs, strict=True)]
        rows.append(
            {**problem, "accuracy": sum(bool(v["correct"]) for v in vs) / len(vs), "samples": samples}
        )
    accuracy = 100.0 * sum(r["accuracy"] for r in rows) / max(1, len(rows))
    ks = ks if ks is not None else default_ks(num_samples)
    ks = [k for k in ks if k <= num_samples]
    pass_k = mean_pass_at_k([[bool(s["correct"]) for s in r["samples"]] for r in rows], ks)
    logger.info("%s: %.1f%% (%s over %d samples)", benchmark.name, accuracy, benchmark.metric, num_samples)
    return {"accuracy": accuracy, "pass_at_k": {str(k): v for k, v in pass_k.items()},
            "num_problems": len(rows), "num_samples": num_samples, "temperature": sampling["temperature"],
            "metric": benchmark.metric, **benchmark.extra, "problems": rows}  # fmt: skip


def add_sampling_args(p) -> None:
    """`--samples K --temperature T [--pass_k ...]`, the flags of pass@k for every kit."""
    p.add_argument("--samples", type=int, default=1, help="completions per problem (K); >1 reports pass@k")
    p.add_argument("--temperature", type=float, help="default: 0 (greedy) for 1 sample, 0.6 for several")
    p.add_argument("--pass_k", type=int, nargs="+", help="the k of pass@k (default: 1, 2, 4, ... and K)")


def evaluate_benchmarks(
    benchmarks: list[Benchmark], args, generate: Generate | None = None, tokenizer=None
) -> dict:
    """Every benchmark through one model; the results dict an evaluation CLI writes as results.json.

    `args` carries the flags of `generation.add_generation_args` and `add_sampling_args`; `generate` and
    `tokenizer` default to `generation.make_generator(args)`.
    """
    import torch

    from .generation import make_generator

    torch.manual_seed(args.seed)
    backend = "given"
    if generate is None:
        generate, tokenizer, backend = make_generator(args)
    sampling = sampling_for(args.samples, args.temperature, args.top_p, args.max_new_tokens)
    results = {"name": args.name, "model": args.model, "adapter": args.adapter, "backend": backend,
               "config": {k: v for k, v in vars(args).items() if k != "results"}, "scores": {}, "benchmarks": {}}  # fmt: skip
    for benchmark in benchmarks:
        ks = [k for k in args.pass_k if k <= args.samples] if getattr(args, "pass_k", None) else None
        entry = run_benchmark(benchmark, generate, tokenizer, args.samples, sampling, ks)
        results["scores"][benchmark.name] = entry["accuracy"]
        results["benchmarks"][benchmark.name] = entry
    return results


def run_cli(
    parser,
    argv: list[str] | None,
    evaluate: Callable,
    render: Callable[[list[dict]], tuple[str, dict, dict]],
    check: Callable | None = None,
) -> dict | None:
    """The one `main()` of every evaluation command (maths, logic, code and science, and their combination).

    Parses `argv`; `check(parser, args)` may reject flags (`parser.error`). With `--model`, `evaluate(args,
    closers)` returns the results dict (it may append cleanup callables to `closers`, run even on error). The
    rows of `--results` files and this run's go through `render(rows)` → (markdown, column titles, extra
    `write_outputs` kwargs), written to `--output_dir` (default `eval_results/<name>`) and printed.
    """
    from pathlib import Path

    from .generation import default_name
    from .report import load_results, write_outputs

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parser.parse_args(argv)
    if not args.model and not args.results:
        parser.error("give --model (to evaluate) and/or --results (to render a table)")
    if getattr(args, "samples", 1) < 1:
        parser.error("--samples must be at least 1")
    if getattr(args, "limit", None) is not None and args.limit < 1:
        parser.error("--limit must be at least 1")
    if check is not None:
        check(parser, args)
    previous = load_results(args.results or [])
    result, closers = None, []
    try:
        if args.model:
            args.name = args.name or default_name(args)
            result = evaluate(args, closers)
    finally:
        for close in closers:
            close()
    rows = previous + ([result] if result else [])
    table, titles, write_kwargs = render(rows)
    out_dir = (
        Path(args.output_dir) if args.output_dir else (Path("eval_results") / args.name if result else None)
    )
    if out_dir is not None:
        write_outputs(out_dir, result, table, rows, titles, **write_kwargs)
    print(table)  # the command's product; the library itself logs
    return result
