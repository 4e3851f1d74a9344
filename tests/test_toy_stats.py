"""The toy report's statistics and lr sweep, against independent computations."""

import math
import statistics

import pytest

from bridge_trl.toy.stats import comparison_sentence, mean_ci, paired_difference, t_cdf, t_quantile, verdict
from bridge_trl.toy.sweep import best_and_edge, extend, log_grid, lrs_for, run_sweep

# Two-sided 95% critical values of Student's t (textbook table, e.g. NIST/SEMATECH e-Handbook 1.3.6.7.2).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        20: 2.086, 30: 2.042}  # fmt: skip


@pytest.mark.parametrize("df", sorted(T975))
def test_t_quantile_matches_the_textbook_table(df):
    assert t_quantile(0.975, df) == pytest.approx(T975[df], abs=1.5e-3)


def test_t_cdf_matches_closed_forms():
    for x in (-3.0, -0.5, 0.0, 0.7, 2.0, 10.0):
        assert t_cdf(x, 1) == pytest.approx(0.5 + math.atan(x) / math.pi, abs=1e-9)  # Cauchy
        assert t_cdf(x, 2) == pytest.approx(0.5 + x / (2 * math.sqrt(2 + x * x)), abs=1e-9)


def test_mean_ci_by_hand():
    values = [0.30, 0.34, 0.28, 0.36, 0.32]
    out = mean_ci(values)
    # mean 0.32, sample std sqrt(0.004/4) = 0.0316228, half-width 2.776 * 0.0316228 / sqrt(5) = 0.03926
    assert out["mean"] == pytest.approx(0.32)
    assert out["std"] == pytest.approx(math.sqrt(0.001))
    assert out["ci"] == pytest.approx(2.7764 * math.sqrt(0.001) / math.sqrt(5), rel=1e-4)
    assert mean_ci([0.5])["ci"] is None and mean_ci([])["n"] == 0


def test_paired_difference_uses_only_shared_seeds_and_pairs_them():
    a = {1: 0.50, 2: 0.60, 3: 0.55, 9: 0.99}
    b = {1: 0.40, 2: 0.52, 3: 0.43, 7: 0.00}
    d = paired_difference(a, b)
    diffs = [0.10, 0.08, 0.12]
    assert d["seeds"] == [1, 2, 3] and d["n"] == 3
    assert d["mean"] == pytest.approx(statistics.fmean(diffs))
    half = 4.3027 * statistics.stdev(diffs) / math.sqrt(3)
    assert (d["low"], d["high"]) == pytest.approx((0.10 - half, 0.10 + half), rel=1e-4)
    # Pairing matters: the unpaired spread of a and b alone would not exclude 0, the paired one does.
    assert verdict(d) == "beats"
    assert verdict(paired_difference(b, a)) == "loses to"
    assert verdict(paired_difference({1: 0.5, 2: 0.4}, {1: 0.45, 2: 0.45})) == "ties with"


def test_sentence_is_generated_from_the_numbers():
    diffs = {"rl": paired_difference({1: 0.5, 2: 0.6, 3: 0.55}, {1: 0.4, 2: 0.52, 3: 0.43}),
             "sft": paired_difference({1: 0.5, 2: 0.4}, {1: 0.45, 2: 0.45})}  # fmt: skip
    s = comparison_sentence("BRIDGE", diffs)
    assert "beats rl (+10.0 points" in s and "ties with sft (+0.0 points" in s and "3 paired seeds" in s


def test_log_grid_and_extension():
    assert log_grid(1e-5, 1e-3) == [1e-5, 3e-5, 1e-4, 3e-4, 1e-3]
    assert log_grid(1e-5, 3e-3) == [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3]  # 2.5 decades, 6 trials
    assert extend([1e-4, 1e-3, 1e-2], "low") == 1e-5 and extend([1e-4, 1e-3, 1e-2], "high") == 0.1
    assert extend([1e-5, 3e-5, 1e-4], "low") == 3e-6 and extend([1e-4, 3e-4, 1e-3, 3e-3], "high") == 1e-2


def test_sweep_flags_an_edge_optimum_extends_and_refuses_to_call_it_tuned():
    grid = [1e-4, 1e-3, 1e-2]
    calls = []

    def evaluate(
        cells,
    ):  # "up" improves with lr forever; "peak" is best at 1e-3; seeds add noise-free offsets
        calls.append(cells)
        return [(math.log10(lrs["learning_rate"]) + 10 if m == "up" else -abs(math.log10(lrs["learning_rate"]) + 3))
                + 0.01 * s for m, s, lrs in cells]  # fmt: skip

    out = run_sweep(["up", "peak"], grid, seeds=[1, 2], evaluate=evaluate, max_extensions=2)
    assert out["peak"]["tuned"] and out["peak"]["best"] == 1e-3 and out["peak"]["extensions"] == []
    assert out["up"]["grid"] == [1e-4, 1e-3, 1e-2, 0.1, 1.0]  # extended twice on the high side
    assert out["up"]["edge"] == "high" and not out["up"]["tuned"] and out["up"]["extension_limit_hit"]
    assert out["up"]["extensions"] == ["high: added 0.1", "high: added 1"]
    assert len(out["up"]["scores"]["0.001"]) == 2  # every lr scored on both seeds
    assert best_and_edge({1e-3: [0.5], 1e-2: [0.5]}) == (1e-3, "low")  # ties go to the smaller lr
    # An extension that moves the optimum inside stops extending.
    out = run_sweep(["x"], [1e-3, 1e-2], [1], lambda cells: [-abs(math.log10(c[2]["learning_rate"]) + 1.5)
                                                               for c in cells])  # fmt: skip
    # 1e-2 is best on [1e-3, 1e-2] (edge); 0.1 scores the same, and ties go to the smaller lr, now interior.
    assert out["x"]["grid"] == [1e-3, 1e-2, 0.1] and out["x"]["best"] == 1e-2 and out["x"]["tuned"]


def test_two_rate_methods_tie_their_second_rate():
    """BRIDGE: beta = alpha; alternating and cold start: SFT rate = RL rate x sft_ratio; one rate for the rest."""
    assert lrs_for("bridge", 1e-4, sft_ratio=3.0) == {"learning_rate": 1e-4, "adapter_learning_rate": 1e-4}
    for method in ("alternating", "cold_start"):
        assert lrs_for(method, 1e-4, sft_ratio=3.0) == {"learning_rate": 1e-4, "sft_learning_rate": 3e-4}
    for method in ("rl", "sft", "mix", "chord", "luffy"):
        assert lrs_for(method, 1e-4, sft_ratio=3.0) == {"learning_rate": 1e-4}
