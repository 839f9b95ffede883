"""Check one run's budget report for what a real GPU must show: MFU, peak, energy, decisions.

Reads the newest ``report.json`` under a run folder (``<out-dir>/lightning_logs/version_*/costaware``)
and prints one ``PASS`` / ``FAIL`` / ``SKIPPED`` line per check, with the figures behind it:

* the dense peak the MFU is taken against: 989.4 TFLOP/s for an H100 or H200 in bf16;
* MFU plausible, between 1% and 80% (time-weighted mean of the logged samples; the overall
  figure, FLOPs / (GPU-seconds x peak), is printed beside it), recomputed from the totals too;
* GPU energy measured (NVML) and the GPU's utilization read;
* ``MarginalGainStopping`` decided at least once and ``BudgetCap`` recorded its caps (when asked);
* a ``trainer.test`` after the fit metered on the GPU (GPU-hours and energy), where the run had one;
* the ledger's problems (none expected) and how the run ended.

Without a GPU (``--no-gpu``, the dry run) the GPU checks print SKIPPED with the report's own reason.

Usage::

    python benchmarks/gpu_report_check.py runs/gpu_check/lora_bf16 --label "LoRA bf16" --expect-decisions
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Optional

#: Dense bf16 peak of the H100 SXM and the H200, FLOP/s (NVIDIA's data sheets, without sparsity).
HOPPER_BF16_PEAK = 989.4e12
MFU_RANGE_PCT = (1.0, 80.0)


def newest_report(run_dir: Path) -> Optional[Path]:
    found = sorted(run_dir.glob("**/costaware/report.json"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def _num(value: Any) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def check(report: dict, label: str, gpu: bool, expect_decisions: bool, expect_cap: bool) -> list[str]:
    """The check lines for one report; each starts with PASS, FAIL or SKIPPED."""
    lines: list[str] = []
    run, totals, averages = report.get("run") or {}, report.get("totals") or {}, report.get("averages") or {}
    precision, peak = run.get("precision"), _num(run.get("peak_flops_per_s"))
    gpu_model = (report.get("prices") or {}).get("gpu_model")

    def line(verdict: str, what: str) -> None:
        lines.append(f"{verdict:<7} [{label}] {what}")

    if not gpu:
        note = averages.get("mfu_note", "not measured")
        line("SKIPPED", f"MFU: no GPU in a dry run ({note}); FLOPs counted {totals.get('flops')}")
        gpu_energy = (report.get("energy") or {}).get("gpu") or {}
        line("SKIPPED", f"GPU energy: no GPU in a dry run ({gpu_energy.get('status', 'no GPU')})")
    else:
        hopper = str(gpu_model or "").startswith(("H100", "H200")) and "bf16" in str(precision)
        if hopper:
            ok = peak is not None and abs(peak - HOPPER_BF16_PEAK) < 1e9
            line("PASS" if ok else "FAIL", f"peak {peak and peak / 1e12:.1f} TFLOP/s for {gpu_model} {precision} "
                 f"(dense bf16 data sheet: {HOPPER_BF16_PEAK / 1e12:.1f})")
        else:
            line("SKIPPED", f"peak check is for H100/H200 in bf16; here {gpu_model} {precision}, "
                 f"peak {peak and peak / 1e12:.1f} TFLOP/s")
        mfu, overall = _num(averages.get("throughput_mfu_pct")), _num(averages.get("mfu_pct_overall"))
        gpu_s = (_num(totals.get("gpu_hours")) or 0.0) * 3600.0
        flops = _num(totals.get("flops")) or 0.0
        recomputed = 100.0 * flops / (HOPPER_BF16_PEAK * gpu_s) if hopper and gpu_s > 0 else None
        low, high = MFU_RANGE_PCT
        judged = mfu if mfu is not None else overall
        verdict = "FAIL" if judged is None or not low <= judged <= high else "PASS"
        line(verdict, f"MFU {_pct(mfu)} (time-weighted samples), overall {_pct(overall)} = {flops:.3g} FLOPs / "
             f"({gpu_s:.1f} GPU-s x peak), recomputed against 989.4 TFLOP/s {_pct(recomputed)}; plausible: "
             f"{low:g}%..{high:g}% ({averages.get('mfu_note')})")
        energy_j = _num(totals.get("gpu_energy_j"))
        util = _num(averages.get("gpu_utilization_pct"))
        line("PASS" if energy_j and energy_j > 0 and util is not None else "FAIL",
             f"GPU energy {energy_j} J over {gpu_s:.1f} GPU-s "
             f"(mean {energy_j / gpu_s if energy_j and gpu_s else 0:.0f} W), "
             f"utilization {_pct(util)}, power {averages.get('gpu_power_w')} W, memory "
             f"{averages.get('gpu_memory_used_gib')} GiB")
    names = [e.get("name") for e in report.get("events") or []]
    if expect_decisions:
        n = names.count("marginal_gain_decision")
        line("PASS" if n > 0 else "FAIL", f"MarginalGainStopping: {n} decisions recorded")
    if expect_cap:
        caps = [e for e in report.get("events") or [] if e.get("name") == "budget_caps"]
        line("PASS" if caps else "FAIL", f"BudgetCap: caps recorded {caps[0]['fields'].get('caps') if caps else None}")
    for stage in [e.get("fields") or {} for e in report.get("events") or [] if e.get("name") == "stage_after_fit"]:
        gpu_h, kwh = _num(stage.get("gpu_hours")), _num(stage.get("kwh"))
        what = (f"trainer.{stage.get('stage')} after the fit: {gpu_h} GPU-h, {kwh} kWh, ${stage.get('usd')} in "
                f"{stage.get('duration_s')} s")
        if gpu:
            line("PASS" if gpu_h and kwh else "FAIL", what + " (GPU-hours and energy metered)")
        else:
            line("SKIPPED", what + " (no GPU in a dry run)")
    problems = report.get("problems") or []
    line("PASS" if not problems else "FAIL", f"ledger problems: {problems or 'none'}")
    outcome = report.get("outcome") or {}
    line("INFO", f"ended: {outcome.get('how')}: {outcome.get('why')}; ${_num(totals.get('usd')) or 0:.5f}, "
         f"{totals.get('train_batches')} batches, {_num(totals.get('elapsed_s')) or 0:.1f} s")
    return lines


def _pct(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.2f}%"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path, help="the example's --out-dir")
    p.add_argument("--label", default=None, help="what to call this run in the lines (default: the folder name)")
    p.add_argument("--no-gpu", action="store_true", help="a dry run on CPU: the GPU checks print SKIPPED")
    p.add_argument("--expect-decisions", action="store_true", help="the run had MarginalGainStopping")
    p.add_argument("--expect-cap", action="store_true", help="the run had BudgetCap")
    args = p.parse_args(argv)
    label = args.label or args.run_dir.name
    path = newest_report(args.run_dir)
    if path is None:
        print(f"FAIL    [{label}] no costaware/report.json under {args.run_dir}: the run did not finish")
        return 1
    lines = check(json.loads(path.read_text()), label, not args.no_gpu, args.expect_decisions, args.expect_cap)
    print(f"report: {path}")
    print("\n".join(lines))
    return 1 if any(x.startswith("FAIL") for x in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
