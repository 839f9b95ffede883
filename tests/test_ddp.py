"""DDP on CPU with two processes (gloo): run totals are the sum of the ranks; nothing hangs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from costaware.ledger import read_ledger


@pytest.mark.slow  # two processes (~25 s); CI runs -m slow too
def test_ddp_totals_are_the_sum_of_ranks(tmp_path):
    script = Path(__file__).with_name("ddp_fit.py")
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    run = ranks[0]["totals"]
    summed = {k: v for k, v in run.items() if k != "elapsed_s"}  # wall time is each rank's own clock
    assert {k: ranks[1]["totals"][k] for k in summed} == pytest.approx(summed)  # every rank agrees
    for key in ("gpu_energy_j", "gpu_hours", "usd", "co2_kg", "flops", "train_batches", "host_hours"):
        assert run[key] == pytest.approx(ranks[0]["mine"][key] + ranks[1]["mine"][key]), key
    assert run["train_batches"] == 60
    # Each rank meters its own GPU (300 W and 500 W): both contribute energy.
    assert ranks[0]["mine"]["gpu_energy_j"] > 0 and ranks[1]["mine"]["gpu_energy_j"] > 0
    # One node, one host: only local rank 0 counts it.
    assert ranks[1]["mine"]["host_hours"] == 0 and ranks[1]["mine"]["cpu_energy_j"] == 0
    assert ranks[0]["ledger"] and ranks[1]["ledger"] is None  # rank zero writes the ledger
    ledger = read_ledger(ranks[0]["ledger"])
    assert ledger.header["world_size"] == 2
    assert ledger.end["totals"]["usd"] == pytest.approx(run["usd"])
    tests = [e for e in ledger.events if e.name == "stage_after_fit"]  # written once, by rank zero
    assert len(tests) == 1 and tests[0].stage == "test" and not ledger.problems
    assert tests[0].gpu_hours == pytest.approx(2 * tests[0].duration_s / 3600)  # both ranks' GPUs
    assert tests[0].host_hours == pytest.approx(tests[0].duration_s / 3600)  # one node


@pytest.mark.slow  # two DDP fits of two processes (~40 s)
def test_a_resumed_ddp_run_starts_every_rank_from_rank_zeros_reading(tmp_path):
    """Resumed from a checkpoint after which the run went on: rank 0 reads the later spend from
    the ledger, rank 1 (node-local log dirs) cannot; both must resume from the same totals."""
    script = Path(__file__).with_name("ddp_resume.py")
    for phase in ("first", "resume"):
        result = subprocess.run([sys.executable, str(script), str(tmp_path), phase], capture_output=True, text=True,
                                timeout=240)
        assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"resumed_rank{r}.json").read_text()) for r in (0, 1)]
    run = {k: v for k, v in ranks[0]["totals"].items() if k != "elapsed_s"}
    assert {k: ranks[1]["totals"][k] for k in run} == pytest.approx(run)
    # 20 steps x 2 ranks recorded by the first run's ledger, then steps 11-26 x 2 ranks.
    assert run["train_batches"] == 40 + 32
    assert ranks[1]["resumed_from"]["ledger_usd"] == pytest.approx(ranks[0]["resumed_from"]["ledger_usd"])
