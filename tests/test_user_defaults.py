"""A fit as a Lightning user writes it: the Trainer's defaults (Rich progress bar where rich is installed, model
summary, the default logger and checkpoint), a real clock, every costaware callback together, then the report.

The rest of the suite turns the progress bar off and meters on a fake clock; this is where a default habit that
breaks costaware shows (a nested Rich bar once failed the teacher's fit at teardown).
"""

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from costaware.ledger import read_ledger
from costaware.report import build_report
from costaware.strategies import Distill

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FEATURES = 16


def _loaders():
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(FEATURES, generator=g), torch.randn(768, FEATURES, generator=g)
    data = TensorDataset(x, (x @ w > 0).long())
    return DataLoader(data, batch_size=32, shuffle=True), DataLoader(data, batch_size=256)


def _classifier(ns):
    class Classifier(ns.pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(FEATURES, 32), nn.ReLU(), nn.Linear(32, 2))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            loss = nn.functional.cross_entropy(self(batch[0]), batch[1])
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch, batch_idx):
            self.log("val_acc", (self(batch[0]).argmax(-1) == batch[1]).float().mean())

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    torch.manual_seed(0)
    return Classifier()


def test_every_callback_with_the_trainers_defaults(ns, tmp_path):
    monitor = ns.costaware.CostMonitor(usd_per_host_hour=3.6)
    cap = ns.costaware.BudgetCap(max_usd=10.0)
    distill = Distill(nn.Linear(FEATURES, 2), max_epochs=1, latency_batches=1)
    stopping = ns.costaware.MarginalGainStopping(monitor="val_acc", usd_per_point=1e-9, then=distill)  # stops
    trainer = ns.Trainer(max_epochs=4, val_check_interval=0.25, default_root_dir=tmp_path,
                         callbacks=[monitor, cap, stopping])
    assert trainer.progress_bar_callback is not None  # the default bar, as a user gets it
    trainer.fit(_classifier(ns), *_loaders())

    assert trainer.state.status == "finished" and stopping.stopped_step is not None
    assert [r.role for r in stopping.results] == ["teacher", "student"]
    ledger = read_ledger(monitor.meter.ledger.path)
    assert ledger.end.how == "marginal_gain" and not ledger.problems
    report = build_report(monitor.meter.ledger.path)
    assert 0 < report["totals"]["usd"] < 10.0 and math.isfinite(report["totals"]["usd"]) and not report["problems"]
