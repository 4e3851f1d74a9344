"""λ(k) of the annealed schedules reaches `bridge_lambda` at the last step of its warm-up (`BridgeConfig.lambda_at`)."""

import math

import pytest

from .helpers import make_config


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize(("ratio", "steps", "ramp"), [(1.0, 30, 30), (0.4, 10, 4), (0.25, 7, 2)])
def test_ramp_runs_from_start_to_end_over_its_steps(tmp_path, schedule, ratio, steps, ramp):
    """A ramp of R = ceil(ratio · max_steps) steps: step 0 is `lambda_start`, step R − 1 is `bridge_lambda`, the
    steps between follow the shape at k / (R − 1), and λ stays at `bridge_lambda` afterwards."""
    cfg = make_config(tmp_path, lambda_schedule=schedule, lambda_start=0.1, bridge_lambda=0.7,
                      lambda_warmup_ratio=ratio)  # fmt: skip
    shape = (lambda t: t) if schedule == "linear" else (lambda t: (1 - math.cos(math.pi * t)) / 2)
    values = [cfg.lambda_at(k, steps) for k in range(steps)]
    assert values == pytest.approx([0.1 + 0.6 * shape(min(1.0, k / (ramp - 1))) for k in range(steps)])
    assert values[0] == pytest.approx(0.1)
    assert values[ramp - 1] == pytest.approx(0.7) and values[ramp - 2] < 0.7 - 1e-6
    assert all(v == pytest.approx(0.7) for v in values[ramp - 1 :])


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_whole_run_anneal_ends_at_its_final_value(tmp_path, schedule):
    """The issue's case: 0 → 1 over the whole run used to end at (T − 1)/T = 0.967 for T = 30."""
    cfg = make_config(tmp_path, lambda_schedule=schedule, lambda_start=0.0, bridge_lambda=1.0)
    assert cfg.lambda_at(29, 30) == 1.0


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_one_step_ramp_is_the_final_value(tmp_path, schedule):
    """R = 1 (a single-step run, or a ratio that rounds up to one step): λ is `bridge_lambda` from step 0."""
    cfg = make_config(tmp_path, lambda_schedule=schedule, lambda_start=0.2, bridge_lambda=0.6,
                      lambda_warmup_ratio=0.05)  # fmt: skip
    assert [cfg.lambda_at(k, 10) for k in range(3)] == [0.6, 0.6, 0.6]
    assert cfg.lambda_at(0, 1) == 0.6
