"""The toy reproduction of the paper's Figure 1 on the CPU: a demo, not the library (the trainer never imports it).

- `task`: 3-number sums, paired RL prompts and SFT traces, the exact-match reward, the pretraining corpus.
- `base`: the tiny base model, pretrained until its validation accuracy is in a band, cached.
- `run`: one (method, seed) training run with held-out greedy accuracy along it.
- `stats`: t-based confidence intervals, paired differences, the generated verdict sentence.
- `sweep`: learning-rate grids, edge detection and extension, the committed `tuned.json`.
- `calibration`: the §1 premise checks on the baselines (RL gains, SFT is fast, the base is in its band).
- `report`: `results.md`, `results.json` and the figures.
- `studies`: issue 18's four studies of the later paper's claims, on fresh test seeds, with `--replicate`.
"""

from .task import arithmetic_datasets, arithmetic_problem, boxed_exact_match, pretraining_corpus, toy_splits

__all__ = [
    "arithmetic_datasets",
    "arithmetic_problem",
    "boxed_exact_match",
    "pretraining_corpus",
    "toy_splits",
]
