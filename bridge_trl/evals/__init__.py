"""Evaluation beyond maths, on the maths evaluation's generation and report path.

`generation` (models, backends, batched sampling), `runner` (a benchmark = a prompt builder plus a scorer over
completions; pass@k), `report` (markdown table, chart, results JSON), `sandbox` (untrusted programs in their own
processes), `code` (HumanEval, LiveCodeBench), `science` (GPQA-Diamond) and the CLI `evaluate`. The modules are
imported on use: nothing here loads torch or a kit at `import bridge_trl.evals`.
"""
