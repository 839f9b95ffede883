"""MarginalGainStopping in real fits on a synthetic learning curve, in both namespaces; EarlyStop."""

import csv
import math
import random
import warnings

import pytest
import torch

from conftest import make_clocked_model, preset_for
from costaware.callbacks.marginal_gain import MetricNotLoggedError
from costaware.ledger import read_ledger
from costaware.meter import CostMeter
from costaware.strategies import EarlyStop

# Every training step takes 1 s on the fake clock and the host costs $3.6/h: $0.001 a step.
USD_PER_STEP = 0.001
K = 0.05  # val_acc = 1 - exp(-K * step): its slope is 100 K exp(-K s) points a step


def _break_even_step(usd_per_point):
    """Where one more step's gain, in points, is worth less than the step costs."""
    # 100 K exp(-K s) * usd_per_point = USD_PER_STEP
    return math.log(100 * K * usd_per_point / USD_PER_STEP) / K


def _curve_model(base, clock, curve, snapshots=None, noise=0.002, name="val_acc"):
    """A BoringModel whose validation logs ``curve(global_step)`` plus a little noise as ``name``."""

    class Curve(base):
        def training_step(self, batch, batch_idx):
            clock.advance(1.0)
            return super().training_step(batch, batch_idx)

        def validation_step(self, batch, batch_idx):
            step = self.global_step
            if snapshots is not None and batch_idx == 0:
                snapshots[step] = {k: v.detach().clone() for k, v in self.state_dict().items()}
            self.log(name, curve(step) + noise * random.Random(step).gauss(0.0, 1.0))
            return super().validation_step(batch, batch_idx)

    return Curve()


def _saturating(step):
    return 1.0 - math.exp(-K * step)


def _monitor(ns, clock):
    monitor = ns.costaware.CostMonitor(usd_per_host_hour=3.6, cpu_tdp_w=10, ram_power_w=3, country="FRA")
    monitor.meter.clock = clock
    return monitor


def _trainer(ns, tmp_path, callbacks, **kwargs):
    kwargs = {"max_steps": 300, "limit_train_batches": 1000, "val_check_interval": 5, "limit_val_batches": 1,
              "log_every_n_steps": 5, "enable_progress_bar": False, "enable_model_summary": False,
              "default_root_dir": tmp_path, "logger": ns.pl.loggers.CSVLogger(tmp_path), **kwargs}
    return ns.Trainer(callbacks=callbacks, **kwargs)


def test_stops_near_break_even_and_records_why(ns, tmp_path, clock):
    stopping = ns.costaware.MarginalGainStopping(monitor="val_acc", mode="max", usd_per_point=0.01)
    trainer = _trainer(ns, tmp_path, [_monitor(ns, clock), stopping])
    trainer.fit(_curve_model(ns.BoringModel, clock, _saturating))

    knee = _break_even_step(0.01)  # 78
    assert stopping.stopped_step == trainer.global_step
    # The policy pays for its caution (an upper quantile of the gain, a best-of-noisy kept
    # value): it stops after the break-even point, but not far after.
    assert knee <= stopping.stopped_step <= 1.5 * knee, stopping.stop_reason
    assert stopping.stop_reason.startswith("not worth it")

    ledger = read_ledger(stopping.meter.ledger.path)
    decisions = [e for e in ledger.events if e["name"] == "marginal_gain_decision"]
    assert len(decisions) == trainer.global_step // 5  # one per validation, not the sanity check
    curve = decisions[-1]["curve_points"]  # the fitted curve against dollars, which the report draws
    assert len(curve["usd"]) == len(curve["value"]) > 2 and curve["usd"] == sorted(curve["usd"])
    assert curve["usd"][0] < decisions[-1]["usd"] < curve["usd"][-1]
    now = min(range(len(curve["usd"])), key=lambda i: abs(curve["usd"][i] - decisions[-1]["usd"]))
    assert abs(curve["value"][now] - _saturating(trainer.global_step)) < 0.02
    html = stopping.meter.report_paths["html"].read_text()
    assert "fitted curve" in html and "stopped at" in html
    assert [d["stop"] for d in decisions] == [False] * (len(decisions) - 1) + [True]
    last = decisions[-1]
    for key in ("reason", "monitor", "value", "usd", "gain_points", "gain_points_upper", "gain_per_usd",
                "predicted_final", "predicted_final_low", "predicted_final_high", "usd_to_predicted_final", "curve",
                "lr"):
        assert key in last, key
    # The learning rate at each validation, read from the optimizer, is in the ledger and went to the policy.
    assert [d["lr"] for d in decisions] == stopping.policy.state_dict()["lrs"] and last["lr"] > 0
    assert last["predicted_final_low"] <= last["predicted_final"] <= last["predicted_final_high"] <= 1.0
    assert last["monitor"] == "val_acc" and last["gain_per_usd"] < 1 / 0.01
    # Past runs at this stage were asked (a plan, accuracy in [0, 1], the default prior): the rate the decision
    # compared with the price is recomputable from the recorded figures.
    assert last["past_gain_points_upper"] >= 0.0 and last["past_increment_usd"] > 0.0
    fit_rate = last["gain_points_upper"] / last["increment_usd"]
    past_rate = max(last["past_gain_points_upper"] / last["past_increment_usd"], 1e-3 / 0.01)
    assert min(fit_rate, past_rate) <= last["gain_per_usd"] <= max(fit_rate, past_rate)
    assert "past runs at this stage gained up to" in last["reason"]
    assert last["usd"] == pytest.approx(trainer.global_step * USD_PER_STEP, rel=1e-6)
    assert last["totals"]["usd"] == pytest.approx(last["usd"])  # the event's totals are the decision's
    # The plan: $ per step so far x max_steps (300 steps at $0.001).
    assert last["usd_to_predicted_final"] == pytest.approx(300 * USD_PER_STEP - last["usd"], rel=1e-3)
    assert 0.97 < last["predicted_final"] < 1.05  # the curve at the planned end, ~1
    assert decisions[0]["gain_points"] is None  # too few points to fit yet
    # The estimate reached the loggers and the callback metrics.
    for key in ("cost/marginal_gain_per_usd", "cost/predicted_final_val_acc"):
        assert key in trainer.callback_metrics, key
    with open(trainer.logger.experiment.metrics_file_path) as f:
        columns = next(csv.reader(f))
    assert "cost/marginal_gain_per_usd" in columns and "cost/predicted_final_val_acc" in columns
    # The default strategy, EarlyStop, reported the teacher.
    results = [e for e in ledger.events if e["name"] == "strategy_result"]
    assert len(results) == 1 and results[0]["strategy"] == "early_stop"
    row = results[0]["rows"][0]
    assert row["role"] == "teacher" and row["params"] == 66 and row["size_bytes"] > 0
    assert row["train_usd"] == pytest.approx(ledger.totals.usd) and row["latency_ms_per_example"] > 0
    assert row["metric"] == pytest.approx(max(d["value"] for d in decisions))
    assert stopping.results[0].role == "teacher"


def test_a_higher_price_per_point_stops_later(pl_ns, tmp_path, clock):
    def lost_usd(step, usd_per_point):
        """What stopping at ``step`` instead of at the break-even costs: the points not gained, less the spend saved."""
        be = _break_even_step(usd_per_point)
        return usd_per_point * 100 * (_saturating(be) - _saturating(step)) - (be - step) * USD_PER_STEP

    for prior in (None, "default"):
        stops = []
        for usd_per_point in (0.001, 0.1):
            stopping = pl_ns.costaware.MarginalGainStopping(monitor="val_acc", usd_per_point=usd_per_point,
                                                            prior=prior)
            trainer = _trainer(pl_ns, tmp_path, [_monitor(pl_ns, clock), stopping], logger=False)
            trainer.fit(_curve_model(pl_ns.BoringModel, clock, _saturating))
            if prior is None:  # the fit alone: never before the break-even
                assert stopping.stopped_step >= _break_even_step(usd_per_point)
            else:
                # Past runs at this stage gained less than this exponential goes on to, and weigh in on the rate as far
                # as the fit is unsure: the stop may come before the break-even (30 against 32.2 at $0.001, 104
                # against 124 at $0.1), at a loss of under a fifth of what the run spent.
                assert lost_usd(stopping.stopped_step, usd_per_point) < 0.2 * stopping.stopped_step * USD_PER_STEP
            stops.append(stopping.stopped_step)
        assert stops[0] < stops[1] < 300


def test_a_fit_without_a_plan_asks_past_runs_for_the_next_stretch(ns, tmp_path, clock):
    """max_epochs=-1 and max_steps=-1: no plan. Past runs at the same progress and momentum (at any share of their
    plan) still price the next doubling of the spend, as the ledger records; the run stops on a saturated curve."""
    stopping = ns.costaware.MarginalGainStopping(monitor="val_acc", mode="max", usd_per_point=0.01)
    backstop = ns.costaware.BudgetCap(max_usd=1.0)  # 1,000 steps, should the policy never stop
    trainer = _trainer(ns, tmp_path, [_monitor(ns, clock), backstop, stopping], max_steps=-1, max_epochs=-1)
    trainer.fit(_curve_model(ns.BoringModel, clock, _saturating))
    assert stopping.stop_reason.startswith("not worth it") and stopping.stopped_step < 300, stopping.stop_reason
    decisions = [e for e in read_ledger(stopping.meter.ledger.path).events if e["name"] == "marginal_gain_decision"]
    last = decisions[-1]
    assert last.get("usd_to_predicted_final") is None  # no plan
    assert last["past_gain_points_upper"] >= 0.0 and last["past_increment_usd"] == pytest.approx(last["usd"])
    assert "past runs at this stage gained up to" in last["reason"] and "by their end" not in last["reason"]


def test_a_plan_given_by_the_user_is_kept(pl_ns, tmp_path, clock):
    stopping = pl_ns.costaware.MarginalGainStopping(monitor="val_acc", usd_per_point=0.01,
                                                    policy_kwargs={"planned_cost_usd": 1.0})
    trainer = _trainer(pl_ns, tmp_path, [_monitor(pl_ns, clock), stopping], max_steps=40, logger=False)
    trainer.fit(_curve_model(pl_ns.BoringModel, clock, _saturating))
    last = stopping.decisions[-1].estimate
    assert last.usd_to_predicted_final == pytest.approx(1.0 - trainer.global_step * USD_PER_STEP, rel=1e-3)


def test_the_annealing_wait_follows_the_lr_scheduler(pl_ns, tmp_path, clock):
    def fast(step):
        return 1.0 - math.exp(-0.2 * step)  # break-even at $0.1/point: step 38

    stops = {}
    for scheduled in (True, False):
        model = _curve_model(pl_ns.BoringModel, clock, fast)  # BoringModel has a StepLR scheduler
        if not scheduled:
            model.configure_optimizers = lambda model=model: torch.optim.SGD(model.parameters(), lr=0.1)
        stopping = pl_ns.costaware.MarginalGainStopping(monitor="val_acc", usd_per_point=0.1)
        trainer = _trainer(pl_ns, tmp_path, [_monitor(pl_ns, clock), stopping], logger=False)
        trainer.fit(model)
        assert stopping.policy.anneals is scheduled
        policy_event = next(e for e in read_ledger(stopping.meter.ledger.path).events
                            if e["name"] == "marginal_gain_policy")
        assert policy_event["anneals"] is scheduled and policy_event["baseline"] is None
        lrs = [e["lr"] for e in read_ledger(stopping.meter.ledger.path).events
               if e["name"] == "marginal_gain_decision"]
        assert (len(set(lrs)) > 1) is scheduled and lrs[0] == pytest.approx(0.1)  # StepLR decays it per epoch
        stops[scheduled] = stopping.stopped_step
    # Scheduled: the fit is not trusted before min(50% of the $0.3 plan, 1 point x $0.1) = step 100.
    # Constant learning rate: nothing to wait for, it stops soon after the break-even step.
    assert stops[True] >= 100 > stops[False] >= math.log(100 * 0.2 * 0.1 / USD_PER_STEP) / 0.2
    # The user's setting wins over the Trainer's.
    stopping = pl_ns.costaware.MarginalGainStopping(monitor="val_acc", usd_per_point=0.1,
                                                    policy_kwargs={"anneals": False})
    trainer = _trainer(pl_ns, tmp_path, [_monitor(pl_ns, clock), stopping], logger=False)
    trainer.fit(_curve_model(pl_ns.BoringModel, clock, fast))
    assert stopping.policy.anneals is False and stopping.stopped_step == stops[False]


def test_the_schedule_ahead_is_read_off_the_scheduler_once_and_leaves_training_alone(pl_ns, tmp_path, clock):
    model = _curve_model(pl_ns.BoringModel, clock, _saturating)

    def linear_decay(model=model):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / 300)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": decay, "interval": "step"}}

    model.configure_optimizers = linear_decay
    stopping = pl_ns.costaware.MarginalGainStopping(monitor="val_acc", usd_per_point=0.01)
    trainer = _trainer(pl_ns, tmp_path, [_monitor(pl_ns, clock), stopping], logger=False)
    trainer.fit(model)
    decisions = [e for e in read_ledger(stopping.meter.ledger.path).events if e["name"] == "marginal_gain_decision"]
    schedule = decisions[0]["lr_schedule"]  # read at the first validation (step 5), kept by the policy
    assert [d["lr_schedule"] for d in decisions[1:]] == [None] * (len(decisions) - 1)
    assert schedule[0][0] == pytest.approx(5 / 300) and schedule[-1][0] == pytest.approx(1.0)
    assert all(lr == pytest.approx(0.1 * (1.0 - f), abs=1e-9) for f, lr in schedule)
    assert stopping.policy.lr_schedule is not None
    # The real scheduler went on as if never read: the rate at each validation is the schedule's.
    assert [d["lr"] for d in decisions] == pytest.approx([0.1 * (1.0 - d["step"] / 300) for d in decisions])


def test_still_improving_run_is_not_stopped(ns, tmp_path, clock):
    # 0.2 points a step = 200 points a dollar, worth $2 at $0.01/point: always worth it.
    stopping = ns.costaware.MarginalGainStopping(monitor="val_acc", min_gain_per_usd=100.0)
    trainer = _trainer(ns, tmp_path, [_monitor(ns, clock), stopping], max_steps=150, logger=False)
    trainer.fit(_curve_model(ns.BoringModel, clock, lambda step: 0.002 * step))
    assert stopping.stopped_step is None and trainer.global_step == 150
    assert not any(d.stop for d in stopping.decisions)
    assert all(d.reason.startswith("worth it") for d in stopping.decisions[4:])


def test_works_alone_with_its_own_meter(ns, tmp_path, clock, monkeypatch):
    monkeypatch.setattr(CostMeter, "clock", staticmethod(clock))
    stopping = ns.costaware.MarginalGainStopping(
        monitor="val_acc", usd_per_point=0.01,
        monitor_kwargs={"usd_per_host_hour": 3.6, "cpu_tdp_w": 10, "ram_power_w": 3})
    trainer = _trainer(ns, tmp_path, [stopping], logger=False)
    trainer.fit(_curve_model(ns.BoringModel, clock, _saturating))
    assert not any(isinstance(cb, ns.costaware.CostMonitor) for cb in trainer.callbacks)  # nothing inserted
    assert stopping.meter is stopping.own_meter
    assert stopping.stopped_step is not None and stopping.meter.totals.usd > 0
    assert "cost/usd" in trainer.callback_metrics  # it logs as a CostMonitor would
    assert read_ledger(stopping.meter.ledger.path).end.how == "marginal_gain"


def test_a_monitor_placed_after_is_read_where_it_is(pl_ns, tmp_path, clock):
    stopping = pl_ns.costaware.MarginalGainStopping(monitor="val_acc", usd_per_point=0.01)
    monitor = _monitor(pl_ns, clock)
    trainer = _trainer(pl_ns, tmp_path, [stopping, monitor], max_steps=20, logger=False)
    trainer.fit(_curve_model(pl_ns.BoringModel, clock, _saturating))
    assert trainer.callbacks.index(monitor) > trainer.callbacks.index(stopping)
    assert stopping.meter is monitor.meter and len(stopping.decisions) == 4


def test_strategies_run_after_the_metering_ends_wherever_the_monitor_is_listed(pl_ns, tmp_path, clock):
    from costaware.strategies import StopStrategy

    class Probe(StopStrategy):  # reports whether the teacher's meter still runs while it works
        name = "probe"

        def __init__(self):
            self.seen = []

        def after_fit(self, context):
            self.seen.append((context.monitor.running, context.monitor.totals.usd))
            return []

    probe = Probe()
    stopping = pl_ns.costaware.MarginalGainStopping(monitor="val_acc", usd_per_point=0.01, then=probe)
    monitor = _monitor(pl_ns, clock)
    trainer = _trainer(pl_ns, tmp_path, [stopping, monitor], max_steps=20, logger=False)
    trainer.fit(_curve_model(pl_ns.BoringModel, clock, _saturating))
    [(running, usd)] = probe.seen
    assert not running and usd == pytest.approx(monitor.totals.usd)  # ended once, before the strategy


def test_two_callbacks_alone_share_one_meter_across_fits(pl_ns, tmp_path, clock, monkeypatch):
    """The first that can meter alone drives the run's meter; the other reads it, also after a
    fit that failed in setup."""
    monkeypatch.setattr(CostMeter, "clock", staticmethod(clock))
    stopping = pl_ns.costaware.MarginalGainStopping(monitor="val_acc", usd_per_point=0.01,
                                                    monitor_kwargs={"usd_per_host_hour": 3.6})
    cap = pl_ns.costaware.BudgetCap(max_usd=1e6)
    trainer = _trainer(pl_ns, tmp_path, [stopping, cap], max_steps=20, logger=False)

    class FailsInSetup(pl_ns.BoringModel):
        def setup(self, stage):
            raise RuntimeError("no data yet")

    with pytest.raises(RuntimeError, match="no data yet"):
        trainer.fit(FailsInSetup())
    trainer.fit(_curve_model(pl_ns.BoringModel, clock, _saturating))
    assert cap.meter is stopping.meter is stopping.own_meter and len(stopping.decisions) == 4


def test_nothing_priced_is_an_error_before_compute(pl_ns, tmp_path, clock):
    stopping = pl_ns.costaware.MarginalGainStopping(monitor="val_acc", usd_per_point=0.01)
    model = _curve_model(pl_ns.BoringModel, clock, _saturating)
    trainer = _trainer(pl_ns, tmp_path, [stopping], max_steps=20, logger=False)
    with pytest.raises(ValueError, match=r"usd_per_point.*usd_per_host_hour.*usd_per_gpu_hour.*"
                                         r"--trainer.callbacks.init_args.usd_per_host_hour"):
        trainer.fit(model)
    assert trainer.global_step == 0


def test_missing_monitor_key_fails_at_first_validation_naming_logged_keys(ns, tmp_path, clock):
    stopping = ns.costaware.MarginalGainStopping(monitor="val_accuracy", usd_per_point=1.0)
    trainer = _trainer(ns, tmp_path, [_monitor(ns, clock), stopping], logger=False, num_sanity_val_steps=0)
    with pytest.raises(MetricNotLoggedError) as error:
        trainer.fit(make_clocked_model(ns.BoringModel, clock))  # logs val_loss
    assert isinstance(error.value, KeyError) and isinstance(error.value, ValueError)
    assert "val_accuracy" in str(error.value) and "'val_loss'" in str(error.value)
    assert "val_loss" in error.value.logged
    assert trainer.global_step == 5  # the first validation, not later


def test_a_fit_without_validation_is_refused_before_any_step(ns, tmp_path, clock):
    """The policy decides at each validation; a fit that runs none would leave it silently inert."""
    stopping = ns.costaware.MarginalGainStopping(monitor="val_acc", usd_per_point=1.0)
    trainer = _trainer(ns, tmp_path, [_monitor(ns, clock), stopping], logger=False, limit_val_batches=0)
    with pytest.raises(ValueError, match=r"monitor='val_acc'.*runs none.*limit_val_batches=0"):
        trainer.fit(make_clocked_model(ns.BoringModel, clock))
    assert trainer.global_step == 0


def test_missing_monitor_key_fails_at_the_sanity_check_before_training(pl_ns, tmp_path, clock):
    stopping = pl_ns.costaware.MarginalGainStopping(monitor="val_accuracy", usd_per_point=1.0)
    trainer = _trainer(pl_ns, tmp_path, [_monitor(pl_ns, clock), stopping], logger=False)
    with pytest.raises(MetricNotLoggedError, match="val_accuracy"):
        trainer.fit(make_clocked_model(pl_ns.BoringModel, clock))
    assert trainer.global_step == 0


class _Broken:
    """A strategy whose work after the fit fails (a student out of memory, say)."""

    def on_stop(self, context):
        pass

    def after_fit(self, context):
        raise RuntimeError("out of memory")


def test_a_failing_strategy_keeps_the_finished_fit(pl_ns, tmp_path, clock):
    stopping = pl_ns.costaware.MarginalGainStopping(monitor="val_acc", usd_per_point=0.01, then=_Broken())
    trainer = _trainer(pl_ns, tmp_path, [_monitor(pl_ns, clock), stopping], max_steps=20)
    with pytest.warns(UserWarning, match="_Broken failed after the fit.*out of memory"):
        trainer.fit(_curve_model(pl_ns.BoringModel, clock, _saturating))
    ledger = read_ledger(stopping.meter.ledger.path)
    assert ledger.end["how"] == "completed"
    assert [e["error"] for e in ledger.events if e["name"] == "strategy_failed"] == ["RuntimeError: out of memory"]


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"mode": "up", "usd_per_point": 1.0}, "mode"),
    ({"usd_per_point": -1.0}, "usd_per_point"),
    ({"min_gain_per_usd": 0.0}, "min_gain_per_usd"),
    ({}, "usd_per_point"),
    ({"usd_per_point": 1.0, "min_gain_per_usd": 1.0}, "not both"),
    ({"usd_per_point": 1.0, "confidence": 1.5}, "confidence"),
    ({"usd_per_point": 1.0, "min_points": 2}, "min_points"),
    ({"usd_per_point": 1.0, "monitor": ""}, "monitor"),
    ({"usd_per_point": 1.0, "then": object()}, "then"),
    ({"usd_per_point": 1.0, "then": []}, "then"),
    ({"usd_per_point": 1.0, "policy_kwargs": {"nope": 1}}, "policy_kwargs"),
    ({"usd_per_point": 1.0, "policy_kwargs": {"mode": "min"}}, "policy_kwargs"),
    ({"usd_per_point": 1.0, "monitor_kwargs": {"usd_per_host_hour": -1}}, "usd_per_host_hour"),
])
def test_bad_input_fails_at_construction(ns, kwargs, named):
    kwargs = {"monitor": "val_acc", **kwargs}
    with pytest.raises(ValueError, match=named):
        ns.costaware.MarginalGainStopping(**kwargs)


def test_state_dict_carries_the_policy(ns, tmp_path, clock):
    stopping = ns.costaware.MarginalGainStopping(monitor="val_acc", usd_per_point=10.0)
    ckpt = ns.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = _trainer(ns, tmp_path, [_monitor(ns, clock), stopping, ckpt], max_steps=30, logger=False)
    trainer.fit(_curve_model(ns.BoringModel, clock, _saturating))
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["callbacks"]
    key = next(k for k in state if k.startswith("MarginalGainStopping"))
    assert "val_acc" in key and len(state[key]["policy"]["metrics"]) == 6

    resumed = ns.costaware.MarginalGainStopping(monitor="val_acc", usd_per_point=10.0)
    trainer = _trainer(ns, tmp_path, [_monitor(ns, clock), resumed], max_steps=40, logger=False)
    trainer.fit(_curve_model(ns.BoringModel, clock, _saturating), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert resumed.policy.num_points == 8  # 6 before the checkpoint, 2 after
    costs = resumed.policy.state_dict()["costs_usd"]
    assert costs == sorted(costs)  # never reset on resume


def _peaked(step):
    return 0.9 - 4e-5 * (step - 50) ** 2  # best at step 50, 10 points down by step 100


@pytest.mark.parametrize("restore_best", [True, False])
def test_early_stop_restores_the_best_weights(ns, tmp_path, clock, restore_best):
    snapshots = {}
    strategy = EarlyStop(restore_best=restore_best)
    stopping = ns.costaware.MarginalGainStopping(monitor="val_acc", usd_per_point=1e6, then=strategy)
    trainer = _trainer(ns, tmp_path, [_monitor(ns, clock), stopping], max_steps=100, logger=False)
    model = _curve_model(ns.BoringModel, clock, _peaked, snapshots, noise=0.0)
    trainer.fit(model)
    assert strategy.best_step == 50
    expected = snapshots[50] if restore_best else {k: v for k, v in model.state_dict().items()}
    assert max(snapshots) > 50  # stopped (or ended) after the best, with other weights
    assert not torch.equal(snapshots[50]["layer.weight"], snapshots[max(snapshots)]["layer.weight"])
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key
    row = stopping.results[0]
    # The row describes the weights kept: the best, or the last validation's.
    assert row.metric == pytest.approx(_peaked(50) if restore_best else strategy.last_value) and row.role == "teacher"
    assert strategy.last_value < _peaked(50) - 0.01
    assert ("restored" in row.note) == restore_best


def test_latency_measurement_leaves_frozen_parts_in_eval_mode():
    from costaware.strategies.measure import latency_ms_per_example

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5), torch.nn.Linear(4, 2))
    model.train()
    model[1].eval()  # a frozen part the user keeps in eval mode
    loader = [(torch.randn(8, 4), torch.zeros(8, dtype=torch.long))]
    assert latency_ms_per_example(model, loader, split=lambda batch: batch) > 0
    assert model.training and model[0].training and not model[1].training


def test_early_stop_copies_only_what_trains():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)
    from costaware.strategies.early_stop import copy_state

    copied = copy_state(model)
    assert "0.weight" not in copied and "2.weight" in copied and "1.running_mean" in copied
    assert set(copy_state(model, copy_frozen=True)) == set(model.state_dict())
    with pytest.raises(ValueError, match="restore_best"):
        EarlyStop(restore_best="yes")


def test_preset_config(ns, tmp_path):
    from importlib import import_module
    from pathlib import Path

    class Model(ns.BoringModel):  # logs the preset's monitor
        def validation_step(self, batch, batch_idx):
            self.log("val_acc", 0.5)
            return super().validation_step(batch, batch_idx)

    preset = preset_for(ns, (Path(__file__).resolve().parents[1] / "callbacks" / "marginal_gain.yaml").read_text(),
                        tmp_path)
    cli = import_module(f"{ns.name}.cli").LightningCLI(
        Model, save_config_kwargs={"overwrite": True},
        args=["fit", f"--config={preset}", "--trainer.max_steps=2", "--trainer.limit_val_batches=1",
              f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false",
              "--trainer.callbacks.monitor_kwargs={country: USA, usd_per_host_hour: 0.1}"])
    stopping = next(c for c in cli.trainer.callbacks if type(c).__name__ == "MarginalGainStopping")
    assert isinstance(stopping, ns.costaware.MarginalGainStopping)
    assert stopping.monitor == "val_acc" and stopping.usd_per_point == 5.0
    assert isinstance(stopping.strategies[0], EarlyStop) and stopping.strategies[0].restore_best
    assert stopping.meter is stopping.own_meter  # built from monitor_kwargs
    assert cli.trainer.global_step == 2


_DDP_SCRIPT = '''
import json, os, sys
import pytorch_lightning as pl
from pytorch_lightning.demos.boring_classes import BoringModel
import costaware

class Model(BoringModel):
    def validation_step(self, batch, batch_idx):
        # Rank 1 sees a curve that learned, then went flat (not worth more); rank 0 a steep one.
        step = self.global_step
        self.log("val_acc", min(0.5, 0.1 * step) if self.global_rank == 1 else 0.002 * step)
        return super().validation_step(batch, batch_idx)

class Record(pl.Callback):
    def __init__(self, stopping, out):
        self.stopping, self.out = stopping, out
    def on_fit_end(self, trainer, pl_module):
        with open(os.path.join(self.out, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump({"step": trainer.global_step, "stopped": self.stopping.stopped_step,
                       "decided": [d.stop for d in self.stopping.decisions]}, f)

out = sys.argv[1]
stopping = costaware.MarginalGainStopping(monitor="val_acc", usd_per_point=10.0, prior=None, monitor_kwargs={
    "usd_per_host_hour": 3600.0, "cpu_tdp_w": 10, "ram_power_w": 3})  # (the fit alone: this tests the ranks)
trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=200, limit_train_batches=1000,
                     val_check_interval=4, limit_val_batches=1, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=out, callbacks=[stopping, Record(stopping, out)])
trainer.fit(Model())
'''


@pytest.mark.slow
def test_ddp_ranks_stop_together(tmp_path):
    import json
    import subprocess
    import sys

    script = tmp_path / "ddp_marginal_gain.py"
    script.write_text(_DDP_SCRIPT)
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["step"] == ranks[1]["step"] == ranks[0]["stopped"] == ranks[1]["stopped"] < 200
    assert ranks[1]["decided"][-1] and not ranks[0]["decided"][-1]  # rank 1 decided, rank 0 followed
    ledger = read_ledger(tmp_path / "lightning_logs" / "version_0" / "costaware")
    last = [e for e in ledger.events if e["name"] == "marginal_gain_decision"][-1]
    assert last["stop"] and last["reason"].startswith("another rank decided to stop")


def test_prior_argument(tmp_path):
    from costaware import MarginalGainStopping

    assert MarginalGainStopping(monitor="val_acc", usd_per_point=1.0).policy.prior is not None  # the shipped one
    assert MarginalGainStopping(monitor="val_acc", usd_per_point=1.0, prior=None).policy.prior is None
    with pytest.raises(ValueError, match="prior"):
        MarginalGainStopping(monitor="val_acc", usd_per_point=1.0, prior=str(tmp_path / "none.json"))
    with pytest.raises(ValueError, match="pass prior= directly"):
        MarginalGainStopping(monitor="val_acc", usd_per_point=1.0, policy_kwargs={"prior": None})


def test_a_prior_fitted_on_the_ledger_of_a_real_fit(pl_ns, tmp_path, clock, capsys):
    from costaware.cli import main
    from costaware.curve_prior import runs_from_ledger

    stopping = pl_ns.costaware.MarginalGainStopping(monitor="val_acc", min_gain_per_usd=100.0)
    trainer = _trainer(pl_ns, tmp_path, [_monitor(pl_ns, clock), stopping], max_steps=150, logger=False)
    trainer.fit(_curve_model(pl_ns.BoringModel, clock, lambda step: 0.002 * step))
    ledger = stopping.meter.ledger.path
    (run,) = runs_from_ledger(ledger)
    decisions = [e for e in read_ledger(ledger).events if e["name"] == "marginal_gain_decision"]
    assert list(run.costs_usd) == [d["usd"] for d in decisions] and list(run.lrs) == [d["lr"] for d in decisions]
    assert run.planned_cost_usd == pytest.approx(150 * USD_PER_STEP, rel=1e-3) and run.anneals is True
    out = tmp_path / "prior.json"
    assert main(["prior", "fit", str(ledger.parent), "-o", str(out)]) == 0
    assert "prior fitted on 1 of 1 runs" in capsys.readouterr().out
    assert pl_ns.costaware.MarginalGainStopping(monitor="val_acc", usd_per_point=1.0, prior=str(out)).policy.prior


def test_an_error_rate_s_range_reaches_a_prior_fitted_on_its_ledger(pl_ns, tmp_path, clock, capsys):
    """An error rate watched with its range given is recorded with it: `costaware prior fit` on the ledger reads it
    as the bounded metric it is (without the range it would be a loss, and the run would be left out)."""
    from costaware.cli import main
    from costaware.curve_prior import runs_from_ledger

    stopping = pl_ns.costaware.MarginalGainStopping(monitor="val_err", mode="min", min_gain_per_usd=1e-9,
                                                    policy_kwargs={"metric_range": (0, 1)})
    trainer = _trainer(pl_ns, tmp_path, [_monitor(pl_ns, clock), stopping], max_steps=150, logger=False)
    trainer.fit(_curve_model(pl_ns.BoringModel, clock, lambda step: 0.9 - 0.002 * step, name="val_err"))
    ledger = stopping.meter.ledger.path
    (policy,) = [e for e in read_ledger(ledger).events if e["name"] == "marginal_gain_policy"]
    assert policy.metric_range == [0.0, 1.0]
    (run,) = runs_from_ledger(ledger)
    assert run.mode == "min" and run.metric_range == (0.0, 1.0)
    assert main(["prior", "fit", str(ledger.parent), "-o", str(tmp_path / "prior.json")]) == 0
    assert "prior fitted on 1 of 1 runs" in capsys.readouterr().out


def test_a_run_that_completed_is_fitted_on_what_it_spent(pl_ns, tmp_path, clock, capsys):
    """The plan read from a ledger: a completed run's own spend, not the largest estimate on the way. Early steps
    that cost more (a slow start: setup, a first validation) made the largest estimate of the plan overshoot, and
    `costaware prior fit` skipped the run as stopped before its end."""
    from costaware.cli import main
    from costaware.curve_prior import runs_from_ledger

    model = _curve_model(pl_ns.BoringModel, clock, lambda step: 0.002 * step)
    steady_step = model.training_step

    def slow_start(batch, batch_idx):
        clock.advance(4.0 if model.global_step < 20 else 0.0)  # the first 20 steps cost 5x the others
        return steady_step(batch, batch_idx)

    model.training_step = slow_start
    stopping = pl_ns.costaware.MarginalGainStopping(monitor="val_acc", min_gain_per_usd=1e-9)  # never stops
    trainer = _trainer(pl_ns, tmp_path, [_monitor(pl_ns, clock), stopping], max_steps=150, logger=False)
    trainer.fit(model)
    ledger = read_ledger(stopping.meter.ledger.path)
    assert ledger.end.how == "completed"
    estimates = [e["usd"] + e["usd_to_predicted_final"] for e in ledger.events
                 if e["name"] == "marginal_gain_decision" and e.get("usd_to_predicted_final") is not None]
    assert max(estimates) > 1.2 * ledger.end.totals.usd  # the first, at the average pace, overshoots
    # The callback's plans use the pace of the later half of the fit so far: right once the slow start is behind it.
    late = [e["usd"] + e["usd_to_predicted_final"] for e in ledger.events if e["name"] == "marginal_gain_decision"
            and e.get("usd_to_predicted_final") is not None and e["step"] >= 40]
    assert late and all(u == pytest.approx(ledger.end.totals.usd, rel=0.02) for u in late)
    (run,) = runs_from_ledger(stopping.meter.ledger.path)
    assert run.planned_cost_usd == pytest.approx(ledger.end.totals.usd)
    assert main(["prior", "fit", str(stopping.meter.ledger.path.parent), "-o", str(tmp_path / "prior.json")]) == 0
    assert "prior fitted on 1 of 1 runs" in capsys.readouterr().out


@pytest.mark.parametrize("limit", ["max_epochs", "max_steps"])
def test_the_plan_of_a_fit_that_steps_two_optimizers_a_batch(pl_ns, tmp_path, clock, limit):
    """Manual optimization stepping two optimizers a batch (a GAN): global_step runs twice as fast as the batches
    that estimated_stepping_batches counts when epochs bound the fit, so the plan came out at half the run's cost
    and was gone halfway. Bound by max_steps (optimizer steps), the fit ends after half as many batches."""
    import torch

    class TwoOptimizers(pl_ns.BoringModel):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.other = torch.nn.Linear(32, 2)

        def training_step(self, batch, batch_idx):
            clock.advance(1.0)
            for optimizer, layer in zip(self.optimizers(), (self.layer, self.other)):
                optimizer.zero_grad()
                self.manual_backward(layer(batch).sum())
                optimizer.step()

        def validation_step(self, batch, batch_idx):
            self.log("val_acc", _saturating(self.global_step // 2))

        def configure_optimizers(self):
            return (torch.optim.SGD(self.layer.parameters(), lr=0.01),
                    torch.optim.SGD(self.other.parameters(), lr=0.01))

    stopping = pl_ns.costaware.MarginalGainStopping(monitor="val_acc", min_gain_per_usd=1e-9)  # never stops
    limits = {"max_epochs": 2, "max_steps": -1} if limit == "max_epochs" else {"max_steps": 100}
    cap = pl_ns.costaware.BudgetCap(max_usd=10.0)
    trainer = _trainer(pl_ns, tmp_path, [_monitor(pl_ns, clock), cap, stopping], limit_train_batches=60,
                       logger=False, val_check_interval=10, **limits)
    trainer.fit(TwoOptimizers())
    ledger = read_ledger(stopping.meter.ledger.path)
    assert ledger.end.how == "completed" and ledger.end.totals.train_batches == (120 if limit == "max_epochs" else 50)
    plans = [e["usd"] + e["usd_to_predicted_final"] for e in ledger.events
             if e["name"] == "marginal_gain_decision" and e.get("usd_to_predicted_final") is not None]
    assert len(plans) >= 2 and all(u == pytest.approx(ledger.end.totals.usd, rel=0.05) for u in plans[1:])
    forecasts = [e["basis"] for e in ledger.events if e["name"] == "forecast"]  # BudgetCap's plan, in batches
    assert forecasts and all(f" of {ledger.end.totals.train_batches:.0f} planned batches" in b for b in forecasts)
    assert ledger.end.optimizer_steps == 2 * ledger.end.totals.train_batches  # max_steps' unit, in the end record
    if limit == "max_steps":  # the report's plan from max_steps: done, not half done
        from costaware.report import build_report

        planned = build_report(stopping.meter.ledger.path)["planned"]
        assert planned["fraction_done"] == 1.0 and planned["usd_not_spent"] == 0.0


def test_the_plan_holds_when_gradient_accumulation_changes_during_the_fit(pl_ns, tmp_path, clock):
    """GradientAccumulationScheduler({0: 1, 2: 4}): Lightning's estimated_stepping_batches is counted at the
    accumulation of the moment, so from epoch 2 it planned fewer steps than were done, and the callback froze the
    plan it had then: here the later batches cost 1.5x, and every later plan stayed at the first half's pace ($0.16
    where the run spent $0.20). The share of max_epochs' batches done keeps the plan current."""
    scheduler = pl_ns.pl.callbacks.GradientAccumulationScheduler(scheduling={0: 1, 2: 4})
    stopping = pl_ns.costaware.MarginalGainStopping(monitor="val_acc", min_gain_per_usd=1e-9)  # never stops
    trainer = _trainer(pl_ns, tmp_path, [_monitor(pl_ns, clock), scheduler, stopping], max_steps=-1, max_epochs=4,
                       limit_train_batches=40, val_check_interval=10, logger=False)
    model = _curve_model(pl_ns.BoringModel, clock, lambda step: 0.002 * step)
    steady_step = model.training_step

    def slower_later(batch, batch_idx):
        clock.advance(0.5 if model.current_epoch >= 2 else 0.0)  # the later batches cost 1.5x
        return steady_step(batch, batch_idx)

    model.training_step = slower_later
    trainer.fit(model)
    ledger = read_ledger(stopping.meter.ledger.path)
    assert ledger.end.how == "completed" and ledger.end.totals.train_batches == 160
    assert ledger.end.optimizer_steps == 100 and ledger.end.totals.usd == pytest.approx(0.2, rel=0.01)
    decisions = [e for e in ledger.events if e["name"] == "marginal_gain_decision" and e.get("gain_per_usd")]
    plans = [e["usd"] + e["usd_to_predicted_final"] for e in decisions if e.get("usd_to_predicted_final") is not None]
    assert len(decisions) == len(plans) == 14  # every validation from the third, each with a plan
    assert all(u == pytest.approx(ledger.end.totals.usd, rel=0.05) for u in plans[-4:])


def test_an_error_rate_left_to_auto_is_pointed_out_once(ns, tmp_path, clock):
    """An error rate read as a loss (bounded by 0 alone) is judged without past runs: the callback says so once and
    names the range to give; with the range given, or a loss, it is quiet."""
    def error_rate(step):
        return 1.0 - 0.9 * _saturating(step)

    for monitor, metric_range, expected in (("val_err", "auto", 1), ("val_err", (0.0, 1.0), 0),
                                            ("val_loss", "auto", 0)):
        stopping = ns.costaware.MarginalGainStopping(monitor=monitor, mode="min", usd_per_point=0.01,
                                                     policy_kwargs={"metric_range": metric_range})
        trainer = _trainer(ns, tmp_path, [_monitor(ns, clock), stopping], max_steps=30)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(_curve_model(ns.BoringModel, clock, error_rate, name=monitor))
        said = [str(w.message) for w in caught if "error rate" in str(w.message)]
        assert len(said) == expected, (monitor, metric_range, said)
        if expected:
            assert f"{monitor}=" in said[0] and "policy_kwargs={'metric_range': (0, 1)}" in said[0]


def test_an_accuracy_logged_as_a_percentage_is_pointed_out_once(ns, tmp_path, clock):
    """With points_per_unit=100, a val_acc of 63.2 is 6,320 points: the price set per percentage point would be 100x
    off. The callback says so, once, and names the fix; a percentage watched with points_per_unit=1 is quiet."""
    def percent(step):
        return 100 * _saturating(step)

    for points_per_unit, expected in ((100.0, 1), (1.0, 0)):
        stopping = ns.costaware.MarginalGainStopping(monitor="val_acc", mode="max", usd_per_point=0.01,
                                                     points_per_unit=points_per_unit)
        trainer = _trainer(ns, tmp_path, [_monitor(ns, clock), stopping], max_steps=30)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(_curve_model(ns.BoringModel, clock, percent))
        said = [str(w.message) for w in caught if "percentage" in str(w.message)]
        assert len(said) == expected, said
        if expected:
            assert "val_acc=" in said[0] and "points_per_unit=1" in said[0]
