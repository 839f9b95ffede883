"""BudgetCap in real fits: exact stop steps on a fake clock, reserves, resume, DDP, CLI, bad input.

Costs are deterministic: the monitor's clock is a fake one advanced inside ``training_step``
(and ``validation_step``, ``on_save_checkpoint``), the host is rented at $3.6/h ($0.001 per fake
second), RAM draws 3600 W with the CPU at 0 W (0.001 kWh per fake second, and 0.001 kg CO2 at
1000 g/kWh), the meters are sampled right after each advance, and FLOPs are declared by the model.
So one training step of 1 s costs 1 unit of everything: $0.001, 0.001 kWh, 0.001 kg, 1 s, 100 FLOPs.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import threading
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from costaware.callbacks.budget_cap import BudgetExceededError, BudgetWarning
from costaware.ledger import read_ledger
from costaware.meter import CostMeter
from fake_nvml import FakeClock, FakeGPU, FakeNVML

REPO = Path(__file__).resolve().parent.parent


class SampledClock(FakeClock):
    """A fake clock that has the monitor's meters read right after every advance."""

    monitor = None

    def advance(self, seconds: float) -> None:
        super().advance(seconds)
        sampler = getattr(getattr(self.monitor, "meter", self.monitor), "_sampler", None)
        if sampler is not None:
            sampler.sample_now()


@pytest.fixture
def sclock():
    return SampledClock()


def _monitor(ns, clock, **kwargs):
    kwargs = {"usd_per_host_hour": 3.6, "cpu_tdp_w": 0, "ram_power_w": 3600, "g_co2_per_kwh": 1000,
              "sample_interval_s": 1000, **kwargs}
    monitor = ns.costaware.CostMonitor(**kwargs)
    monitor.meter.clock = clock
    clock.monitor = monitor
    return monitor


def _model(ns, clock, step_s=1.0, val_batch_s=0.0, save_s=0.0, flops_per_batch=100.0, pattern=None):
    """A BoringModel whose steps, validation batches and checkpoint saves take fake time."""

    class Model(ns.BoringModel):
        def __init__(self):
            super().__init__()
            self.flops_per_batch = flops_per_batch
            self.batches = 0

        def training_step(self, batch, batch_idx):
            clock.advance(pattern[self.batches % len(pattern)] if pattern else step_s)
            self.batches += 1
            return super().training_step(batch, batch_idx)

        def validation_step(self, batch, batch_idx):
            clock.advance(val_batch_s)
            out = super().validation_step(batch, batch_idx)
            self.log("val_loss", out["x"])
            return out

        def on_save_checkpoint(self, checkpoint):
            clock.advance(save_s)

    return Model()


def _trainer(ns, tmp_path, callbacks, **kwargs):
    kwargs = {"max_steps": 100, "limit_val_batches": 0, "log_every_n_steps": 5, "enable_progress_bar": False,
              "enable_model_summary": False, "default_root_dir": tmp_path, **kwargs}
    return ns.Trainer(callbacks=callbacks, **kwargs)


def _events(monitor, name):
    return [e for e in read_ledger(monitor.ledger.path).events if e["name"] == name]


# ---------------------------------------------------------------------------------------------
# Exact stop points
# ---------------------------------------------------------------------------------------------


CAPS = {
    "max_usd": (0.0105, "usd", 0.001),
    "max_kwh": (0.0105, "kwh", 0.001),
    "max_co2_kg": (0.0105, "co2_kg", 0.001),
    "max_gpu_hours": (10.5 / 3600, "gpu_hours", 1 / 3600),
    "max_flops": (1050.0, "flops", 100.0),
    "max_time": (10.5, "elapsed_s", 1.0),
}


@pytest.mark.parametrize("cap", list(CAPS))
def test_each_cap_stops_before_the_step_that_would_cross_it(pl_ns, tmp_path, sclock, monkeypatch, cap):
    ns = pl_ns
    limit, unit, per_step = CAPS[cap]
    extra = {}
    if cap == "max_gpu_hours":  # a (fake) GPU to hold
        monkeypatch.setitem(sys.modules, "pynvml", FakeNVML([FakeGPU()], sclock))
        extra = {"nvml_index": 0, "usd_per_gpu_hour": 0.0}
    monitor = _monitor(ns, sclock, **extra)
    budget = ns.costaware.BudgetCap(**{cap: limit})
    trainer = _trainer(ns, tmp_path, [monitor, budget])
    trainer.fit(_model(ns, sclock))
    # After 10 steps, 10 units spent; an 11th would reach 11 > 10.5: stop after step 10.
    assert trainer.global_step == 10
    assert getattr(monitor.totals, unit) == pytest.approx(10 * per_step)
    assert getattr(monitor.totals, unit) <= limit
    hit = _events(monitor, "budget_cap_hit")
    assert len(hit) == 1
    assert hit[0]["cap"] == cap and hit[0]["limit"] == pytest.approx(limit) and hit[0]["step"] == 10
    assert hit[0]["value"] == pytest.approx(10 * per_step)
    assert hit[0]["predicted_next"] == pytest.approx(11 * per_step, rel=1e-4)  # + a tiny checkpoint prior
    assert hit[0]["totals"][unit] == pytest.approx(10 * per_step)
    stop_ckpt = Path(hit[0]["checkpoint"])
    assert stop_ckpt == tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "budget_stop.ckpt"
    assert stop_ckpt.is_file()
    assert torch.load(stop_ckpt, weights_only=False)["global_step"] == 10


@pytest.mark.parametrize("cap", ["max_kwh", "max_co2_kg"])
def test_a_slow_cpu_detection_does_not_move_the_stop(pl_ns, tmp_path, sclock, monkeypatch, cap):
    """codecarbon still detecting the CPU during the first steps (a loaded machine): the given RAM
    power counts from the start, so no batch is charged a jump and the stop step stays exact."""
    from costaware import _codecarbon

    release, real_open = threading.Event(), _codecarbon.open_cpu

    def slow_open(*args):
        release.wait(10)
        return real_open(*args)

    monkeypatch.setattr(_codecarbon, "open_cpu", slow_open)
    limit, unit, per_step = CAPS[cap]
    monitor = _monitor(pl_ns, sclock)
    trainer = _trainer(pl_ns, tmp_path, [monitor, pl_ns.costaware.BudgetCap(**{cap: limit})])
    model = _model(pl_ns, sclock)
    real_step = model.training_step

    def step(batch, batch_idx):  # detection ends during step 5
        if batch_idx == 4:
            release.set()
            monitor.meter._sampler.meters[1]._opened.wait(10)
        return real_step(batch, batch_idx)

    model.training_step = step
    try:
        trainer.fit(model)
    finally:
        release.set()
    assert trainer.global_step == 10
    assert getattr(monitor.totals, unit) == pytest.approx(10 * per_step)


def test_max_time_as_timedelta_and_dict(pl_ns, tmp_path, sclock):
    for max_time in (timedelta(seconds=10.5), {"seconds": 10.5}):
        monitor = _monitor(pl_ns, sclock)
        trainer = _trainer(pl_ns, tmp_path, [monitor, pl_ns.costaware.BudgetCap(max_time=max_time)])
        trainer.fit(_model(pl_ns, sclock))
        assert trainer.global_step == 10 and monitor.totals.elapsed_s == 10.0


def test_reactive_mode_crosses_by_less_than_one_step(pl_ns, tmp_path, sclock):
    monitor = _monitor(pl_ns, sclock)
    trainer = _trainer(pl_ns, tmp_path, [monitor, pl_ns.costaware.BudgetCap(max_time=10.5, predictive=False)])
    trainer.fit(_model(pl_ns, sclock))
    assert trainer.global_step == 11 and monitor.totals.elapsed_s == 11.0


def test_whichever_cap_comes_first_stops(pl_ns, tmp_path, sclock):
    monitor = _monitor(pl_ns, sclock)
    budget = pl_ns.costaware.BudgetCap(max_usd=0.0205, max_flops=1e6, caps={"time": "00:00:00:08"})
    trainer = _trainer(pl_ns, tmp_path, [monitor, budget])
    trainer.fit(_model(pl_ns, sclock, step_s=0.9))
    # 0.9 s a step: 7.2 s after step 8, and a 9th would reach 8.1 s > 8 s; $0.0072 < $0.0205.
    assert trainer.global_step == 8
    assert [e["cap"] for e in _events(monitor, "budget_cap_hit")] == ["max_time"]


def test_lightning_namespace_works_the_same(tmp_path, sclock):
    import lightning.pytorch as L
    from lightning.pytorch.demos.boring_classes import BoringModel

    import costaware.lightning as cl
    from conftest import _namespace

    ns = _namespace("lightning.pytorch")
    assert ns.BoringModel is BoringModel
    monitor = _monitor(ns, sclock)
    trainer = _trainer(ns, tmp_path, [monitor, cl.BudgetCap(max_usd=0.0105)])
    assert isinstance(trainer, L.Trainer)
    trainer.fit(_model(ns, sclock))
    assert trainer.global_step == 10


# ---------------------------------------------------------------------------------------------
# Reserves and variable costs
# ---------------------------------------------------------------------------------------------


def test_final_validation_is_reserved_inside_the_budget(pl_ns, tmp_path, sclock):
    """Steps 1 s; a validation of 3 batches x 2 s = 6 s after every 10 steps and at the stop.

    The sanity check (2 batches) takes 4 s, steps 1-10 end at 14 s, validation to 20 s; after
    step k > 10 the clock is at k + 10, and going on costs 1 s + the final validation, reserved
    at 6 s + 20%: k + 18.2 > 29.9 first at k = 12, which ends at 22 s and validates to 28 s:
    within the cap. Without the reserve the run would stop at step 18 and end at 34 s. The first
    reserve, before a whole validation is measured, comes from the sanity check's batches.
    """
    monitor = _monitor(pl_ns, sclock)
    budget = pl_ns.costaware.BudgetCap(max_time=29.9)
    trainer = _trainer(pl_ns, tmp_path, [monitor, budget], limit_val_batches=3, val_check_interval=10,
                       enable_checkpointing=False)
    trainer.fit(_model(pl_ns, sclock, val_batch_s=2.0))
    assert trainer.global_step == 12
    assert monitor.totals.elapsed_s == pytest.approx(28.0)
    hit = _events(monitor, "budget_cap_hit")[0]
    assert hit["reserve"] == pytest.approx(7.2, abs=1e-3) and hit["predicted_next"] == pytest.approx(30.2, abs=1e-3)
    assert budget.planner.sanity_batch["elapsed_s"] == pytest.approx(2.0)
    assert budget.planner.validations.max()["elapsed_s"] == pytest.approx(6.0)


def test_reactive_mode_still_reserves_the_final_validation(pl_ns, tmp_path, sclock):
    """Reactive: stop once spent + the reserved final validation reaches the cap, k + 17.2 >= 29.9
    first at k = 13 (one step later than predictive), which validates to 29 s."""
    monitor = _monitor(pl_ns, sclock)
    trainer = _trainer(pl_ns, tmp_path, [monitor, pl_ns.costaware.BudgetCap(max_time=29.9, predictive=False)],
                       limit_val_batches=3, val_check_interval=10, enable_checkpointing=False)
    trainer.fit(_model(pl_ns, sclock, val_batch_s=2.0))
    assert trainer.global_step == 13 and monitor.totals.elapsed_s == pytest.approx(29.0)


def test_checkpoint_saves_are_measured_and_reserved(pl_ns, tmp_path, sclock):
    """Saves every 4 steps take 2 s each (as does the stop checkpoint): the stop keeps room for them.

    Step 8 ends at 10 s: its save is due anyway (2.4 s with the margin), then a step and a stop
    with two saves: 18.2 <= 18.5, go on; the save takes it to 12 s. Step 9 ends at 13 s:
    13 + 1 + 4.8 > 18.5, stop; the stop checkpoint takes it to 15 s.
    """
    monitor = _monitor(pl_ns, sclock)
    budget = pl_ns.costaware.BudgetCap(max_time=18.5)
    every4 = pl_ns.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    trainer = _trainer(pl_ns, tmp_path, [monitor, budget, every4])
    trainer.fit(_model(pl_ns, sclock, save_s=2.0))
    assert budget.planner.checkpoints.max()["elapsed_s"] == pytest.approx(2.0)
    assert trainer.global_step == 9
    assert monitor.totals.elapsed_s == pytest.approx(15.0)
    assert (tmp_path / "ckpt" / "budget_stop.ckpt").is_file()  # next to ModelCheckpoint's files


@pytest.mark.parametrize("limit", [22.5, 24.5, 27.5, 29.5])
def test_variable_step_costs_never_overshoot(pl_ns, tmp_path, sclock, limit):
    """A long-sequence bucket every fourth batch costs 4x: a mean-based stop would cross the cap."""
    monitor = _monitor(pl_ns, sclock)
    trainer = _trainer(pl_ns, tmp_path, [monitor, pl_ns.costaware.BudgetCap(max_time=limit)])
    trainer.fit(_model(pl_ns, sclock, pattern=[1.0, 1.0, 1.0, 4.0]))
    assert monitor.totals.elapsed_s <= limit
    assert limit - monitor.totals.elapsed_s < 4.0 + 1.0  # at most about one large step left unused


# ---------------------------------------------------------------------------------------------
# A hard cap wins over min_steps / min_epochs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("minimum", [{"min_steps": 50}, {"min_epochs": 3}])
def test_cap_wins_over_min_steps_and_min_epochs(pl_ns, tmp_path, sclock, minimum):
    monitor = _monitor(pl_ns, sclock)
    budget = pl_ns.costaware.BudgetCap(max_time=10.5)
    trainer = _trainer(pl_ns, tmp_path, [monitor, budget], limit_train_batches=8, **minimum)
    trainer.fit(_model(pl_ns, sclock))
    assert trainer.global_step == 10  # not 50, not 3 epochs x 8
    assert monitor.totals.elapsed_s <= 10.5
    # The Trainer's own settings are back after the fit (Lightning sets min_epochs=1 for min_steps).
    assert trainer.fit_loop.epoch_loop.min_steps == minimum.get("min_steps")
    assert trainer.fit_loop.min_epochs == minimum.get("min_epochs", 1)


# ---------------------------------------------------------------------------------------------
# on_cap="raise"
# ---------------------------------------------------------------------------------------------


def test_raise_writes_checkpoint_and_event_then_fails_loudly(pl_ns, tmp_path, sclock):
    monitor = _monitor(pl_ns, sclock)
    budget = pl_ns.costaware.BudgetCap(max_usd=0.0055, on_cap="raise")
    trainer = _trainer(pl_ns, tmp_path, [monitor, budget])
    with pytest.raises(BudgetExceededError, match=r"max_usd=\$0.0055") as info:
        trainer.fit(_model(pl_ns, sclock))
    error = info.value
    assert (error.cap, error.step) == ("max_usd", 5) and error.value == pytest.approx(0.005)
    assert Path(error.checkpoint).is_file()
    ledger = read_ledger(monitor.ledger.path)
    assert [e["cap"] for e in ledger.events if e["name"] == "budget_cap_hit"] == ["max_usd"]
    assert ledger.end.how == "budget_cap" and "BudgetExceededError" in ledger.events[-1].error
    assert ledger.end["totals"]["usd"] <= 0.0055


# ---------------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------------


def test_resume_after_a_stop_with_a_larger_cap(pl_ns, tmp_path, sclock):
    ns = pl_ns
    first = _monitor(ns, sclock)
    trainer = _trainer(ns, tmp_path, [first, ns.costaware.BudgetCap(max_time=10.5)])
    trainer.fit(_model(ns, sclock))
    assert trainer.global_step == 10
    stop_ckpt = Path(_events(first, "budget_cap_hit")[0]["checkpoint"])
    state = torch.load(stop_ckpt, weights_only=False)["callbacks"]["BudgetCap"]
    assert state["stopped"]["cap"] == "max_time"
    assert {0.5, 0.8}.issubset(state["planner"]["warned"]["max_time"]["fractions"])

    # Same cap: what was spent counts, and one more step would cross it: no step at all.
    again = _monitor(ns, sclock)
    trainer = _trainer(ns, tmp_path, [again, ns.costaware.BudgetCap(max_time=10.5)])
    trainer.fit(_model(ns, sclock), ckpt_path=stop_ckpt)
    assert trainer.global_step == 10 and again.totals.elapsed_s == pytest.approx(10.0)

    # A larger cap: from 10 s on, 10 more steps.
    second = _monitor(ns, sclock)
    budget = ns.costaware.BudgetCap(max_time=20.5)
    trainer = _trainer(ns, tmp_path, [second, budget])
    with pytest.warns(BudgetWarning, match="50% of max_time"):
        trainer.fit(_model(ns, sclock), ckpt_path=stop_ckpt)
    assert trainer.global_step == 20
    assert second.totals.elapsed_s == pytest.approx(20.0)
    assert second.ledger.run_id == first.ledger.run_id
    caps_event = _events(second, "budget_caps")[-1]
    assert caps_event["previous_stop"]["cap"] == "max_time" and caps_event["caps"] == {"max_time": 20.5}
    warned = [e["fraction"] for e in _events(second, "budget_warning")]
    assert warned == [0.5, 0.8, 0.95]  # of the new cap, once each


# ---------------------------------------------------------------------------------------------
# Forecast and warnings
# ---------------------------------------------------------------------------------------------


def test_each_warning_comes_at_the_step_that_reaches_its_share(pl_ns, tmp_path, sclock):
    """Far from the cap BudgetCap skips its decision for a few batches; it stops skipping before the next
    50/80/95% share, so the warning is given at the step that reaches it (not up to 7 steps later)."""
    ns = pl_ns
    monitor = _monitor(ns, sclock)
    trainer = _trainer(ns, tmp_path, [monitor, ns.costaware.BudgetCap(max_time=100.5)], max_steps=99)
    with pytest.warns(BudgetWarning):
        trainer.fit(_model(ns, sclock))
    warned = {e["fraction"]: e["step"] for e in _events(monitor, "budget_warning")}
    # One second a step: 50.25 s are reached at step 51, 80.4 s at 81, 95.475 s at 96.
    assert warned == {0.5: 51, 0.8: 81, 0.95: 96}


def test_forecast_is_logged_and_warned_when_it_does_not_fit(pl_ns, tmp_path, sclock):
    monitor = _monitor(pl_ns, sclock)
    budget = pl_ns.costaware.BudgetCap(max_usd=0.05)
    trainer = _trainer(pl_ns, tmp_path, [monitor, budget], max_steps=100)
    with pytest.warns(BudgetWarning) as record:
        trainer.fit(_model(pl_ns, sclock))
    messages = [str(w.message) for w in record]
    assert any("does not fit the budget" in m and "forecast $0.1" in m and "about step 49" in m for m in messages)
    assert sum("of max_usd" in m for m in messages) == 3  # 50, 80 and 95%, once each
    # 100 planned steps x $0.001, known after two warm-up and three measured steps.
    assert budget.forecast["usd"] == pytest.approx(0.1)
    assert budget.forecast["flops"] == pytest.approx(100 * 100.0)
    for unit in ("usd", "kwh", "co2_kg", "gpu_hours", "flops", "elapsed_s"):
        assert f"cost/forecast_{unit}" in trainer.logged_metrics
    assert float(trainer.logged_metrics["cost/forecast_elapsed_s"]) == pytest.approx(100.0)
    forecast_event = _events(monitor, "forecast")[0]
    assert forecast_event["over"] == ["max_usd"] and forecast_event["batches_done"] == 5
    assert forecast_event["forecast_usd"] == pytest.approx(0.1) and "BudgetCap" in forecast_event["basis"]
    assert len(_events(monitor, "forecast")) == 1  # recorded again only when it moves by > 5%
    assert trainer.global_step == 49


def test_forecast_counts_planned_validations(pl_ns, tmp_path, sclock):
    """A 2-batch sanity check of 1 s a batch, then 4 epochs of 8 steps, each followed by a 2-batch
    validation: 2 + 32 + 4 x 2 s."""
    monitor = _monitor(pl_ns, sclock)
    budget = pl_ns.costaware.BudgetCap(max_time=1000)
    trainer = _trainer(pl_ns, tmp_path, [monitor, budget], max_steps=-1, max_epochs=4, limit_train_batches=8,
                       limit_val_batches=2, enable_checkpointing=False)
    trainer.fit(_model(pl_ns, sclock, val_batch_s=1.0))
    assert monitor.totals.elapsed_s == pytest.approx(42.0)
    first = _events(monitor, "forecast")[0]
    assert first["batches_done"] == 5  # before any validation ran: its cost is the sanity check's
    assert first["forecast"]["elapsed_s"] == pytest.approx(42.0)


def test_forecast_of_max_steps_follows_a_changing_gradient_accumulation(pl_ns, tmp_path, sclock):
    """GradientAccumulationScheduler({0: 1, 2: 4}) with max_steps=60 and 20 batches an epoch: 40 steps in two
    epochs, then 4 batches a step, 120 batches in all. The plan was max_steps x the accumulation of the moment:
    60 batches, then 240 (the forecast $0.24 where the run spent $0.12)."""
    monitor = _monitor(pl_ns, sclock)
    budget = pl_ns.costaware.BudgetCap(max_usd=10.0)
    scheduler = pl_ns.pl.callbacks.GradientAccumulationScheduler(scheduling={0: 1, 2: 4})
    trainer = _trainer(pl_ns, tmp_path, [monitor, scheduler, budget], max_steps=60, limit_train_batches=20)
    trainer.fit(_model(pl_ns, sclock))
    assert trainer.global_step == 60 and monitor.totals.train_batches == 120
    assert monitor.totals.usd == pytest.approx(0.12)
    last = _events(monitor, "forecast")[-1]
    planned = int(re.search(r"of (\d+) planned batches", last["basis"]).group(1))
    assert planned in (120, 121) and last["forecast_usd"] == pytest.approx(0.12, rel=0.02)  # (+1: a step under way)


# ---------------------------------------------------------------------------------------------
# Alone: BudgetCap meters the run itself
# ---------------------------------------------------------------------------------------------


def test_alone_it_meters_logs_and_reports_without_touching_the_callbacks(pl_ns, tmp_path, sclock, monkeypatch):
    monkeypatch.setattr(CostMeter, "clock", staticmethod(sclock))
    budget = pl_ns.costaware.BudgetCap(max_flops=1050, usd_per_host_hour=3.6,
                                       monitor_kwargs={"cpu_tdp_w": 0, "ram_power_w": 3600})
    sclock.monitor = budget.own_meter
    trainer = _trainer(pl_ns, tmp_path, [budget])
    callbacks_before = list(trainer.callbacks)
    trainer.fit(_model(pl_ns, sclock))
    assert trainer.global_step == 10
    assert list(trainer.callbacks) == callbacks_before  # nothing inserted
    assert budget.meter is budget.own_meter
    # It drove its meter: started (meters), header, logs at the log interval, end and report.
    ledger = read_ledger(budget.meter.ledger.path)
    assert ledger.header.prices["usd_per_host_hour"] == 3.6 and ledger.end.how == "budget_cap"  # max_flops
    assert ledger.samples and ledger.end["totals"]["usd"] == pytest.approx(0.01)
    assert "cost/usd" in trainer.callback_metrics  # through pl_module.log
    assert budget.meter.totals.train_batches == 10
    checkpoint = _events(budget.meter, "budget_cap_hit")[0]["checkpoint"]
    callbacks_state = torch.load(checkpoint, weights_only=False)["callbacks"]
    assert callbacks_state["BudgetCap"]["meter"]["totals"]["flops"] == pytest.approx(1000.0)  # resumable spend


def test_a_monitor_listed_after_the_cap_meters_each_batch_before_the_checks(pl_ns, tmp_path, sclock):
    monitor = _monitor(pl_ns, sclock)
    budget = pl_ns.costaware.BudgetCap(max_flops=1050)
    trainer = _trainer(pl_ns, tmp_path, [budget, monitor])
    trainer.fit(_model(pl_ns, sclock))
    assert trainer.callbacks.index(monitor) > trainer.callbacks.index(budget)  # left where the user put it
    assert budget.meter is monitor.meter
    assert trainer.global_step == 10 and monitor.totals.flops == pytest.approx(1000.0)
    assert read_ledger(monitor.ledger.path).header  # one header, though the cap recorded first


def test_a_dollar_cap_with_nothing_priced_fails_before_compute_naming_the_price(pl_ns, tmp_path, sclock):
    monitor = _monitor(pl_ns, sclock, usd_per_host_hour=0.0)
    trainer = _trainer(pl_ns, tmp_path, [monitor, pl_ns.costaware.BudgetCap(max_usd=5)])
    with pytest.raises(ValueError, match=r"BudgetCap\(max_usd=...\).*usd_per_host_hour.*usd_per_gpu_hour.*"
                                         r"--trainer.callbacks.init_args.usd_per_host_hour"):
        trainer.fit(_model(pl_ns, sclock))
    assert trainer.global_step == 0
    # Caps in other units need no price.
    trainer = _trainer(pl_ns, tmp_path, [_monitor(pl_ns, sclock, usd_per_host_hour=0.0),
                                         pl_ns.costaware.BudgetCap(max_flops=550)])
    trainer.fit(_model(pl_ns, sclock))
    assert trainer.global_step > 0


def test_price_arguments_are_ignored_with_a_warning_when_a_monitor_exists(pl_ns, tmp_path, sclock):
    monitor = _monitor(pl_ns, sclock)
    trainer = _trainer(pl_ns, tmp_path, [monitor, pl_ns.costaware.BudgetCap(max_flops=550, usd_per_kwh=0.2)])
    with pytest.warns(BudgetWarning, match=r"\['usd_per_kwh'\] are ignored"):
        trainer.fit(_model(pl_ns, sclock))
    assert monitor.prices.usd_per_host_hour == 3.6 and monitor.prices.usd_per_kwh == 0.0
    # A price given the same to both is not ignored (it agrees), and says nothing: only the other one is named.
    cap = pl_ns.costaware.BudgetCap(max_flops=550, usd_per_kwh=0.2, usd_per_host_hour=3.6)
    trainer = _trainer(pl_ns, tmp_path, [_monitor(pl_ns, sclock), cap])
    with pytest.warns(BudgetWarning, match=r"\['usd_per_kwh'\] are ignored"):
        trainer.fit(_model(pl_ns, sclock))
    agreeing = pl_ns.costaware.BudgetCap(max_flops=550, usd_per_host_hour=3.6)
    trainer = _trainer(pl_ns, tmp_path, [_monitor(pl_ns, sclock), agreeing])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r".*are ignored.*")
        trainer.fit(_model(pl_ns, sclock))


@pytest.mark.parametrize("with_monitor", [True, False])
def test_two_prices_for_one_run_are_refused_before_a_batch(pl_ns, tmp_path, sclock, with_monitor):
    """A price given to the meter of the run and, differently, to another callback: an error at
    setup (which one is right cannot be known), not a warning that one was ignored."""
    first = _monitor(pl_ns, sclock) if with_monitor else pl_ns.costaware.BudgetCap(max_flops=550, usd_per_host_hour=3.6)
    other = pl_ns.costaware.MarginalGainStopping(monitor="val_loss", mode="min", usd_per_point=1.0,
                                                 monitor_kwargs={"usd_per_host_hour": 99})
    trainer = _trainer(pl_ns, tmp_path, [first, other])
    model = _model(pl_ns, sclock)
    with pytest.raises(ValueError, match=r"different settings \(usd_per_host_hour=99 here, 3.6 there\)"):
        trainer.fit(model)
    assert model.batches == 0


# ---------------------------------------------------------------------------------------------
# LightningCLI
# ---------------------------------------------------------------------------------------------


def test_lightning_cli_flags_and_preset(tmp_path):
    from pytorch_lightning.cli import LightningCLI
    from pytorch_lightning.demos.boring_classes import BoringModel

    import costaware

    common = ["--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar=false",
              "--trainer.limit_val_batches=0", "--trainer.max_steps=50", "--trainer.logger=false"]
    cli = LightningCLI(BoringModel, run=False, args=[
        *common, "--trainer.callbacks+=costaware.BudgetCap", "--trainer.callbacks.max_usd=5",
        "--trainer.callbacks.max_time=00:01:00:00", "--trainer.callbacks.usd_per_host_hour=0.5"])
    caps = [cb for cb in cli.trainer.callbacks if isinstance(cb, costaware.BudgetCap)]
    assert len(caps) == 1 and caps[0].limits == {"max_usd": 5.0, "max_time": 3600.0}
    assert caps[0].own_meter.settings()["usd_per_host_hour"] == 0.5

    # fit, for real: BoringModel's measured 256 FLOPs a step (after a first uncounted one) reach
    # 7 x 256 = 1792 at step 7, and 2048 > 2000 after one more: stop at step 7.
    meters = "--trainer.callbacks.monitor_kwargs={cpu_tdp_w: 10, ram_power_w: 3}"
    cli = LightningCLI(BoringModel, args=["fit", *common, "--trainer.callbacks+=costaware.BudgetCap",
                                          "--trainer.callbacks.max_flops=2000", meters])
    assert cli.trainer.global_step == 7

    # The preset, with one cap added from the command line.
    preset = REPO / "callbacks" / "budget.yaml"
    cli = LightningCLI(BoringModel, save_config_kwargs={"overwrite": True},
                       args=["fit", "--config", str(preset), *common, "--trainer.callbacks.max_flops=2000", meters,
                             "--trainer.callbacks.init_args.usd_per_host_hour=0.5"])
    caps = [cb for cb in cli.trainer.callbacks if isinstance(cb, costaware.BudgetCap)]
    assert len(caps) == 1 and caps[0].limits == {"max_usd": 40.0, "max_flops": 2000.0, "max_time": 43200.0}
    assert cli.trainer.global_step == 7 and caps[0].stopped.cap == "max_flops"


# ---------------------------------------------------------------------------------------------
# DDP: two processes stop together
# ---------------------------------------------------------------------------------------------

DDP_SCRIPT = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    import pytorch_lightning as pl
    from pytorch_lightning.demos.boring_classes import BoringModel
    import costaware

    class Declared(BoringModel):
        """Each rank declares its own FLOPs per batch: rank 0 100, rank 1 300 (400 a step in all)."""
        def setup(self, stage):
            self.flops_per_batch = 100.0 if self.trainer.global_rank == 0 else 300.0

    class Record(pl.Callback):
        def __init__(self, budget, out):
            self.budget, self.out = budget, Path(out)
        def on_fit_end(self, trainer, pl_module):
            data = {"rank": trainer.global_rank, "step": trainer.global_step,
                    "stopped": self.budget.stopped.cap if self.budget.stopped else None,
                    "flops": self.budget.meter.totals.flops,
                    "ledger": str(self.budget.meter.ledger.path) if self.budget.meter.ledger.path else None}
            (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(data))

    if __name__ == "__main__":
        out = sys.argv[1]
        budget = costaware.BudgetCap(max_flops=4100, usd_per_host_hour=1.0,
                                     monitor_kwargs={"cpu_tdp_w": 10, "ram_power_w": 3})
        trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=50, log_every_n_steps=50,
                             limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False,
                             default_root_dir=out, callbacks=[budget, Record(budget, out)])
        trainer.fit(Declared())
''')


@pytest.mark.slow  # two processes (~20 s); CI runs -m slow too
def test_ddp_ranks_stop_together_on_the_run_total(tmp_path):
    """Between log intervals each rank extrapolates its own spend (rank 0 sees 200 FLOPs a step,
    rank 1 600): rank 1 would stop at step 6 (3600 + 600 > 4100), rank 0 at step 20. Any rank's
    stop stops all (``reduce_boolean_decision(all=False)``): both stop at step 6, nothing hangs."""
    script = tmp_path / "budget_ddp.py"
    script.write_text(DDP_SCRIPT)
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True,
                            timeout=240, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["step"] == ranks[1]["step"] == 6
    assert ranks[0]["flops"] == pytest.approx(6 * 400.0) and ranks[0]["flops"] <= 4100  # the run's total
    hit = [e for e in read_ledger(ranks[0]["ledger"]).events if e["name"] == "budget_cap_hit"]
    assert len(hit) == 1 and hit[0]["cap"] == "max_flops" and hit[0]["decided_by"] == "another rank"
    assert Path(hit[0]["checkpoint"]).is_file()


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({}, ValueError, "no cap given: set at least one of max_usd, max_kwh"),
        ({"max_usd": 0}, ValueError, "max_usd must be > 0"),
        ({"max_kwh": -3}, ValueError, "max_kwh must be > 0"),
        ({"max_usd": "five"}, ValueError, "max_usd must be a finite number > 0, got 'five'"),
        ({"max_gpu_hours": float("nan")}, ValueError, "max_gpu_hours must be a finite number"),
        ({"max_time": "12 hours"}, ValueError, r"max_time='12 hours' is not a duration: give a datetime.timedelta"),
        ({"max_time": -60}, ValueError, "max_time must be a positive duration"),
        ({"caps": {"dollars": 5}}, ValueError, "caps has an unknown key 'dollars'"),
        ({"caps": {"usd": 0}}, ValueError, r"caps\['usd'\] must be > 0"),
        ({"max_usd": 5, "caps": {"usd": 6}}, ValueError, "cap max_usd is given twice"),
        ({"max_usd": 5, "on_cap": "warn"}, ValueError, r"on_cap must be one of \('stop', 'raise'\)"),
        ({"max_usd": 5, "warmup_steps": -1}, ValueError, "warmup_steps must be an int >= 0"),
        ({"max_usd": 5, "predictive": "yes"}, ValueError, "predictive must be True or False"),
        ({"max_usd": 5, "usd_per_host_hour": -1}, ValueError, "usd_per_host_hour must be >= 0"),
        ({"max_usd": 5, "country": "Atlantis"}, ValueError, "unknown country 'Atlantis'"),
        ({"max_usd": 5, "monitor_kwargs": {"cpu_tdp": 5}}, ValueError, "monitor_kwargs has an unknown key 'cpu_tdp'"),
        ({"max_usd": 5, "gpu": "H100", "monitor_kwargs": {"gpu": "A100"}}, ValueError, "gpu is given twice"),
        ({"max_dollars": 5}, TypeError, "max_dollars"),
    ],
)
def test_bad_input_fails_at_construction(ns, kwargs, error, message):
    with pytest.raises(error, match=message):
        ns.costaware.BudgetCap(**kwargs)


# ---------------------------------------------------------------------------------------------
# Review fixes: saves after a validation, DDP agreement before a validation, reloaded epochs,
# forecast saves
# ---------------------------------------------------------------------------------------------


def test_modelcheckpoint_saves_after_a_validation_are_counted_and_reserved(pl_ns, tmp_path, sclock):
    """Epochs of 4 steps (1 s), a 1-batch validation (1 s) and ModelCheckpoint(save_last=True): two
    saves of 2 s after every validation, all of which a stop entails with its own checkpoint.

    The sanity check takes 1 s; epoch 0 ends at 5 s, its validation at 6 s and its saves at 10 s.
    After step k of epoch 1 (k = 5..8) the clock is at k + 6 and going on costs 1 s, the stop's
    validation (1.2 s with the margin) and three saves (7.2 s): k + 15.4 <= 23.5 up to k = 8; but
    after step 8 (14 s) the scheduled validation and its saves are due as well (6 s): 14 + 6 + 1 +
    8.4 > 23.5, so it stops there and ends at 14 + 1 + 4 + 2 = 21 s. Counting the saves after a
    validation as 0 (as before) reserved 3.6 s: it went on to step 9 and ended at 27 s.
    """
    monitor = _monitor(pl_ns, sclock)
    budget = pl_ns.costaware.BudgetCap(max_time=23.5)
    saver = pl_ns.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = _trainer(pl_ns, tmp_path, [monitor, budget, saver], max_steps=-1, max_epochs=5, limit_train_batches=4,
                       limit_val_batches=1, num_sanity_val_steps=1)
    trainer.fit(_model(pl_ns, sclock, val_batch_s=1.0, save_s=2.0))
    assert budget._saves_per_validation == 2
    assert trainer.global_step == 8
    assert monitor.totals.elapsed_s <= 23.5
    assert monitor.totals.elapsed_s == pytest.approx(21.0)
    state = torch.load(_events(monitor, "budget_cap_hit")[0]["checkpoint"], weights_only=False)
    assert state["callbacks"]["BudgetCap"]["saves_per_validation"] == 2


class _FakeStrategy:
    """Two ranks seen from one: every collective returns this rank's value, and is counted."""

    def __init__(self):
        self.agreements = []

    def reduce_boolean_decision(self, decision, all=True):
        self.agreements.append(self.batch)
        return decision

    def reduce(self, tensor, reduce_op="mean"):
        return tensor


def _ddp_replay(ns, cap, every=100, batch=1.0, validation=120.0, batches=2000):
    """Replay a DDP run through ``BudgetCap._agree``: batches of ``batch``, a validation of
    ``validation`` after every ``every`` batches and at a stop; returns (final spend, agreements)."""
    from types import SimpleNamespace

    from costaware.callbacks.budget_cap import _Schedule
    from costaware.forecast import StopPlan

    budget = ns.costaware.BudgetCap(max_usd=cap, warmup_steps=0)
    budget._schedule = _Schedule(validation=True, time_based=False, batches_per_epoch=every, val_check_batch=every,
                                 check_val_every_n_epoch=1, default_saves=0, epoch_saves=0,
                                 step_savers=())
    strategy = _FakeStrategy()
    trainer = SimpleNamespace(world_size=2, strategy=strategy, log_every_n_steps=50, accumulate_grad_batches=1)
    module = SimpleNamespace(device=torch.device("cpu"))
    planner = budget.planner
    planner.observe_validation({**_zero(), "usd": validation})
    spent = 0.0
    for b in range(1, batches + 1):
        strategy.batch = b
        spent += batch
        planner.observe_batch({**_zero(), "usd": batch})
        now = {**_zero(), "usd": spent}
        plan = StopPlan(validation_now=b % every == 0, validation_on_stop=True, saves_per_validation=0, saves_on_stop=0)
        breach = planner.decide(now, plan)
        if budget._agree(trainer, module, breach is not None, now, plan):
            return spent + validation, strategy.agreements  # the stop's validation
        if b % every == 0:
            spent += validation
    return spent, strategy.agreements


def _zero():
    from costaware.forecast import zero

    return zero()


@pytest.mark.parametrize("cap", [1000.0, 1010.0, 1050.0, 1100.0, 1200.0, 1300.0, 1500.0])
def test_ddp_ranks_agree_before_every_scheduled_validation(pl_ns, cap):
    """The reviewer's case: validations of $120 every 100 batches of $1. The headroom spreads a
    validation over 100 batches, so the ranks used to agree some 20-30 batches apart and let a
    scheduled validation run that a stop should have replaced: over the cap. Now they also agree
    after every batch that a validation follows."""
    final, agreements = _ddp_replay(pl_ns, cap)
    assert final <= cap
    assert {100, 200, 300} <= set(agreements)


def test_ddp_ranks_agree_before_step_saves(pl_ns):
    from types import SimpleNamespace

    from costaware.callbacks.budget_cap import _Schedule
    from costaware.forecast import StopPlan

    budget = pl_ns.costaware.BudgetCap(max_usd=1e6, warmup_steps=0)
    budget._schedule = _Schedule(validation=False, time_based=False, batches_per_epoch=1000, val_check_batch=None,
                                 check_val_every_n_epoch=1, default_saves=1, epoch_saves=0,
                                 step_savers=((10, 1),))
    strategy = _FakeStrategy()
    trainer = SimpleNamespace(world_size=2, strategy=strategy, log_every_n_steps=50, accumulate_grad_batches=1)
    budget.planner.observe_batch({**_zero(), "usd": 1.0})
    for step in range(1, 31):
        strategy.batch = step
        plan = StopPlan(validation_on_stop=False, saves_now=budget._schedule.step_saves(step),
                        saves_next=budget._schedule.step_saves(step + 1))
        budget._agree(trainer, SimpleNamespace(device=torch.device("cpu")), False, {**_zero(), "usd": 1.0}, plan)
    assert {9, 10, 19, 20, 29, 30} <= set(strategy.agreements)
    assert budget._schedule.step_saves_per_batch() == pytest.approx(0.1)
    assert budget._schedule.step_saves_between(5, 30) == 3 and budget._schedule.step_saves_between(30, 30) == 0


def test_a_reloaded_longer_epoch_is_still_capped(pl_ns, tmp_path, sclock):
    """Epoch 0 has 4 batches, the reloaded epoch 1 has 20: the run planned at fit start (8 batches)
    is passed at step 8, and the cap must still stop it at step 12 (12 s, an 13th would reach 13 s)."""
    from pytorch_lightning.demos.boring_classes import RandomDataset
    from torch.utils.data import DataLoader

    model = _model(pl_ns, sclock)

    def train_dataloader():
        length = 4 if model.trainer.current_epoch == 0 else 20
        return DataLoader(RandomDataset(32, length), batch_size=1)

    model.train_dataloader = train_dataloader
    monitor = _monitor(pl_ns, sclock)
    budget = pl_ns.costaware.BudgetCap(max_time=12.5)
    trainer = _trainer(pl_ns, tmp_path, [monitor, budget], max_steps=-1, max_epochs=2,
                       reload_dataloaders_every_n_epochs=1, enable_checkpointing=False)
    trainer.fit(model)
    assert trainer.global_step == 12 and monitor.totals.elapsed_s == pytest.approx(12.0)
    assert budget._planned_batches == 4 + 20  # re-read at the reloaded epoch


def test_forecast_counts_save_last_and_step_saves(pl_ns, tmp_path, sclock):
    """No validation; 3 epochs of 8 steps of 1 s; saves of 1 s: ModelCheckpoint(save_last=True) saves
    twice at every epoch end (6), one with every_n_train_steps=4 after steps 4, 8, ..., 24 (6):
    24 + 12 s. The first forecast (after step 5) counts them all."""
    monitor = _monitor(pl_ns, sclock)
    budget = pl_ns.costaware.BudgetCap(max_time=1000)
    by_epoch = pl_ns.callbacks.ModelCheckpoint(dirpath=tmp_path / "epochs", save_last=True)
    by_steps = pl_ns.callbacks.ModelCheckpoint(dirpath=tmp_path / "steps", every_n_train_steps=4, save_top_k=-1)
    trainer = _trainer(pl_ns, tmp_path, [monitor, budget, by_epoch, by_steps], max_steps=-1, max_epochs=3,
                       limit_train_batches=8)
    trainer.fit(_model(pl_ns, sclock, save_s=1.0))
    assert monitor.totals.elapsed_s == pytest.approx(36.0)
    first = _events(monitor, "forecast")[0]
    assert first["batches_done"] == 5
    assert first["forecast"]["elapsed_s"] == pytest.approx(36.0)
