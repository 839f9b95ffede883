"""Distill: a student trained on the stopped teacher's soft targets, in a nested fit, both namespaces."""

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from costaware.ledger import read_ledger
from costaware.meter import CostMeter
from costaware.records import QuantizeEvent
from costaware.report import build_report
from costaware.strategies import Distill, StudentShapeError
from costaware.strategies.distill import distillation_loss

FEATURES = 16


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _data(n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(FEATURES, generator=g)  # the rule, the same for every split
    x = torch.randn(n, FEATURES, generator=g)
    y = (x @ w > 0).long()
    return TensorDataset(x, y)


def _loaders():
    train = DataLoader(_data(512, 0), batch_size=32, shuffle=True)
    val = DataLoader(_data(256, 0), batch_size=64)
    return train, val


def _teacher(ns, clock=None):
    """A small MLP classifier of the namespace; ``(x, y)`` batches, logs val_acc."""

    class Teacher(ns.pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(FEATURES, 64), nn.ReLU(), nn.Linear(64, 2))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            if clock is not None:
                clock.advance(1.0)
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_acc", (self(x).argmax(-1) == y).float().mean())

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    torch.manual_seed(0)
    return Teacher()


def _fit(ns, tmp_path, clock, distill, max_steps=60, extra=()):
    monitor = ns.costaware.CostMonitor(usd_per_host_hour=3.6, cpu_tdp_w=10, ram_power_w=3)
    stopping = ns.costaware.MarginalGainStopping(monitor="val_acc", usd_per_point=0.01, then=distill)
    trainer = ns.Trainer(max_steps=max_steps, val_check_interval=4, limit_val_batches=2, log_every_n_steps=4,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[monitor, stopping, *extra])
    teacher = _teacher(ns, clock)
    with pytest.MonkeyPatch.context() as patch:  # the student's meter (Distill's nested fit) too
        patch.setattr(CostMeter, "clock", staticmethod(clock))
        trainer.fit(teacher, *_loaders())
    return trainer, stopping, teacher


def test_distill_trains_a_student_in_a_nested_fit(ns, tmp_path, clock):
    torch.manual_seed(1)
    student = nn.Linear(FEATURES, 2)
    distill = Distill(student, temperature=2.0, alpha=0.5, max_epochs=3, lr=3e-2, latency_threads=1)
    trainer, stopping, teacher = _fit(ns, tmp_path, clock, distill)

    # The teacher's Trainer finished cleanly after the nested fit.
    assert trainer.state.status == "finished" and trainer.state.stage is None
    assert isinstance(distill.student_trainer, type(trainer))  # same Lightning namespace
    assert distill.student_trainer.global_step == 3 * 16
    losses = distill.losses
    assert len(losses) == 48 and sum(losses[-8:]) / 8 < 0.7 * sum(losses[:8]) / 8  # the loss falls

    teacher_row, student_row = stopping.results
    assert (teacher_row.role, student_row.role) == ("teacher", "student")
    assert student_row.params == FEATURES * 2 + 2 < teacher_row.params
    assert 0 < student_row.size_bytes < teacher_row.size_bytes
    assert student_row.metric > 0.75 and teacher_row.metric > 0.75  # accuracy on the validation set
    assert student_row.latency_ms_per_example > 0 and teacher_row.latency_ms_per_example > 0
    assert teacher_row.train_usd == pytest.approx(stopping.meter.totals.usd)
    assert student_row.train_usd >= 0 and student_row.path.endswith("student.pt")
    saved = torch.load(student_row.path, weights_only=True)
    assert torch.equal(saved["weight"], student.weight.detach())

    ledger = read_ledger(stopping.meter.ledger.path)
    assert ledger.end.how == "marginal_gain"  # the policy stopped the teacher
    distilled = [e for e in ledger.events if e["name"] == "distill"]
    assert len(distilled) == 1 and distilled[0]["trained"] and distilled[0]["steps"] == 48
    assert distilled[0]["last_loss"] < distilled[0]["first_loss"]
    result = next(e for e in ledger.events if e["name"] == "strategy_result")
    assert result["strategy"] == "distill" and [r["role"] for r in result["rows"]] == ["teacher", "student"]
    student_ledger = read_ledger(distilled[0]["student_ledger"])
    assert student_ledger.end["how"] == "completed"
    # The teacher's Trainer is usable afterwards.
    trainer.validate(teacher, _loaders()[1], verbose=False)
    assert "val_acc" in trainer.callback_metrics


def test_mismatched_student_fails_before_the_teacher_trains(ns, tmp_path, clock):
    distill = Distill(nn.Linear(FEATURES, 3))
    with pytest.raises(StudentShapeError, match=r"\(32, 3\).*\(32, 2\)|\(64, 3\).*\(64, 2\)") as error:
        _fit(ns, tmp_path, clock, distill)
    assert isinstance(error.value, ValueError)
    assert distill.student_trainer is None


def test_mismatched_student_fails_in_run_before_training(pl_ns, tmp_path):
    trainer = pl_ns.Trainer(max_steps=4, limit_val_batches=1, enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=tmp_path, logger=False)
    teacher = _teacher(pl_ns)
    trainer.fit(teacher, *_loaders())
    distill = Distill(nn.Sequential(nn.Linear(FEATURES, 2), nn.Flatten(0)))
    with pytest.raises(StudentShapeError, match="same shape"):
        distill.run(trainer, teacher)
    assert distill.student_trainer is None


def test_run_after_a_plain_fit(ns, tmp_path):
    trainer = ns.Trainer(max_steps=30, limit_val_batches=2, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, logger=False)
    teacher = _teacher(ns)
    trainer.fit(teacher, *_loaders())
    distill = Distill(nn.Linear(FEATURES, 2), max_steps=20, max_epochs=-1, alpha=1.0, latency_batches=0)
    rows = distill.run(trainer, teacher)
    assert [r.role for r in rows] == ["teacher", "student"] and distill.student_trainer.global_step == 20
    assert rows[1].latency_ms_per_example is None and rows[1].train_usd == 0.0  # no prices given


def test_without_a_cost_monitor_the_student_goes_under_the_loggers_folder(pl_ns, tmp_path):
    logger = pl_ns.pl.loggers.CSVLogger(tmp_path, name="run")
    trainer = pl_ns.Trainer(max_steps=4, limit_val_batches=1, enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=tmp_path / "root", logger=logger)
    teacher = _teacher(pl_ns)
    trainer.fit(teacher, *_loaders())
    rows = Distill(nn.Linear(FEATURES, 2), max_steps=2, max_epochs=-1, latency_batches=0).run(trainer, teacher)
    assert rows[1].path == str(tmp_path / "run" / "version_0" / "costaware" / "student" / "student.pt")


@pytest.mark.parametrize("max_usd", [0.02, 1.0])
def test_the_student_gets_what_is_left_of_the_budget(ns, tmp_path, clock, max_usd):
    budget_cap = ns.costaware.BudgetCap
    distill = Distill(nn.Linear(FEATURES, 2), max_steps=5, max_epochs=-1)
    # $0.001 a step: a $0.02 cap stops the teacher at step 20 with nothing left.
    trainer, stopping, _ = _fit(ns, tmp_path, clock, distill, extra=[budget_cap(max_usd=max_usd)])
    student_row = stopping.results[1]
    spent = stopping.meter.totals.usd
    if max_usd == 0.02:
        assert trainer.global_step == 20 and distill.student_trainer is None
        assert "no budget left" in student_row.note and student_row.train_usd == 0.0
    else:
        caps = [cb for cb in distill.student_trainer.callbacks if isinstance(cb, ns.costaware.BudgetCap)]
        assert len(caps) == 1 and caps[0].limits["max_usd"] == pytest.approx(max_usd - spent)
        assert distill.student_trainer.global_step == 5


def test_then_quantizes_the_student(pl_ns, tmp_path, clock):
    pytest.importorskip("bitsandbytes")
    from costaware.strategies import Quantize

    distill = Distill(nn.Sequential(nn.Linear(FEATURES, 32), nn.ReLU(), nn.Linear(32, 2)), max_epochs=2, lr=1e-2,
                      then=Quantize(bits=8, max_drop=1.0))
    _, stopping, _ = _fit(pl_ns, tmp_path, clock, distill)
    roles = [r.role for r in stopping.results]
    assert roles == ["teacher", "student", "quantized"]
    quantized = stopping.results[2]
    assert quantized.metric is not None and quantized.latency_ms_per_example is not None
    assert quantized.note.startswith("kept") and quantized.size_bytes < stopping.results[1].size_bytes * 2
    # One quantize record whoever ran it, with its verdict: the report says "kept", as the row does.
    event = [e for e in read_ledger(stopping.meter.ledger.path).events if isinstance(e, QuantizeEvent)][-1]
    assert (event.of, event.kept, event.quantized_metric) == ("student", True, quantized.metric)
    summary = [e["summary"] for e in build_report(stopping.meter.ledger.path)["events"]
               if e["name"] == "quantize"][-1]
    assert ", kept;" in summary and "not kept" not in summary


def test_distillation_loss():
    torch.manual_seed(0)
    s, t, y = torch.randn(8, 5), torch.randn(8, 5), torch.randint(0, 5, (8,))
    kl = nn.functional.kl_div(torch.log_softmax(s / 3, -1), torch.softmax(t / 3, -1), reduction="batchmean")
    assert distillation_loss(s, t, None, 3.0, 0.5) == pytest.approx(float(kl * 9), rel=1e-5)
    hard = nn.functional.cross_entropy(s, y)
    assert distillation_loss(s, t, y, 3.0, 0.25) == pytest.approx(float(0.25 * kl * 9 + 0.75 * hard), rel=1e-5)
    assert float(distillation_loss(t, t, None, 2.0, 1.0)) == pytest.approx(0.0, abs=1e-6)
    # Sequence logits (batch, length, classes) are flattened.
    sequence = distillation_loss(torch.randn(2, 3, 5), torch.randn(2, 3, 5), torch.zeros(2, 3), 1.0, 0.5)
    assert math.isfinite(float(sequence))


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"student": "not a model"}, "student"),
    ({"temperature": 0}, "temperature"),
    ({"alpha": 1.5}, "alpha"),
    ({"lr": -1}, "lr"),
    ({"max_epochs": 0}, "max_epochs"),
    ({"max_steps": 0}, "max_steps"),
    ({"max_epochs": -1}, "max_epochs=-1 needs max_steps"),
    ({"then": object()}, "then"),
    ({"metric_mode": "up"}, "metric_mode"),
    ({"inputs_fn": 3}, "inputs_fn"),
    ({"latency_threads": 0}, "latency_threads"),
])
def test_bad_input(kwargs, named):
    kwargs = {"student": nn.Linear(2, 2), **kwargs}
    with pytest.raises(ValueError, match=named):
        Distill(**kwargs)
