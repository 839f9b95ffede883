"""Per-phase cost (training, validation, checkpointing, probe, strategies) and reports that agree with
themselves: the end record, the report (json, md, html), a script's printed summary and ``costaware report``."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_clocked_model
from costaware import BudgetCap, CostMonitor, MarginalGainStopping, OnlineProbe
from costaware.ledger import read_ledger
from costaware.phases import PHASES, PhaseClock
from costaware.report import build_report, summary_lines

REPO = Path(__file__).resolve().parents[1]


class _Totals:
    """What a PhaseClock reads from the meter: the run's figures so far, moved by hand."""

    def __init__(self):
        self.elapsed_s = self.usd = self.kwh = self.co2_kg = 0.0

    def advance(self, seconds):
        self.elapsed_s += seconds
        self.usd += seconds / 1000
        return self


def test_phase_clock_charges_the_innermost_phase_once():
    spent = _Totals()
    clock = PhaseClock(lambda: spent)
    clock.start("training")
    spent.advance(10)
    clock.start("validation")
    spent.advance(3)
    clock.start("probe")  # a probe inside a validation counts as probe only
    spent.advance(2)
    clock.end("probe")
    spent.advance(1)
    clock.end("validation")
    clock.end("checkpointing")  # never started: nothing happens
    spent.advance(4)
    snap = clock.snapshot()  # the open phase is charged up to now
    assert {k: v["elapsed_s"] for k, v in snap.items()} == {"training": 14, "validation": 4, "checkpointing": 0,
                                                            "probe": 2}
    assert sum(v["usd"] for v in snap.values()) == pytest.approx(spent.usd)
    clock.end("training")
    spent.advance(5)  # nothing open: "other"
    assert sum(v["elapsed_s"] for v in clock.snapshot().values()) == 20


def _fit(ns, tmp_path, clock, callbacks, max_steps=6, ckpt_path=None, **trainer_kwargs):
    model = make_clocked_model(ns.BoringModel, clock, step_s=2.0)
    trainer = ns.Trainer(max_steps=max_steps, val_check_interval=3, limit_val_batches=2, default_root_dir=tmp_path,
                         callbacks=callbacks, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         **trainer_kwargs)
    trainer.fit(model, ckpt_path=ckpt_path)
    return trainer


def _fit_then_resume(ns, tmp_path, clock, every, first_steps, resume_steps):
    """A fit of ``first_steps`` checkpointing every ``every`` steps, then a new monitor resumed from
    the step-``every`` checkpoint to ``resume_steps``; the resumed monitor's ledger end record."""
    first = CostMonitor(usd_per_host_hour=3.6)
    first.meter.clock = clock
    checkpoint = ns.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=every, save_top_k=-1)
    _fit(ns, tmp_path, clock, [first, checkpoint], max_steps=first_steps)
    resumed = CostMonitor(usd_per_host_hour=3.6)
    resumed.meter.clock = clock
    _fit(ns, tmp_path, clock, [resumed], max_steps=resume_steps, enable_checkpointing=False,
         ckpt_path=str(tmp_path / "ckpt" / f"epoch=0-step={every}.ckpt"))
    return resumed, read_ledger(resumed.ledger.path).end


@pytest.mark.parametrize("driver", ["CostMonitor", "BudgetCap", "MarginalGainStopping"])
def test_phases_are_recorded_and_sum_to_the_total(ns, tmp_path, clock, driver):
    """With CostMonitor alone (or BudgetCap or MarginalGainStopping metering alone) the end record holds
    each phase's time and dollars; in the report they plus "other" make the total, and the wall time
    is its stated span."""
    callback = {"CostMonitor": lambda: CostMonitor(usd_per_host_hour=3.6),
                "BudgetCap": lambda: BudgetCap(max_usd=100, usd_per_host_hour=3.6),
                "MarginalGainStopping": lambda: MarginalGainStopping(
                    monitor="val_loss", mode="min", usd_per_point=1.0, min_points=50,
                    monitor_kwargs={"usd_per_host_hour": 3.6})}[driver]()
    meter = callback.meter if driver == "CostMonitor" else callback.own_meter
    meter.clock = clock
    trainer = _fit(ns, tmp_path, clock, [callback])
    ledger = next(Path(tmp_path).rglob("ledger.jsonl"))
    end = read_ledger(ledger).end
    assert set(end.phases) == set(PHASES)
    # 6 training steps of 2 s on the fake clock, nothing else advances it: all of it is training.
    assert end.phases["training"]["elapsed_s"] == pytest.approx(12.0)
    assert end.phases["training"]["usd"] == pytest.approx(12.0 / 1000)
    assert end.totals.elapsed_s == pytest.approx(12.0) and trainer.global_step == 6

    report = build_report(ledger)
    rows = {r["phase"]: r for r in report["phases"]["rows"]}
    assert list(rows) == [*PHASES, "other"]
    assert sum(r["usd"] for r in rows.values()) == pytest.approx(report["totals"]["usd"])
    assert sum(r["elapsed_s"] for r in rows.values()) == pytest.approx(report["totals"]["elapsed_s"])
    assert report["phases"]["total_usd"] == pytest.approx(report["totals"]["usd"])  # no strategies here
    assert report["run"]["span_s"] == pytest.approx(report["totals"]["elapsed_s"])
    md = (ledger.parent / "report.md").read_text()
    assert "by phase" in md and "| training | 12 s |" in md
    assert 'id="phases"' in (ledger.parent / "report.html").read_text()


def test_real_phases_measure_validation_checkpoints_and_the_probe(ns, tmp_path):
    """On the real clock: validation, checkpoint saves and an OnlineProbe each get their share."""

    class Model(ns.BoringModel):
        def embed(self, x):
            return self.layer(x)

    probe = OnlineProbe(train=(torch.randn(40, 32), torch.arange(40) % 2), val=(torch.randn(20, 32),
                                                                                torch.arange(20) % 2))
    trainer = ns.Trainer(max_steps=6, val_check_interval=3, limit_val_batches=2, default_root_dir=tmp_path,
                         callbacks=[CostMonitor(usd_per_host_hour=3.6), probe], logger=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Model())
    ledger = next(Path(tmp_path).rglob("ledger.jsonl"))
    phases = read_ledger(ledger).end.phases
    assert all(phases[name]["elapsed_s"] > 0 and phases[name]["usd"] > 0 for name in PHASES), phases
    report = build_report(ledger)
    assert sum(r["usd"] for r in report["phases"]["rows"]) == pytest.approx(report["totals"]["usd"])


def test_script_summary_and_costaware_report_say_the_same(ns, tmp_path, clock):
    """What an example prints (``summary_lines`` of its report), report.md and ``costaware report``
    in a shell give the same ending, totals, wall time and phases."""
    monitor = CostMonitor(usd_per_host_hour=3.6)
    monitor.meter.clock = clock
    _fit(ns, tmp_path, clock, [monitor])
    run_dir = monitor.ledger.path.parent
    printed = summary_lines(json.loads(monitor.report_paths["json"].read_text()))
    assert [line.split(":")[0] for line in printed] == ["Outcome", "Wall time", "Dollars", "Energy, total", "CO2",
                                                        "By phase"]
    assert printed[0] == "Outcome: completed: max_steps reached" and printed[2] == "Dollars: $0.012"
    assert printed[1].startswith("Wall time: 12 s, metered from ")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    shell = subprocess.run([sys.executable, "-m", "costaware.cli", "report", str(run_dir)], capture_output=True,
                           text=True, timeout=120, env=env)
    assert shell.returncode == 0, shell.stderr
    assert all(line in shell.stdout.splitlines() for line in printed), (printed, shell.stdout)
    md = (run_dir / "report.md").read_text()
    assert "| Outcome | completed: max\\_steps reached |" in md and "| Dollars | $0.012 |" in md


def test_a_killed_run_reports_its_phases_to_the_last_validation(ns, tmp_path, clock):
    """Without an end record (a kill), the report reads the last ``phases`` event instead."""
    monitor = CostMonitor(usd_per_host_hour=3.6)
    monitor.meter.clock = clock
    _fit(ns, tmp_path, clock, [monitor])
    ledger = monitor.ledger.path
    lines = ledger.read_text().splitlines()
    ledger.write_text("\n".join(line for line in lines if '"kind": "end"' not in line) + "\n")
    report = build_report(ledger)
    rows = {r["phase"]: r for r in report["phases"]["rows"]}
    assert rows["training"]["basis"] == "metered, to the last validation"
    assert rows["training"]["elapsed_s"] == pytest.approx(12.0)  # the last validation came after step 6
    assert not any(e["name"] == "phases" for e in report["events"])  # bookkeeping, not a decision


def test_a_resumed_run_keeps_the_phases_of_its_earlier_sessions(ns, tmp_path, clock):
    """Fit 6 steps (2 s each) with a checkpoint, resume to 12: training holds both sessions' 24 s,
    not the last session's 12 s with the first counted as "other"."""
    resumed, end = _fit_then_resume(ns, tmp_path, clock, every=6, first_steps=6, resume_steps=12)
    assert end.phases["training"]["elapsed_s"] == pytest.approx(24.0)
    assert end.totals.elapsed_s == pytest.approx(24.0)
    rows = {r["phase"]: r for r in build_report(resumed.ledger.path)["phases"]["rows"]}
    assert rows["other"]["elapsed_s"] == pytest.approx(0.0, abs=1e-9)


def test_a_resume_from_an_earlier_checkpoint_takes_the_phases_as_far_as_the_ledger_went(ns, tmp_path, clock):
    """Checkpoint at step 4, validations at 3 and 6, the first fit ends at 8; resumed from step 4
    to 10: training holds the first fit's 16 s (its end record, later than any validation's
    record) plus 12 s, and nothing is left to "other"."""
    _, end = _fit_then_resume(ns, tmp_path, clock, every=4, first_steps=8, resume_steps=10)
    assert end.phases["training"]["elapsed_s"] == pytest.approx(16.0 + 12.0)
    assert end.totals.elapsed_s == pytest.approx(28.0)


def test_a_second_fit_of_one_monitor_adds_to_its_phases(ns, tmp_path, clock):
    """A later fit with the same CostMonitor continues the run: its phases too, not only its totals."""
    monitor = CostMonitor(usd_per_host_hour=3.6)
    monitor.meter.clock = clock
    _fit(ns, tmp_path, clock, [monitor], max_steps=3, enable_checkpointing=False)
    _fit(ns, tmp_path, clock, [monitor], max_steps=3, enable_checkpointing=False)
    end = read_ledger(monitor.ledger.path).end
    assert end.totals.elapsed_s == pytest.approx(12.0)
    assert end.phases["training"]["elapsed_s"] == pytest.approx(12.0)
