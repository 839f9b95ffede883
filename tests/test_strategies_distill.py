"""Distill: a student trained on the stopped teacher's soft targets, in a nested fit, both namespaces."""

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from costaware.ledger import read_ledger
from costaware.meter import CostMeter
from costaware.strategies import Distill, StudentShapeError
from costaware.strategies.distill_module import distillation_loss
from tiny_classifier import FEATURES, tiny_classifier, tiny_data, tiny_loaders

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _fit(ns, tmp_path, clock, distill, max_steps=60, extra=(), progress_bar=False):
    monitor = ns.costaware.CostMonitor(usd_per_host_hour=3.6, cpu_tdp_w=10, ram_power_w=3)
    stopping = ns.costaware.MarginalGainStopping(monitor="val_acc", usd_per_point=0.01, then=distill)
    trainer = ns.Trainer(max_steps=max_steps, val_check_interval=4, limit_val_batches=2, log_every_n_steps=4,
                         enable_progress_bar=progress_bar, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[monitor, stopping, *extra])
    teacher = tiny_classifier(ns, clock)
    with pytest.MonkeyPatch.context() as patch:  # the student's meter (Distill's nested fit) too
        patch.setattr(CostMeter, "clock", staticmethod(clock))
        trainer.fit(teacher, *tiny_loaders())
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
    trainer.validate(teacher, tiny_loaders()[1], verbose=False)
    assert "val_acc" in trainer.callback_metrics


@pytest.mark.parametrize("bar", ["RichProgressBar", "TQDMProgressBar"])
def test_the_teachers_progress_bar_survives_the_students_fit(ns, tmp_path, clock, bar):
    """Lightning's RichProgressBar (its default where rich is installed) cannot nest: a second one clears the
    console's live display, and the teacher's fit failed at teardown. The student then shows no bar; under a TQDM
    bar it shows a TQDM one."""
    if bar == "RichProgressBar":
        pytest.importorskip("rich")
    distill = Distill(nn.Linear(FEATURES, 2), max_epochs=1, latency_batches=0)
    trainer, stopping, _ = _fit(ns, tmp_path, clock, distill, extra=[getattr(ns.pl.callbacks, bar)()],
                                progress_bar=True)
    assert trainer.state.status == "finished" and distill.student_trainer.global_step == 16
    student_bar = distill.student_trainer.progress_bar_callback
    assert (student_bar is None) if bar == "RichProgressBar" else type(student_bar).__name__ == "TQDMProgressBar"
    assert [r.role for r in stopping.results] == ["teacher", "student"]


def test_the_students_trainer_kwargs_may_turn_its_progress_bar_off(pl_ns, tmp_path, clock):
    distill = Distill(nn.Linear(FEATURES, 2), max_epochs=1, latency_batches=0,
                      trainer_kwargs={"enable_progress_bar": False})
    trainer, _, _ = _fit(pl_ns, tmp_path, clock, distill, extra=[pl_ns.pl.callbacks.TQDMProgressBar()],
                         progress_bar=True)
    assert trainer.state.status == "finished" and distill.student_trainer.progress_bar_callback is None


def test_mismatched_student_fails_before_the_teacher_trains(ns, tmp_path, clock):
    distill = Distill(nn.Linear(FEATURES, 3))
    with pytest.raises(StudentShapeError, match=r"\(32, 3\).*\(32, 2\)|\(64, 3\).*\(64, 2\)") as error:
        _fit(ns, tmp_path, clock, distill)
    assert isinstance(error.value, ValueError)
    assert distill.student_trainer is None


def test_mismatched_student_fails_in_run_before_training(pl_ns, tmp_path):
    trainer = pl_ns.Trainer(max_steps=4, limit_val_batches=1, enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=tmp_path, logger=False)
    teacher = tiny_classifier(pl_ns)
    trainer.fit(teacher, *tiny_loaders())
    distill = Distill(nn.Sequential(nn.Linear(FEATURES, 2), nn.Flatten(0)))
    with pytest.raises(StudentShapeError, match="same shape"):
        distill.run(trainer, teacher)
    assert distill.student_trainer is None


def test_run_after_a_plain_fit(ns, tmp_path):
    trainer = ns.Trainer(max_steps=30, limit_val_batches=2, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, logger=False)
    teacher = tiny_classifier(ns)
    trainer.fit(teacher, *tiny_loaders())
    distill = Distill(nn.Linear(FEATURES, 2), max_steps=20, max_epochs=-1, alpha=1.0, latency_batches=0)
    rows = distill.run(trainer, teacher)
    assert [r.role for r in rows] == ["teacher", "student"] and distill.student_trainer.global_step == 20
    assert rows[1].latency_ms_per_example is None and rows[1].train_usd == 0.0  # no prices given


def test_run_after_a_fit_with_a_cost_monitor_prices_the_student_alike(pl_ns, tmp_path):
    monitor = pl_ns.costaware.CostMonitor(usd_per_host_hour=3.6, cpu_tdp_w=10, ram_power_w=3)
    trainer = pl_ns.Trainer(max_steps=8, limit_val_batches=1, enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=tmp_path, logger=False, callbacks=[monitor])
    teacher = tiny_classifier(pl_ns)
    trainer.fit(teacher, *tiny_loaders())
    rows = Distill(nn.Linear(FEATURES, 2), max_steps=4, max_epochs=-1, latency_batches=0).run(trainer, teacher)
    assert [r.role for r in rows] == ["teacher", "student"]
    assert rows[1].train_usd > 0  # the student's meter got the teacher's prices


def test_without_a_cost_monitor_the_student_goes_under_the_loggers_folder(pl_ns, tmp_path):
    logger = pl_ns.pl.loggers.CSVLogger(tmp_path, name="run")
    trainer = pl_ns.Trainer(max_steps=4, limit_val_batches=1, enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=tmp_path / "root", logger=logger)
    teacher = tiny_classifier(pl_ns)
    trainer.fit(teacher, *tiny_loaders())
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

    distill = Distill(nn.Sequential(nn.Linear(FEATURES, 256), nn.ReLU(), nn.Linear(256, 2)), max_epochs=2, lr=1e-2,
                      then=Quantize(bits=8, max_drop=1.0, objective="memory"))
    _, stopping, _ = _fit(pl_ns, tmp_path, clock, distill)
    roles = [r.role for r in stopping.results]
    assert roles == ["teacher", "student", "quantized"]
    quantized = stopping.results[2]
    assert quantized.metric is not None and quantized.latency_ms_per_example is not None
    assert quantized.note.startswith("kept") and quantized.size_bytes < stopping.results[1].size_bytes / 2


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
    ({"warmup_fraction": 2}, "warmup_fraction"),
    ({"usd_per_label": 0}, "usd_per_label"),
    ({"deployment": {"requests": 1}}, "deployment"),
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


# ----------------------------------------------------------------------------------------------
# The default student (the teacher with fewer layers), lifetime cost, distill or annotate
# ----------------------------------------------------------------------------------------------

VOCAB, LENGTH = 50, 6


def _token_data(n=384, seed=0):
    """Sequences of tokens; the class is whether token 1 appears more often than token 2."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, 5, (n, LENGTH), generator=g)
    y = ((x == 1).sum(1) > (x == 2).sum(1)).long()
    return TensorDataset(x, y)


class _Encoder(nn.Module):
    """A small transformer classifier: embedding, ``layers`` encoder layers, mean pool, head."""

    def __init__(self, layers=4):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))


def _encoder_teacher(ns, clock=None, layers=4):
    """A small transformer classifier of the namespace (``_Encoder``)."""
    return tiny_classifier(ns, clock, net=lambda: _Encoder(layers))


def _fit_encoder(ns, tmp_path, clock, distill, max_steps=40, layers=4):
    monitor = ns.costaware.CostMonitor(usd_per_host_hour=3.6, cpu_tdp_w=10, ram_power_w=3)
    stopping = ns.costaware.MarginalGainStopping(monitor="val_acc", usd_per_point=0.01, then=distill)
    trainer = ns.Trainer(max_steps=max_steps, val_check_interval=4, limit_val_batches=2, log_every_n_steps=4,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[monitor, stopping])
    teacher = _encoder_teacher(ns, clock, layers)
    train = DataLoader(_token_data(384, 0), batch_size=32, shuffle=True)
    val = DataLoader(_token_data(128, 1), batch_size=32)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(CostMeter, "clock", staticmethod(clock))
        trainer.fit(teacher, train, val)
    return trainer, stopping, teacher


def test_truncated_student_keeps_spread_layers_of_the_teacher():
    from costaware.strategies import TruncatedStudent
    from costaware.strategies.students import NoLayerStackError

    assert TruncatedStudent(2).indices(6) == [0, 5] and TruncatedStudent(3).indices(6) == [0, 2, 5]
    assert TruncatedStudent(1).indices(6) == [0]
    with pytest.raises(NoLayerStackError, match="keeps every layer"):  # the student would be the teacher
        TruncatedStudent(9).indices(4)
    assert TruncatedStudent([0, 1]).indices(6) == [0, 1]
    teacher = nn.Sequential(nn.Embedding(10, 8), nn.ModuleList([nn.Linear(8, 8) for _ in range(4)]))
    teacher[1][3].weight.data.fill_(3.0)
    student = TruncatedStudent(2)(teacher)
    assert len(student[1]) == 2 and torch.equal(student[1][1].weight, teacher[1][3].weight)
    assert student[1][1].weight is not teacher[1][3].weight and len(teacher[1]) == 4  # a copy; the teacher is intact
    with pytest.raises(NoLayerStackError, match="no stack of repeated layers"):
        TruncatedStudent(2)(nn.Linear(2, 2))
    with pytest.raises(NoLayerStackError, match="out of range"):
        TruncatedStudent([0, 7])(teacher)
    for bad in (0, [], [1, 1], [-1], "2", True):
        with pytest.raises(ValueError, match="layers must"):
            TruncatedStudent(bad)


def test_truncated_student_merges_lora_adapters():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = nn.Linear(8, 8)
            self.blocks = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])

        def forward(self, x):
            x = self.first(x)
            for block in self.blocks:
                x = block(x)
            return x

    model = peft.get_peft_model(Net(), peft.LoraConfig(r=2, target_modules=["first"], init_lora_weights=False))
    x = torch.randn(4, 8)
    with torch.no_grad():
        expected = model.base_model.model.first(x)  # the adapted layer
    from costaware.strategies import TruncatedStudent

    student = TruncatedStudent(2)(model)
    assert not any("lora" in name for name, _ in student.named_parameters()) and len(student.blocks) == 2
    assert all(p.requires_grad for p in student.parameters())
    with torch.no_grad():
        torch.testing.assert_close(student.first(x), expected, atol=1e-5, rtol=1e-5)  # merged into the weight
    from costaware.strategies.students import served_copy

    served = served_copy(model)  # the teacher as it is served: adapters merged, all its layers
    assert served is not model and len(served.blocks) == 3
    assert not any("lora" in n for n, _ in served.named_parameters())
    plain = nn.Linear(2, 2)
    assert served_copy(plain) is plain


def test_default_student_and_lifetime_value(pl_ns, tmp_path, clock):
    """No student given: the teacher with 2 of its 8 layers, trained, then judged by lifetime value."""
    from costaware.deploy import Deployment

    # 10^12 requests: the 4x faster student surely repays its training (it is trained, whatever the timings).
    deployment = Deployment(requests=10**12, usd_per_hour=1.0, examples=8, repeats=1)
    distill = Distill(max_epochs=2, lr=1e-2, deployment=deployment, usd_per_label=0.0001, latency_threads=1)
    _, stopping, teacher = _fit_encoder(pl_ns, tmp_path, clock, distill, layers=8)
    teacher_row, student_row = stopping.results
    assert len(distill.student.net.encoder.layers) == 2 and len(teacher.net.encoder.layers) == 8
    assert student_row.params < teacher_row.params and distill.student_trainer.global_step == 24
    ledger = read_ledger(stopping.meter.ledger.path)
    candidates = {e["role"]: e for e in ledger.events if e["name"] == "deploy_candidate"}
    [recommendation] = [e for e in ledger.events if e["name"] == "deploy_recommendation"]
    assert set(candidates) == {"teacher", "student"}
    # Figures agree: rows, candidates and the arithmetic of the deployment.
    for row in (teacher_row, student_row):
        event = candidates[row.role]
        assert row.usd_per_1k_requests == event["usd_per_1k_requests"] and row.lifetime_usd == event["lifetime_usd"]
        assert event["usd_per_1k_requests"] == pytest.approx(event["latency_ms_per_example"] / 3600.0)
        assert event["lifetime_usd"] == pytest.approx(event["train_usd"] + event["serving_usd"])
        assert row.value_usd == pytest.approx(100 * row.metric * 0.01 - row.lifetime_usd)
    assert candidates["teacher"]["train_usd"] == pytest.approx(teacher_row.train_usd)
    assert candidates["student"]["train_usd"] == pytest.approx(teacher_row.train_usd + student_row.train_usd)
    assert [r.deploy for r in stopping.results].count(True) == 1
    best = max(stopping.results, key=lambda r: r.value_usd)
    assert best.deploy and recommendation["role"] == best.role
    # The net saving counts everything the switch spent: the student's fit and the timing.
    assert recommendation["switch_usd"] == pytest.approx(student_row.train_usd + recommendation["measure_usd"])
    assert recommendation["net_saving_usd"] == pytest.approx(
        candidates["teacher"]["serving_usd"] - candidates[best.role]["serving_usd"] - recommendation["switch_usd"])
    [annotate] = [e for e in ledger.events if e["name"] == "distill_or_annotate"]
    assert annotate["labels"] == int(student_row.train_usd / 0.0001) and "log(examples seen)" in annotate["assumption"]


def test_a_student_that_cannot_pay_is_not_trained(pl_ns, tmp_path, clock):
    from costaware.deploy import Deployment

    distill = Distill(max_epochs=2, deployment=Deployment(requests=10, usd_per_hour=0.01, examples=4, repeats=1))
    _, stopping, _ = _fit_encoder(pl_ns, tmp_path, clock, distill)
    teacher_row, student_row = stopping.results
    assert distill.student_trainer is None and student_row.note.startswith("not trained: it cannot pay")
    assert teacher_row.deploy is True and student_row.deploy is False
    event = next(e for e in read_ledger(stopping.meter.ledger.path).events if e["name"] == "distill")
    assert event["trained"] is False and "cannot pay" in event["note"]


def test_unlabelled_batches_are_distilled_too(pl_ns, tmp_path):
    from costaware.strategies.distill import Interleaved

    mixed = list(Interleaved([f"l{i}" for i in range(4)], [f"u{i}" for i in range(2)]))
    assert mixed == ["l0", "u0", "l1", "l2", "u1", "l3"] and len(Interleaved([1, 2], [3])) == 3
    trainer = pl_ns.Trainer(max_steps=4, limit_val_batches=1, enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=tmp_path, logger=False)
    teacher = tiny_classifier(pl_ns)
    train, val = tiny_loaders()
    trainer.fit(teacher, train, val)
    unlabelled = DataLoader(TensorDataset(tiny_data(64, 3).tensors[0]), batch_size=32)  # inputs only
    distill = Distill(nn.Linear(FEATURES, 2), unlabelled_dataloader=unlabelled, latency_batches=0)
    distill.run(trainer, teacher)
    assert distill.student_trainer.global_step == len(train) + len(unlabelled)


def test_log_linear_prediction():
    from costaware.strategies.distill import log_linear_prediction

    points = [(100, 0.6), (1000, 0.7), (10000, 0.8)]
    assert log_linear_prediction(points, 100000) == pytest.approx(0.9)
    assert log_linear_prediction(points[:1], 1000) is None


def test_trainer_kwargs_may_not_replace_what_distill_sets():
    # A caller's callbacks would drop the student's meter and budget cap: refused at construction.
    with pytest.raises(ValueError, match="trainer_kwargs may not set callbacks"):
        Distill(nn.Linear(FEATURES, 2), trainer_kwargs={"callbacks": []})
    Distill(nn.Linear(FEATURES, 2), trainer_kwargs={"gradient_clip_val": 1.0})  # others pass through
