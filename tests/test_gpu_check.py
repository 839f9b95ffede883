"""The GPU check's judgement (benchmarks/gpu_report_check.py) and the overhead benchmark's time box.

The GPU itself is exercised by ``benchmarks/gpu_check.sh`` on a GPU machine (issue 16); here the
verdicts are checked on report dictionaries in ``report.json``'s layout, with the figures an
H200 run would give and ones it must not.
"""

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_costaware_benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


check = _load("gpu_report_check")


def h200_report(mfu_pct: float, peak: float = 989.4e12, precision: str = "bf16-mixed") -> dict:
    gpu_s = 60.0
    return {
        "run": {"precision": precision, "peak_flops_per_s": peak},
        "prices": {"gpu_model": "H200"},
        "totals": {"gpu_hours": gpu_s / 3600, "flops": mfu_pct / 100 * peak * gpu_s, "gpu_energy_j": 24_000.0,
                   "usd": 0.06, "train_batches": 177, "elapsed_s": gpu_s},
        "averages": {"throughput_mfu_pct": mfu_pct, "mfu_pct_overall": mfu_pct, "gpu_utilization_pct": 71.0,
                     "gpu_power_w": 400.0, "mfu_note": "measured"},
        "events": [{"name": "budget_caps", "fields": {"caps": {"max_usd": 1.0}}},
                   {"name": "marginal_gain_decision", "fields": {}}],
        "problems": [],
        "outcome": {"how": "completed", "why": "max_epochs reached"},
    }


def verdicts(lines: list) -> list:
    return [line.split()[0] for line in lines]


def test_a_plausible_h200_run_passes_every_check():
    lines = check.check(h200_report(4.2), "bf16", gpu=True, expect_decisions=True, expect_cap=True)
    assert verdicts(lines) == ["PASS"] * 6 + ["INFO"]
    assert "MFU 4.20%" in lines[1] and "recomputed against 989.4 TFLOP/s 4.20%" in lines[1]


@pytest.mark.parametrize("mfu_pct", [0.3, 95.0])
def test_an_implausible_mfu_fails(mfu_pct):
    lines = check.check(h200_report(mfu_pct), "bf16", gpu=True, expect_decisions=False, expect_cap=False)
    assert lines[1].startswith("FAIL") and "plausible: 1%..80%" in lines[1]


def test_a_wrong_peak_fails_and_missing_decisions_fail():
    report = h200_report(4.0, peak=494.7e12)
    report["events"] = []
    lines = check.check(report, "bf16", gpu=True, expect_decisions=True, expect_cap=True)
    assert lines[0].startswith("FAIL") and "494.7 TFLOP/s" in lines[0]
    assert verdicts(lines)[3:5] == ["FAIL", "FAIL"]


def test_without_a_gpu_the_gpu_checks_are_skipped_with_the_reason():
    report = h200_report(4.0)
    report["averages"]["mfu_note"] = "not measured: no peak FLOP/s known for this device and precision"
    lines = check.check(report, "cpu", gpu=False, expect_decisions=False, expect_cap=False)
    assert verdicts(lines)[:2] == ["SKIPPED", "SKIPPED"] and "no peak FLOP/s" in lines[0]


def test_a_test_after_the_fit_must_be_metered_on_the_gpu():
    report = h200_report(4.2)
    stage = {"stage": "test", "gpu_hours": 0.001, "kwh": 0.0004, "usd": 0.004, "duration_s": 3.6}
    report["events"].append({"name": "stage_after_fit", "fields": stage})
    lines = check.check(report, "bf16", gpu=True, expect_decisions=True, expect_cap=True)
    assert verdicts(lines) == ["PASS"] * 7 + ["INFO"] and "trainer.test after the fit" in lines[5]
    stage["kwh"] = 0.0  # NVML read nothing during the test
    assert check.check(report, "bf16", gpu=True, expect_decisions=True, expect_cap=True)[5].startswith("FAIL")
    assert check.check(report, "cpu", gpu=False, expect_decisions=True, expect_cap=True)[4].startswith("SKIPPED")


def test_overhead_rounds_shrink_to_fit_the_time_box():
    overhead = _load("overhead")
    cold = [overhead.RunResult(step_s=0.01, cpu_step_s=0.01, fit_s=2.0) for _ in range(7)]
    args = argparse.Namespace(warmup=20, steps=620, repeats=5, max_seconds=200.0)
    said = []
    # A run of 620 steps: 2 s + 560 x 10 ms = 7.6 s; a round of 7 runs 53.2 s; 200 - 20 - 15.2 s left: 3 rounds.
    assert overhead.rounds_that_fit(args, cold, spent_s=20.0, say=said.append) == 3
    assert "3 of 5 rounds" in said[0]
    args.max_seconds = 30.0
    assert overhead.rounds_that_fit(args, cold, spent_s=20.0, say=said.append) == 1  # at least one
