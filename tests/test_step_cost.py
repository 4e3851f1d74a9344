"""benchmarks/step_cost.py's arithmetic: the limit and what lies over it, checked by hand on made-up phases."""

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "step_cost", Path(__file__).resolve().parents[1] / "benchmarks" / "step_cost.py"
)
step_cost = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(step_cost)


def run(variant, step_s, peak_mb, diagnostics_s=0.0, **phases):
    return {"variant": variant, "step_s": step_s, "peak_mb": peak_mb, "diagnostics_s": diagnostics_s,
            "phases_s": {k: phases.get(k, 0.0) for k in step_cost.PHASES}}  # fmt: skip


def test_compare_against_a_hand_computation():
    rl = run("rl", 10.0, 100.0, decode=6.0, generation=0.5, rl_fwd_bwd=3.0, optimizer=0.2)  # 0.3 s untimed
    bridge = run("bridge", 16.0, 130.0, decode=6.5, generation=0.5, rl_fwd_bwd=3.2, optimizer=0.3, sft_fwd_bwd=1.5,
                 shadow_fwd_bwd=3.0, shadow_optimizer=0.2, shadow_swap=0.1, diagnostics_s=0.235)  # fmt: skip  # 0.7 s untimed
    c = step_cost.compare(rl, bridge)
    assert c["extra_compute_s"] == pytest.approx(1.5 + 3.0 + 0.2)
    assert c["limit_s"] == pytest.approx(10.0 + 4.7) and c["limit_ratio"] == pytest.approx(1.47)
    assert c["over_limit"] == pytest.approx(16.0 / 14.7 - 1)
    assert c["adapter_s"] == pytest.approx(0.5 + 0.0 + 0.2 + 0.1)
    assert c["bookkeeping_s"] == pytest.approx(0.1 + 0.7 - 0.3)
    assert c["diagnostics_over_extra_compute"] == pytest.approx(0.235 / 4.7)  # 5%: inside the 10%
    assert c["time_ratio"] == pytest.approx(1.6) and c["memory_ratio"] == pytest.approx(1.3)


def test_variants_parse_into_config_fields():
    assert step_cost.parse_variant("rl") == ("rl", {})
    assert step_cost.parse_variant("bridge:shadow_offload=cpu,merge_adapter_for_generation=false") == (
        "bridge",
        {"shadow_offload": "cpu", "merge_adapter_for_generation": False},
    )
