"""A fit as a Lightning user writes it: the Trainer's defaults (Rich progress bar where rich is installed, model
summary, the default logger and checkpoint), a real clock, every costaware callback together, then the report.

The rest of the suite turns the progress bar off and meters on a fake clock; this is where a default habit that
breaks costaware shows (a nested Rich bar once failed the teacher's fit at teardown).
"""

import math

import pytest
from torch import nn

from costaware.ledger import read_ledger
from costaware.report import build_report
from costaware.strategies import Distill
from tiny_classifier import FEATURES, tiny_classifier, tiny_loaders

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_every_callback_with_the_trainers_defaults(ns, tmp_path):
    monitor = ns.costaware.CostMonitor(usd_per_host_hour=3.6)
    cap = ns.costaware.BudgetCap(max_usd=10.0)
    distill = Distill(nn.Linear(FEATURES, 2), max_epochs=1, latency_batches=1)
    stopping = ns.costaware.MarginalGainStopping(monitor="val_acc", usd_per_point=1e-9, then=distill)  # stops
    trainer = ns.Trainer(max_epochs=4, val_check_interval=0.25, default_root_dir=tmp_path,
                         callbacks=[monitor, cap, stopping])
    assert trainer.progress_bar_callback is not None  # the default bar, as a user gets it
    trainer.fit(tiny_classifier(ns), *tiny_loaders())

    assert trainer.state.status == "finished" and stopping.stopped_step is not None
    assert [r.role for r in stopping.results] == ["teacher", "student"]
    ledger = read_ledger(monitor.meter.ledger.path)
    assert ledger.end.how == "marginal_gain" and not ledger.problems
    report = build_report(monitor.meter.ledger.path)
    assert 0 < report["totals"]["usd"] < 10.0 and math.isfinite(report["totals"]["usd"]) and not report["problems"]
