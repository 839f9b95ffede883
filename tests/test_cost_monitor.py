"""CostMonitor in real fits: logged keys, ledger, resume, bad input, no network."""

import warnings
from pathlib import Path

import pytest
import torch

from conftest import logged_to_tensorboard, make_clocked_model, make_crashing_model, make_monitor, make_trainer
from costaware.ledger import read_ledger
from costaware.report import build_report, summary_lines

_monitor, _trainer = make_monitor, make_trainer


def test_fit_logs_cost_everywhere(ns, tmp_path, clock):
    monitor = _monitor(ns, clock)
    trainer = _trainer(ns, tmp_path, [monitor])
    trainer.fit(make_clocked_model(ns.BoringModel, clock, step_s=2.0))
    t = monitor.totals
    # 10 steps x 2 s on the fake clock; host rented at $3.6/h -> $0.001/s.
    assert t.elapsed_s == pytest.approx(20.0)
    assert t.usd == pytest.approx(0.02)
    assert t.ram_energy_j == pytest.approx(3.0 * 20.0)
    assert 1.0 * 20.0 - 1e-6 <= t.cpu_energy_j <= 10.0 * 20.0 + 1e-6  # TDP x load model, 10-100% of TDP
    assert t.co2_kg == pytest.approx(t.kwh * 56.039 / 1000)  # France's grid
    assert t.train_batches == 10 and t.flops > 0
    for key in ("cost/usd", "cost/kwh", "cost/co2_kg", "cost/gpu_hours", "cost/flops"):
        assert key in trainer.callback_metrics, key  # monitorable
        assert key in trainer.logged_metrics, key  # reached the loggers too
    assert "cost/usd" in trainer.progress_bar_metrics
    for key in ("cost/elapsed_s", "throughput/batches_per_s", "throughput/flops_per_s", "host/cpu_power_w"):
        assert key in monitor.readings, key
        assert logged_to_tensorboard(tmp_path, key), key
    assert "throughput/mfu_pct" not in monitor.readings  # no peak known for a CPU
    ledger = read_ledger(monitor.ledger.path)
    assert monitor.ledger.path.parent.parent == tmp_path / "lightning_logs" / "version_0"
    assert ledger.header.schema == 2 and ledger.header.prices["usd_per_host_hour"] == 3.6
    assert ledger.header["accumulate_grad_batches"] == 1  # the report's plan counts batches per step
    assert ledger.end["how"] == "completed" and ledger.end["totals"]["usd"] == pytest.approx(0.02)
    assert len(ledger.samples) >= 5
    assert {m["name"] for m in ledger.metrics} >= {"val_loss"}  # validation metrics, priced
    assert not ledger.problems


def _evaluating_model(base, clock):
    """A clocked BoringModel whose validation, test and predict steps take 1 s each on the fake clock."""

    class Evaluates(type(make_clocked_model(base, clock))):
        def validation_step(self, batch, batch_idx):
            clock.advance(1.0)
            return super().validation_step(batch, batch_idx)

        def test_step(self, batch, batch_idx):
            clock.advance(1.0)
            return super().test_step(batch, batch_idx)

        def predict_step(self, batch, batch_idx, dataloader_idx=0):
            clock.advance(1.0)
            return super().predict_step(batch, batch_idx)

    return Evaluates()


def test_a_test_validate_or_predict_after_the_fit_is_metered_apart_and_reported(pl_ns, tmp_path, clock):
    """``trainer.fit(model); trainer.test(model)`` is how a Lightning run ends: the test's dollars are
    in the bill, so they are in the report, apart from the fit's totals (what the caps judged)."""
    monitor = _monitor(pl_ns, clock)
    trainer = _trainer(pl_ns, tmp_path, [monitor], max_steps=4, limit_test_batches=3, limit_predict_batches=2,
                       val_check_interval=4, num_sanity_val_steps=0)
    model = _evaluating_model(pl_ns.BoringModel, clock)
    trainer.validate(model, verbose=False)  # before any fit: no run to charge it to, nothing breaks
    assert monitor.ledger is None
    trainer.fit(model)
    fit_usd = monitor.totals.usd
    assert fit_usd == pytest.approx(0.004 + 0.002)  # 4 training steps and 2 validation batches, 1 s each
    trainer.validate(model, verbose=False)  # 2 batches
    trainer.test(model, verbose=False)  # 3
    trainer.predict(model)  # 2
    assert monitor.totals.usd == fit_usd  # the fit's totals stay as the fit ended

    ledger = read_ledger(monitor.ledger.path)
    assert not ledger.problems and ledger.end["totals"]["usd"] == pytest.approx(fit_usd)
    stages = [e for e in ledger.events if e.name == "stage_after_fit"]
    assert [e.stage for e in stages] == ["validate", "test", "predict"]
    assert [e.duration_s for e in stages] == pytest.approx([2.0, 3.0, 2.0])
    assert [e.usd for e in stages] == pytest.approx([0.002, 0.003, 0.002])  # $3.60 a host-hour
    assert all(e.kwh > 0 and e.co2_kg == pytest.approx(e.kwh * 56.039 / 1000) for e in stages)
    assert stages[-1].totals.usd == pytest.approx(fit_usd)

    report = build_report(monitor.ledger.path)
    rows = {r["phase"]: r for r in report["phases"]["rows"]}
    assert rows["trainer.test"]["usd"] == pytest.approx(0.003) and rows["trainer.test"]["after_fit"]
    assert report["phases"]["total_usd"] == pytest.approx(fit_usd + 0.007)
    summary = dict(line.split(": ", 1) for line in summary_lines(report))
    assert summary["Dollars"] == ("$0.006 (the fit; $0.013 with trainer.validate, trainer.test, trainer.predict "
                                  "after it)")
    assert "trainer.test after the fit: $0.003 in 3 s" in (monitor.ledger.path.parent / "report.md").read_text()


def test_a_test_after_the_fit_is_metered_by_the_callback_that_metered_the_fit(pl_ns, tmp_path, clock):
    cap = pl_ns.costaware.BudgetCap(max_usd=1.0, usd_per_host_hour=3.6, monitor_kwargs={"cpu_tdp_w": 10})
    cap.own_meter.clock = clock
    trainer = _trainer(pl_ns, tmp_path, [cap], max_steps=4, limit_test_batches=3)
    model = _evaluating_model(pl_ns.BoringModel, clock)
    trainer.fit(model)
    trainer.test(model, verbose=False)
    stages = [e for e in read_ledger(cap.own_meter.ledger.path).events if e.name == "stage_after_fit"]
    assert [(e.stage, e.usd) for e in stages] == [("test", pytest.approx(0.003))]


def test_a_test_that_fails_after_the_fit_keeps_what_it_spent(pl_ns, tmp_path, clock):
    monitor = _monitor(pl_ns, clock)
    trainer = _trainer(pl_ns, tmp_path, [monitor], max_steps=4, limit_test_batches=3)
    model = _evaluating_model(pl_ns.BoringModel, clock)
    trainer.fit(model)

    def fails(batch, batch_idx):
        clock.advance(5.0)
        raise RuntimeError("test boom")

    model.test_step = fails
    with pytest.raises(RuntimeError, match="test boom"):
        trainer.test(model, verbose=False)
    contents = read_ledger(monitor.ledger.path)
    stages = [e for e in contents.events if e.name == "stage_after_fit"]
    assert [(e.stage, e.duration_s) for e in stages] == [("test", pytest.approx(5.0))]
    assert contents.end["how"] == "completed" and not contents.problems  # the fit ended as it did
    trainer.test(_evaluating_model(pl_ns.BoringModel, clock), verbose=False)  # the meter works again
    assert len([e for e in read_ledger(monitor.ledger.path).events if e.name == "stage_after_fit"]) == 2


def test_a_test_in_a_process_that_ran_no_fit_goes_to_the_run_that_saved_the_checkpoint(pl_ns, tmp_path, clock):
    """LightningCLI's ``fit``, then ``test --ckpt_path=...`` in a new process: the test is the fit's run's."""
    ckpt = pl_ns.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fitted = _monitor(pl_ns, clock)
    _trainer(pl_ns, tmp_path, [fitted, ckpt], max_steps=4).fit(_evaluating_model(pl_ns.BoringModel, clock))
    ledger_path = fitted.ledger.path

    later = _monitor(pl_ns, clock)  # a new process: a new monitor, a new Trainer, no fit
    trainer = _trainer(pl_ns, tmp_path / "test_run", [later], limit_test_batches=3)
    trainer.test(_evaluating_model(pl_ns.BoringModel, clock), ckpt_path=tmp_path / "ckpt" / "last.ckpt",
                 verbose=False)
    trainer.validate(_evaluating_model(pl_ns.BoringModel, clock), ckpt_path=tmp_path / "ckpt" / "last.ckpt",
                     verbose=False)
    contents = read_ledger(ledger_path)
    stages = [e for e in contents.events if e.name == "stage_after_fit"]
    assert [(e.stage, e.usd) for e in stages] == [("test", pytest.approx(0.003)), ("validate", pytest.approx(0.002))]
    assert stages[0].totals.usd == pytest.approx(contents.end["totals"]["usd"]) and not contents.problems
    assert "trainer.test after the fit" in (ledger_path.parent / "report.md").read_text()
    assert later.ledger is None  # no ledger of its own

    # A checkpoint of a fit without costaware, or one whose run's ledger is gone: nothing metered, nothing breaks.
    plain = _trainer(pl_ns, tmp_path / "plain", [], max_steps=1, enable_checkpointing=False)
    plain.fit(pl_ns.BoringModel())
    plain.save_checkpoint(tmp_path / "plain.ckpt")
    moved = ledger_path.rename(ledger_path.with_suffix(".moved"))
    for path in (tmp_path / "plain.ckpt", tmp_path / "ckpt" / "last.ckpt"):
        _trainer(pl_ns, tmp_path / "test_run", [_monitor(pl_ns, clock)], limit_test_batches=1).test(
            _evaluating_model(pl_ns.BoringModel, clock), ckpt_path=path, verbose=False)
    assert not ledger_path.exists() and len(read_ledger(moved).events) == len(contents.events)


def test_a_cap_metering_alone_charges_a_test_from_its_checkpoint_to_its_run(pl_ns, tmp_path, clock):
    """``callbacks/budget.yaml`` alone: BudgetCap meters the fit, and later the CLI's ``test --ckpt_path``."""
    def cap():
        made = pl_ns.costaware.BudgetCap(max_usd=1.0, usd_per_host_hour=3.6, monitor_kwargs={"cpu_tdp_w": 10})
        made.own_meter.clock = clock
        return made

    ckpt = pl_ns.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fitted = cap()
    _trainer(pl_ns, tmp_path, [fitted, ckpt], max_steps=4).fit(_evaluating_model(pl_ns.BoringModel, clock))
    later = cap()
    _trainer(pl_ns, tmp_path / "test_run", [later], limit_test_batches=3).test(
        _evaluating_model(pl_ns.BoringModel, clock), ckpt_path=tmp_path / "ckpt" / "last.ckpt", verbose=False)
    stages = [e for e in read_ledger(fitted.own_meter.ledger.path).events if e.name == "stage_after_fit"]
    assert [(e.stage, e.usd) for e in stages] == [("test", pytest.approx(0.003))]
    assert later.own_meter.ledger is None


def test_a_fit_after_a_validate_from_a_checkpoint_is_a_new_run(pl_ns, tmp_path, clock):
    """Validate a checkpoint, then fine-tune from it: Lightning 2.6 restores callback state for the validate
    too, and the fit (no ``ckpt_path``) must not continue the checkpoint's run or its decisions."""
    ckpt = pl_ns.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = _monitor(pl_ns, clock)
    stopping = pl_ns.costaware.MarginalGainStopping(monitor="val_loss", mode="min", usd_per_point=1e-6)
    _trainer(pl_ns, tmp_path / "a", [first, stopping, ckpt], max_steps=10).fit(
        make_clocked_model(pl_ns.BoringModel, clock))
    assert len(stopping.policy.state_dict()["metrics"]) == 2

    monitor = _monitor(pl_ns, clock)
    stopping = pl_ns.costaware.MarginalGainStopping(monitor="val_loss", mode="min", usd_per_point=1e-6)
    trainer = _trainer(pl_ns, tmp_path / "b", [monitor, stopping], max_steps=5)
    model = make_clocked_model(pl_ns.BoringModel, clock)
    trainer.validate(model, ckpt_path=tmp_path / "ckpt" / "last.ckpt", verbose=False)
    trainer.fit(model)
    assert monitor.totals.usd == pytest.approx(0.005) and monitor.ledger.run_id != first.ledger.run_id
    assert read_ledger(monitor.ledger.path).header.resumed_from is None
    assert len(stopping.policy.state_dict()["metrics"]) == 1  # this fit's one validation, not the first run's


def test_early_stopping_and_checkpoint_monitor_cost(ns, tmp_path, clock):
    monitor = _monitor(ns, clock)
    stop = ns.callbacks.EarlyStopping(monitor="cost/usd", mode="max", stopping_threshold=0.006, patience=1000)
    ckpt = ns.callbacks.ModelCheckpoint(monitor="cost/usd", mode="min", save_top_k=1)
    trainer = _trainer(ns, tmp_path, [monitor, stop, ckpt], max_steps=100, val_check_interval=2,
                       limit_train_batches=4, limit_val_batches=1)
    trainer.fit(make_clocked_model(ns.BoringModel, clock, step_s=1.0))
    assert trainer.global_step < 100  # stopped by the cost threshold
    assert monitor.totals.usd >= 0.006
    assert ckpt.best_model_path and ckpt.best_model_score is not None


def test_resume_continues_totals(ns, tmp_path, clock):
    model_cls = ns.BoringModel
    first = _monitor(ns, clock)
    ckpt = ns.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=4)
    trainer = _trainer(ns, tmp_path, [first, ckpt], max_steps=8, limit_val_batches=0)
    trainer.fit(make_clocked_model(model_cls, clock, step_s=1.0))
    assert first.totals.elapsed_s == pytest.approx(8.0)
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["callbacks"]["CostMonitor"]
    assert state["totals"]["elapsed_s"] == pytest.approx(8.0)

    second = _monitor(ns, clock)
    trainer = _trainer(ns, tmp_path, [second], max_steps=12, limit_val_batches=0)
    trainer.fit(make_clocked_model(model_cls, clock, step_s=1.0), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    # 8 s before the checkpoint, 4 more steps after: never reset, never counted twice.
    assert second.totals.elapsed_s == pytest.approx(12.0)
    assert second.totals.usd == pytest.approx(12.0 * 0.001)
    assert second.ledger.run_id == first.ledger.run_id
    header = read_ledger(second.ledger.path).header
    assert header["resumed_from"]["checkpoint_usd"] == pytest.approx(0.008)


def _restoring_after_fit_start(ns):
    """A CPU strategy that restores a checkpoint after ``on_fit_start``, as FSDP and DeepSpeed do."""
    from importlib import import_module

    class LateRestore(import_module(f"{ns.name}.strategies").SingleDeviceStrategy):
        @property
        def restore_checkpoint_after_setup(self) -> bool:
            return True

    return LateRestore(device="cpu")


@pytest.mark.parametrize("until", [12, 8])
def test_resume_under_a_strategy_that_restores_after_fit_start(ns, tmp_path, clock, until):
    """FSDP and DeepSpeed hand callbacks their checkpointed state only after on_fit_start: the ledger's
    header, the caps and the policy are recorded once it is there (until=8: the checkpoint is at max_steps
    already, so no training starts, and the ledger is still whole)."""
    first = _monitor(ns, clock)
    ckpt = ns.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=4)
    trainer = _trainer(ns, tmp_path, [first, ckpt], max_steps=8, val_check_interval=4)
    trainer.fit(make_clocked_model(ns.BoringModel, clock, step_s=1.0))

    monitor = _monitor(ns, clock)
    cap = ns.costaware.BudgetCap(max_usd=100.0)
    policy = ns.costaware.MarginalGainStopping(monitor="val_loss", mode="min", usd_per_point=1.0, min_points=50)
    trainer = _trainer(ns, tmp_path, [monitor, cap, policy], max_steps=until, val_check_interval=4,
                       strategy=_restoring_after_fit_start(ns))
    trainer.fit(make_clocked_model(ns.BoringModel, clock, step_s=1.0), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert monitor.totals.elapsed_s == pytest.approx(until)
    contents = read_ledger(monitor.ledger.path)
    assert contents.header["resumed_from"]["checkpoint_usd"] == pytest.approx(0.008)
    assert contents.end is not None and contents.end.totals.elapsed_s == pytest.approx(until)
    kinds = [e.NAME for e in contents.events]
    assert kinds.count("budget_caps") == 1, contents.events
    assert kinds.count("marginal_gain_policy") == 1, kinds


def test_resume_keeps_cost_spent_after_the_checkpoint(pl_ns, tmp_path, clock):
    """A run killed after its last checkpoint paid for those steps: its ledger says so."""
    ns = pl_ns
    first = _monitor(ns, clock, flush_interval_s=0.0)
    ckpt = ns.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=4,
                                        save_on_train_epoch_end=False)
    trainer = _trainer(ns, tmp_path, [first, ckpt], max_steps=10, limit_val_batches=0)
    trainer.fit(make_clocked_model(ns.BoringModel, clock, step_s=1.0))
    # last.ckpt was written at step 8; the run went on to step 10 (as if killed then).
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert state["global_step"] == 8
    second = _monitor(ns, clock)
    trainer = _trainer(ns, tmp_path, [second], max_steps=12, limit_val_batches=0)
    trainer.fit(make_clocked_model(ns.BoringModel, clock, step_s=1.0), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert second.totals.elapsed_s == pytest.approx(10.0 + 4.0)


def test_an_unpriced_resume_keeps_the_time_spent_after_the_checkpoint(pl_ns, tmp_path, clock):
    """The same with nothing priced ($0 throughout): the ledger's later time, energy and batches
    still count (the run went on, though its dollars did not grow)."""
    ns = pl_ns
    first = _monitor(ns, clock, flush_interval_s=0.0, usd_per_host_hour=0.0)
    ckpt = ns.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=4,
                                        save_on_train_epoch_end=False)
    with pytest.warns(RuntimeWarning, match="no price applies"):
        trainer = _trainer(ns, tmp_path, [first, ckpt], max_steps=10, limit_val_batches=0)
        trainer.fit(make_clocked_model(ns.BoringModel, clock, step_s=1.0))
    second = _monitor(ns, clock, usd_per_host_hour=0.0)
    trainer = _trainer(ns, tmp_path, [second], max_steps=12, limit_val_batches=0)
    with pytest.warns(RuntimeWarning, match="no price applies"):
        trainer.fit(make_clocked_model(ns.BoringModel, clock, step_s=1.0), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert second.totals.usd == 0.0 and second.totals.elapsed_s == pytest.approx(10.0 + 4.0)
    assert second.totals.train_batches == 10 + 4  # steps 9-10 were paid for twice


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"usd_per_gpu_hour": -1.0}, "usd_per_gpu_hour must be >= 0"),
        ({"usd_per_host_hour": "cheap"}, "usd_per_host_hour must be a finite number"),
        ({"usd_per_kwh": float("nan")}, "usd_per_kwh must be a finite number"),
        ({"gpu": "RTX 9999"}, r"no default price for GPU 'RTX 9999' \(known models: H100-SXM.*usd_per_gpu_hour="),
        ({"country": "Atlantis"}, "unknown country 'Atlantis'"),
        ({"pue": 0.9}, "pue must be >= 1.0"),
        ({"mode": "free"}, r"mode must be one of \('cloud', 'on_prem'\)"),
        ({"mode": "on_prem"}, "needs usd_per_kwh"),
        ({"cloud_provider": "gcp", "cloud_region": "mars-1"}, "unknown cloud_region 'mars-1'"),
        ({"sample_interval_s": 0}, "sample_interval_s must be >= 0.001"),
    ],
)
def test_bad_input_fails_at_construction(ns, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ns.costaware.CostMonitor(**kwargs)


def test_unknown_detected_gpu_without_price_fails_before_training(pl_ns, tmp_path, clock, monkeypatch):
    import sys

    from fake_nvml import FakeGPU, FakeNVML

    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML([FakeGPU(name="NVIDIA RTX PRO 6000")], clock))
    model = make_clocked_model(pl_ns.BoringModel, clock)
    trainer = _trainer(pl_ns, tmp_path, [_monitor(pl_ns, clock, nvml_index=0)])
    with pytest.raises(ValueError, match="no default price for GPU 'NVIDIA RTX PRO 6000'"):
        trainer.fit(model)
    assert trainer.global_step == 0


def test_a_gpu_nvml_cannot_name_is_measured_and_priced_at_zero_with_a_warning(pl_ns, tmp_path, clock, monkeypatch):
    import sys

    from fake_nvml import FakeGPU, FakeNVML

    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML([FakeGPU(failures={"name": 1})], clock))
    monitor = _monitor(pl_ns, clock, nvml_index=0)
    trainer = _trainer(pl_ns, tmp_path, [monitor])
    with pytest.warns(RuntimeWarning, match="could not name this GPU"):
        trainer.fit(make_clocked_model(pl_ns.BoringModel, clock))  # a meter fault must not stop training
    assert trainer.global_step == 10
    assert monitor.totals.gpu_hours > 0 and monitor.totals.gpu_energy_j > 0


def test_fit_makes_no_network_call(pl_ns, tmp_path, no_network):
    monitor = pl_ns.costaware.CostMonitor(usd_per_host_hour=1.0, country="USA", sample_interval_s=0.05)
    trainer = _trainer(pl_ns, tmp_path, [monitor], max_steps=20)
    trainer.fit(pl_ns.BoringModel())  # real codecarbon host meter, real clock
    assert no_network == []
    assert monitor.totals.usd > 0


def test_ledger_is_readable_after_a_crash(pl_ns, tmp_path, clock):
    monitor = _monitor(pl_ns, clock)
    trainer = _trainer(pl_ns, tmp_path, [monitor])
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(make_crashing_model(pl_ns.BoringModel, clock))
    ledger = read_ledger(monitor.ledger.path)
    assert ledger.end.how == "crashed"
    assert ledger.end["totals"]["elapsed_s"] == pytest.approx(7.0)
    assert any(e["name"] == "exception" and "boom" in e["error"] for e in ledger.events)


def test_truncated_ledger_line_is_tolerated(pl_ns, tmp_path, clock):
    monitor = _monitor(pl_ns, clock)
    _trainer(pl_ns, tmp_path, [monitor]).fit(make_clocked_model(pl_ns.BoringModel, clock))
    path = monitor.ledger.path
    text = path.read_text()
    path.write_text(text[: len(text) - 25])  # the process died mid-write
    ledger = read_ledger(path)
    assert ledger.problems and "truncated last line" in ledger.problems[0]
    assert ledger.totals.usd > 0
    lines = text.splitlines()
    path.write_text("\n".join(lines[:2] + ["{not json"] + lines[2:]) + "\n")
    assert "corrupt line" in read_ledger(path).problems[0]


def test_each_callback_is_one_class_for_both_namespaces():
    """One class per callback, a Callback of each installed namespace, found where LightningCLI looks."""
    import lightning.pytorch as L
    import pytorch_lightning as pl

    import costaware
    import costaware.lightning

    for name in ("CostMonitor", "BudgetCap", "MarginalGainStopping", "OnlineProbe"):
        cls = getattr(costaware, name)
        assert issubclass(cls, pl.Callback) and issubclass(cls, L.Callback)
        assert getattr(costaware.lightning, name) is cls is getattr(costaware.callbacks, name)
    assert costaware.CostMonitor(usd_per_host_hour=1).state_key == "CostMonitor"


def test_metric_points_are_priced_at_the_moment_of_validation(pl_ns, tmp_path, clock):
    monitor = _monitor(pl_ns, clock)
    trainer = _trainer(pl_ns, tmp_path, [monitor], log_every_n_steps=50)  # no log step before validation
    trainer.fit(make_clocked_model(pl_ns.BoringModel, clock, step_s=2.0))
    points = [m for m in read_ledger(monitor.ledger.path).metrics if m["name"] == "val_loss"]
    # Validations after 5 and 10 steps of 2 s at $0.001/s (plus the validation's own time).
    assert len(points) == 2 and points[0]["usd"] >= 0.01 and points[1]["usd"] >= 0.02


def test_runs_sharing_a_log_dir_keep_separate_ledgers(pl_ns, tmp_path, clock):
    ledgers = []
    for _ in range(2):
        monitor = _monitor(pl_ns, clock)
        trainer = _trainer(pl_ns, tmp_path, [monitor], logger=False, max_steps=2, limit_val_batches=0)
        if ledgers:
            with pytest.warns(RuntimeWarning, match="another run's ledger"):
                trainer.fit(make_clocked_model(pl_ns.BoringModel, clock))
        else:
            trainer.fit(make_clocked_model(pl_ns.BoringModel, clock))
        ledgers.append(monitor.ledger.path)
    assert ledgers[0] == tmp_path / "costaware" / "ledger.jsonl"
    assert ledgers[1].parent.parent == tmp_path / "costaware" and ledgers[1] != ledgers[0]
    for path in ledgers:
        contents = read_ledger(path)
        assert not contents.problems and not [e for e in contents.events if e["name"] == "resumed"]
        assert (path.parent / "report.html").is_file()


def test_a_tuners_trial_steps_are_counted_in_the_fit_that_follows_in_one_ledger(ns, tmp_path, clock):
    """Lightning's Tuner ends its lr_find fit before training starts, after trial steps run with the callbacks
    swapped out and the model restored. That fit once left a ledger holding an end record alone, and the real
    fit then warned of "another run's ledger", wrote to a folder named by run id and said it was resumed."""
    tuner_module = __import__(f"{ns.name}.tuner", fromlist=["Tuner"])
    monitor = _monitor(ns, clock)
    trainer = _trainer(ns, tmp_path, [monitor], max_steps=6, limit_val_batches=0)
    model = make_clocked_model(ns.BoringModel, clock, step_s=1.0)
    model.lr = 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "another run's ledger"
        tuner_module.Tuner(trainer).lr_find(model, num_training=20, early_stop_threshold=None)
        assert not (tmp_path / "costaware").exists() or not list((tmp_path / "costaware").rglob("ledger.jsonl"))
        trainer.fit(model)
    path = monitor.ledger.path
    assert path == Path(trainer.log_dir) / "costaware" / "ledger.jsonl"
    assert list(tmp_path.rglob("ledger.jsonl")) == [path]
    contents = read_ledger(path)
    assert not contents.problems and contents.header.resumed_from is None and contents.end.how == "completed"
    # 20 trial steps and 6 of the fit, a second each on the fake clock, at $0.001/s: the trial's are counted.
    assert contents.end.totals.elapsed_s >= 26.0 and contents.end.totals.usd == pytest.approx(0.026, rel=0.05)
    assert contents.end.totals.train_batches == 6
    assert contents.end.phases["tuning"]["elapsed_s"] == pytest.approx(20.0, abs=0.5)  # the report's own row
    rows = {r["phase"]: r for r in build_report(path)["phases"]["rows"]}
    assert rows["tuning"]["usd"] == pytest.approx(0.020, rel=0.05) and rows["training"]["usd"] >= 0.006 - 1e-9


@pytest.mark.parametrize("finder_first", [True, False])
@pytest.mark.parametrize("tuner", ["lr", "batch_size"])
def test_a_tuner_callback_is_no_resume_and_its_trials_are_tuning(ns, tmp_path, clock, tuner, finder_first):
    """LearningRateFinder and BatchSizeFinder search at the fit's start, saving and restoring the model (and the
    callbacks' state) within the fit: the run's header once said it resumed from a checkpoint of itself, and the
    trial steps (run with every callback removed) were charged to the save that preceded them, as checkpointing."""
    monitor = _monitor(ns, clock)
    if tuner == "lr":
        finder = ns.callbacks.LearningRateFinder(num_training_steps=10, early_stop_threshold=None)
    else:
        finder = ns.callbacks.BatchSizeFinder(steps_per_trial=5, max_trials=2)  # 2 trials of 5 steps
    callbacks = [finder, monitor] if finder_first else [monitor, finder]
    trainer = _trainer(ns, tmp_path, callbacks, max_steps=6, limit_val_batches=0)
    model = make_clocked_model(ns.BoringModel, clock, step_s=1.0)
    model.lr, model.batch_size = 0.1, 2
    if tuner == "batch_size":
        dataset = __import__(f"{ns.name}.demos.boring_classes", fromlist=["RandomDataset"]).RandomDataset(32, 64)
        model.train_dataloader = lambda: torch.utils.data.DataLoader(dataset, model.batch_size)
    trainer.fit(model)
    contents = read_ledger(monitor.ledger.path)
    assert contents.header.resumed_from is None and not [e for e in contents.events if e["name"] == "resumed"]
    assert not contents.problems and contents.end.totals.elapsed_s >= 16.0  # the search's 10 steps and the fit's 6
    phases = contents.end.phases
    assert phases["tuning"]["elapsed_s"] == pytest.approx(10.0, abs=0.5) and phases["checkpointing"]["elapsed_s"] < 1


@pytest.mark.parametrize("stopper", ["early_stopping", "max_time", None, "none, max_epochs"])
def test_the_report_names_who_stopped_a_fit_that_did_not_run_its_plan(ns, tmp_path, clock, stopper):
    """Lightning's EarlyStopping or max_time ends a fit as "completed": the report once said "ended: completed"
    for a run stopped at its first validation, with nothing "not spent by stopping"."""
    monitor = _monitor(ns, clock)
    callbacks, kwargs = [monitor], {}
    if stopper == "early_stopping":
        callbacks.append(ns.callbacks.EarlyStopping(monitor="val_loss", mode="min", stopping_threshold=1e9))
    elif stopper == "max_time":
        kwargs["max_time"] = {"seconds": 0}
    elif stopper == "none, max_epochs":
        kwargs.update(max_steps=-1, max_epochs=2, limit_train_batches=5)
    kwargs = {"max_steps": 10, **kwargs}
    trainer = _trainer(ns, tmp_path, callbacks, val_check_interval=5, **kwargs)
    trainer.fit(make_clocked_model(ns.BoringModel, clock, step_s=1.0))
    contents = read_ledger(monitor.ledger.path)
    report = build_report(monitor.ledger.path)
    assert contents.end.how == "completed" and report["outcome"]["how"] == "completed"
    if stopper is None or stopper == "none, max_epochs":  # ran its plan: nothing left unspent
        plan = "max_steps" if stopper is None else "max_epochs"
        assert contents.end.stopped_by is None and report["outcome"]["why"] == f"completed: {plan} reached"
        assert report["planned"]["usd_not_spent"] == 0.0 and report["planned"]["fraction_done"] == 1.0
        return
    assert trainer.global_step < 10
    expected = "EarlyStopping(monitor='val_loss') at epoch 0: " if stopper == "early_stopping" else "max_time"
    assert contents.end.stopped_by.startswith(expected)
    assert report["outcome"]["why"] == f"stopped early by {contents.end.stopped_by}"
    if stopper == "early_stopping":  # stopped at its first validation, 5 of 10 steps: the rest not spent
        assert "Stopping threshold reached" in contents.end.stopped_by and report["planned"]["usd_not_spent"] > 0
        from costaware.report.compare import compare_runs, table_rows

        (group,) = compare_runs([monitor.ledger.path], metric="val_loss", mode="min")["groups"]
        assert "stopped early by EarlyStopping" in str(table_rows(group)[1])  # costaware compare's note


def test_a_second_fit_continues_the_run(pl_ns, tmp_path, clock):
    monitor = _monitor(pl_ns, clock)
    trainer = _trainer(pl_ns, tmp_path, [monitor], max_steps=2, limit_val_batches=0)
    model = make_clocked_model(pl_ns.BoringModel, clock, step_s=1.0)
    trainer.fit(model)
    first = monitor.totals
    trainer.fit_loop.epoch_loop.max_steps = 4
    trainer.fit(model)
    assert monitor.totals.usd > first.usd and monitor.totals.train_batches == first.train_batches + 2


def test_a_tuner_between_two_fits_keeps_the_run_going(pl_ns, tmp_path, clock):
    """fit, then Tuner.lr_find, then fit on: one run in one ledger, the trial's steps counted in its totals."""
    from pytorch_lightning.tuner import Tuner

    monitor = _monitor(pl_ns, clock)
    trainer = _trainer(pl_ns, tmp_path, [monitor], max_steps=2, limit_val_batches=0)
    model = make_clocked_model(pl_ns.BoringModel, clock, step_s=1.0)
    model.lr = 0.1
    trainer.fit(model)
    run_id, path = monitor.meter.ledger.run_id, monitor.ledger.path
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        Tuner(trainer).lr_find(model, num_training=10, early_stop_threshold=None)
        trainer.fit_loop.epoch_loop.max_steps = 4
        trainer.fit(model)
    assert monitor.ledger.path == path and monitor.meter.ledger.run_id == run_id
    contents = read_ledger(path)
    assert not contents.problems and contents.end.totals.train_batches == 4
    assert contents.end.totals.usd == pytest.approx(0.001 * (2 + 10 + 2), rel=0.05)  # both fits and the trial
    assert contents.end.phases["tuning"]["usd"] == pytest.approx(0.010, rel=0.05)


def test_ledger_write_failure_keeps_the_records(tmp_path):
    from costaware.ledger import Ledger, Totals
    from costaware.records import End, ForecastEvent, Header, RecordedTotals

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    ledger = Ledger(blocker / "ledger.jsonl")
    with pytest.warns(RuntimeWarning, match="could not write the ledger"):
        ledger.record(Header(precision="first"))
    ledger.record(ForecastEvent(forecast_usd=1.0))  # warned once only
    ledger.path = tmp_path / "ok" / "ledger.jsonl"
    ledger.record(End(totals=RecordedTotals.of(Totals(usd=2.0)), how="completed"))
    contents = read_ledger(ledger.path)
    assert contents.header.precision == "first" and contents.events[0].forecast_usd == 1.0
    assert contents.end.totals.usd == 2.0 and ledger.closed


def test_ddp_estimate_between_syncs_scales_gpu_by_ranks_and_host_by_nodes(pl_ns):
    """current_totals under DDP (2 ranks, 1 node): resumed spend counted once, host not doubled."""
    from costaware.ledger import Totals

    monitor = _monitor(pl_ns, usd_per_gpu_hour=3.6, gpu="A100")  # $0.001/GPU-s, $0.001/host-s
    session = {"elapsed_s": 0.0, "gpu_hours": 0.0, "host_hours": 0.0, "gpu_energy_j": 0.0, "cpu_energy_j": 0.0,
               "ram_energy_j": 0.0, "flops": 0.0, "usd": 0.0, "co2_kg": 0.0, "train_batches": 0.0}
    monitor = monitor.meter
    monitor._read_session = lambda: dict(session)
    monitor._world_size, monitor._num_nodes, monitor._counts_host = 2, 1, 1
    monitor._base = Totals(elapsed_s=100.0, usd=7.0, train_batches=50.0)  # from the checkpoint
    monitor._totals = monitor._mine_at_refresh = monitor._base  # as open_ledger leaves them
    assert monitor.current_totals().usd == pytest.approx(7.0)  # not 7 x (1 + 2)
    # This rank (local rank 0: it holds the host) runs 10 s on its GPU.
    session.update(elapsed_s=10.0, gpu_hours=10 / 3600, host_hours=10 / 3600, train_batches=5.0)
    now = monitor.current_totals()
    assert now.gpu_hours == pytest.approx(20 / 3600) and now.host_hours == pytest.approx(10 / 3600)
    assert now.usd == pytest.approx(7.0 + 0.02 + 0.01) and now.train_batches == 60.0
    # A rank that does not hold the host extrapolates the run's host spend from elapsed time.
    monitor._counts_host = 0
    session.update(host_hours=0.0)
    assert monitor.current_totals().host_hours == pytest.approx(10 / 3600)


def test_a_monitor_without_any_price_says_once_that_dollars_are_not_priced(pl_ns, tmp_path, clock):
    monitor = _monitor(pl_ns, clock, usd_per_host_hour=0.0)
    trainer = _trainer(pl_ns, tmp_path, [monitor], max_steps=2, limit_val_batches=0)
    with pytest.warns(RuntimeWarning, match=r"no price applies.*usd_per_host_hour.*"
                                            r"--trainer.callbacks.init_args.usd_per_host_hour") as record:
        trainer.fit(make_clocked_model(pl_ns.BoringModel, clock))
        trainer.fit_loop.epoch_loop.max_steps = 4
        trainer.fit(make_clocked_model(pl_ns.BoringModel, clock))  # a second fit: no second warning
    assert sum("no price applies" in str(w.message) for w in record) == 1
    assert monitor.totals.kwh > 0 and monitor.totals.usd == 0.0  # energy is still measured


def test_the_progress_bar_shows_small_dollar_amounts_readably():
    """TQDM (Lightning's default bar) formats floats to 3 significant digits: $0.00123 is not 0.000."""
    from pytorch_lightning.callbacks.progress.tqdm_progress import Tqdm

    assert Tqdm.format_num(0.0012345) == "0.00123"
    assert Tqdm.format_num(1.234e-5) == "1.23e-5"


class _RunsOnLoad:
    """An object whose unpickling would write a file: what a checkpoint from an untrusted source may hold."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "ran"))


def test_the_run_of_a_checkpoint_is_read_without_running_anything_in_it(tmp_path):
    from costaware.after_fit import run_of_checkpoint

    marker = tmp_path / "ran.txt"
    ledger = tmp_path / "ledger.jsonl"
    ledger.write_text('{"kind": "header", "schema": 2, "run_id": "r1"}\n')
    state = {"callbacks": {"CostMonitor": {"run_id": "r1", "ledger_path": str(ledger)}}}
    torch.save(state, tmp_path / "plain.ckpt")
    assert run_of_checkpoint(tmp_path / "plain.ckpt")[:2] == (ledger, "r1")
    torch.save({**state, "hyper_parameters": _RunsOnLoad(marker)}, tmp_path / "object.ckpt")
    assert run_of_checkpoint(tmp_path / "object.ckpt") is None and not marker.exists()
    assert run_of_checkpoint(tmp_path / "missing.ckpt") is None and run_of_checkpoint(None) is None
