"""The unbiased pass@k estimator (Chen et al. 2021, "Evaluating Large Language Models Trained on Code").

With n samples of which c are correct, pass@k = 1 − C(n−c, k)/C(n, k): the probability that k samples drawn
without replacement from the n include a correct one. The binomials overflow floats for n in the hundreds, so
the ratio is computed as the product ∏_{i=n−c+1}^{n} (1 − k/i), which stays in [0, 1] at every step.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """pass@k for one problem with `n` samples, `c` of them correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}.")
    if n - c < k:  # every draw of k samples contains a correct one
        return 1.0
    ratio = 1.0
    for i in range(n - c + 1, n + 1):
        ratio *= 1.0 - k / i
    return 1.0 - ratio


def default_ks(n: int) -> list[int]:
    """The k reported for n samples: 1, 2, 4, ... up to n, and n itself (pass@32 for 32 samples)."""
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    return ks if ks[-1] == n else [*ks, n]


def mean_pass_at_k(correct: Sequence[Sequence[bool]], ks: Iterable[int] | None = None) -> dict[int, float]:
    """pass@k in percent, averaged over problems; `correct[i]` holds problem i's per-sample verdicts.

    Every problem must have the same number of samples n, and k <= n.
    """
    if not correct:
        return {}
    sizes = {len(row) for row in correct}
    if len(sizes) != 1:
        raise ValueError(f"pass@k needs the same number of samples per problem; got sizes {sorted(sizes)}.")
    (n,) = sizes
    ks = default_ks(n) if ks is None else sorted(set(ks))
    for k in ks:
        if not 1 <= k <= n:
            raise ValueError(f"pass@{k} needs 1 <= k <= {n} (the samples per problem).")
    return {
        k: 100.0 * sum(pass_at_k(n, sum(map(bool, row)), k) for row in correct) / len(correct) for k in ks
    }
