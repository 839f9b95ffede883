"""The budget arithmetic (costaware.forecast): caps, Lightning's validation schedule, decisions, forecasts."""

from __future__ import annotations

import importlib.util
import math
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from costaware.forecast import (
    CAP_UNITS,
    FORECAST_MIN_BATCHES,
    RESERVE_MARGIN,
    UNITS,
    BudgetPlanner,
    RecentCosts,
    StopPlan,
    add,
    check_caps,
    parse_duration_s,
    scale,
    validation_after,
    validations_between,
    zero,
)

REPO = Path(__file__).resolve().parent.parent


def _cost(usd: float = 0.0, **units: float) -> dict:
    return {**zero(), "usd": usd, **units}


# ---------------------------------------------------------------------------------------------
# Caps
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (timedelta(hours=1, minutes=30), 5400.0),
        (90, 90.0),
        (1.5, 1.5),
        ("00:12:00:00", 43200.0),
        ("01:00:00:01", 86401.0),
        ("3600", 3600.0),
        ({"hours": 2}, 7200.0),
    ],
)
def test_durations_parse_like_lightnings_timer(value, seconds):
    assert parse_duration_s(value) == seconds


@pytest.mark.parametrize("value", ["12 hours", "00:12:00", "1:2:3:4", {"fortnights": 1}, [1], True, -5, 0,
                                   timedelta(0), float("nan"), "inf"])
def test_bad_durations_name_the_argument(value):
    with pytest.raises(ValueError, match="max_time"):
        parse_duration_s(value)


def test_caps_from_arguments_and_dict():
    limits = check_caps({"max_usd": 5, "max_time": None}, {"kwh": 2.5, "time": "00:01:00:00", "max_flops": 1e15})
    assert limits == {"max_usd": 5.0, "max_kwh": 2.5, "max_flops": 1e15, "max_time": 3600.0}
    assert list(limits) == [c for c in CAP_UNITS if c in limits]


@pytest.mark.parametrize(
    ("explicit", "caps", "message"),
    [
        ({}, None, "no cap given: set at least one of max_usd"),
        ({"max_usd": None}, {}, "no cap given"),
        ({"max_usd": 0}, None, r"max_usd must be > 0"),
        ({"max_kwh": -1.0}, None, r"max_kwh must be > 0"),
        ({"max_usd": "five"}, None, "max_usd must be a finite number > 0, got 'five'"),
        ({"max_flops": float("inf")}, None, "max_flops must be a finite number"),
        ({"max_co2_kg": True}, None, "max_co2_kg must be a finite number"),
        ({"max_time": "soon"}, None, r"max_time='soon' is not a duration"),
        ({}, {"dollars": 5}, r"caps has an unknown key 'dollars': accepted keys are max_usd, .*usd, kwh"),
        ({}, {"usd": -2}, r"caps\['usd'\] must be > 0"),
        ({}, {"time": "tomorrow"}, r"caps\['time'\]='tomorrow' is not a duration"),
        ({"max_usd": 5}, {"usd": 6}, "cap max_usd is given twice"),
        ({}, ["usd", 5], "caps must be a dict"),
        ({"max_dollars": 5}, None, "unknown cap 'max_dollars'"),
    ],
)
def test_bad_caps_name_the_argument(explicit, caps, message):
    with pytest.raises(ValueError, match=message):
        check_caps(explicit, caps)


# ---------------------------------------------------------------------------------------------
# Lightning's validation schedule
# ---------------------------------------------------------------------------------------------


def _brute_force(first, last, nb, vcb, k):
    """Lightning's _should_check_val_fx, batch by batch."""
    count = 0
    for n in range(first + 1, last + 1):
        epoch, in_epoch = divmod(n - 1, nb)
        if k is None:
            count += n % vcb == 0
        elif (epoch + 1) % k == 0:
            count += (in_epoch + 1) % vcb == 0
    return count


@pytest.mark.parametrize(("nb", "vcb", "k"), [(32, 32, 1), (32, 10, 1), (32, 32, 2), (30, 7, 3), (32, 5, None),
                                              (10, 25, None), (1, 1, 1)])
def test_validation_schedule_matches_lightnings_rule(nb, vcb, k):
    for first, last in [(0, 200), (13, 97), (64, 65), (5, 5)]:
        assert validations_between(first, last, nb, vcb, k) == _brute_force(first, last, nb, vcb, k)
    assert [validation_after(n, nb, vcb, k) for n in range(1, 80)] == [
        _brute_force(n - 1, n, nb, vcb, k) == 1 for n in range(1, 80)]


def test_uncountable_schedules_count_nothing():
    assert validations_between(0, 100, math.inf, math.inf, 1) == 0
    assert validations_between(0, 100, 10, None, 1) == 0


# ---------------------------------------------------------------------------------------------
# Recent costs
# ---------------------------------------------------------------------------------------------


def test_recent_costs_window_max_and_mean():
    recent = RecentCosts(window=3)
    assert recent.max() is None and recent.mean() is None
    for usd in [5.0, 1.0, 2.0, 1.0, 1.0]:
        recent.add(_cost(usd))
    assert recent.max()["usd"] == 2.0  # 5 left the window
    assert recent.mean()["usd"] == pytest.approx(4.0 / 3)
    recent.add(_cost(0.5))
    assert recent.max()["usd"] == 1.0
    restored = RecentCosts(window=3)
    restored.load_state_dict(recent.state_dict())
    assert restored.max() == recent.max() and restored.mean() == pytest.approx(recent.mean())
    restored.add(_cost(0.1))
    restored.add(_cost(0.1))
    assert restored.max()["usd"] == 0.5


def test_recent_costs_rejects_a_bad_window():
    with pytest.raises(ValueError, match="window must be an int >= 1"):
        RecentCosts(0)


# ---------------------------------------------------------------------------------------------
# Decisions
# ---------------------------------------------------------------------------------------------


_NOTHING_ON_STOP = StopPlan(validation_on_stop=False, saves_on_stop=0)


def _run(planner: BudgetPlanner, costs, plan=_NOTHING_ON_STOP):
    """Feed batch costs until a stop; returns (batches run, spent usd)."""
    spent = zero()
    for i, usd in enumerate(costs, start=1):
        spent = add(spent, _cost(usd))
        planner.observe_batch(_cost(usd))
        if planner.decide(spent, plan) is not None:
            return i, spent["usd"]
    return len(costs), spent["usd"]


def test_predictive_stop_never_crosses_and_reactive_crosses_by_under_one_batch():
    steps, spent = _run(BudgetPlanner({"max_usd": 10.5}, warmup_batches=0), [1.0] * 50)
    assert (steps, spent) == (10, 10.0)
    steps, spent = _run(BudgetPlanner({"max_usd": 10.0}, warmup_batches=0), [1.0] * 50)
    assert (steps, spent) == (10, 10.0)  # exactly at the cap is within it
    steps, spent = _run(BudgetPlanner({"max_usd": 10.5}, predictive=False, warmup_batches=0), [1.0] * 50)
    assert (steps, spent) == (11, 11.0)


def test_variable_costs_use_the_largest_recent_batch_not_the_mean():
    pattern = [1.0, 1.0, 1.0, 4.0] * 20  # a long-sequence bucket every fourth batch
    for cap in [x + 0.5 for x in range(20, 40)]:
        _, spent = _run(BudgetPlanner({"max_usd": cap}, warmup_batches=0), pattern)
        assert spent <= cap
        assert cap - spent < 4.0 + 1.0  # leaves at most about one large batch unused


def test_warmup_batches_are_left_out_but_used_before_anything_else():
    planner = BudgetPlanner({"max_usd": 100.0}, warmup_batches=2)
    planner.observe_batch(_cost(30.0))
    assert planner.next_batch()["usd"] == 30.0  # only warm-up known: err high
    planner.observe_batch(_cost(20.0))
    planner.observe_batch(_cost(1.0))
    assert planner.next_batch()["usd"] == 1.0
    assert planner.mean_batch() is None  # too few for a forecast
    planner.start_session()  # a resume: warm-up again, statistics kept
    planner.observe_batch(_cost(50.0))
    assert planner.next_batch()["usd"] == 1.0


def test_stop_reserve_holds_the_final_validation_and_checkpoint():
    planner = BudgetPlanner({"max_usd": 100.0}, warmup_batches=0)
    planner.observe_batch(_cost(1.0, elapsed_s=1.0))
    planner.observe_validation(_cost(6.0))
    planner.observe_checkpoint(_cost(0.5))
    margin = 1.0 + RESERVE_MARGIN  # validation runs and saves are measured a few times only
    plan = StopPlan(validation_on_stop=True, saves_on_stop=2)
    assert planner.stop_cost(plan)["usd"] == pytest.approx(7.0 * margin)
    assert planner.ahead(plan)["usd"] == pytest.approx(1.0 + 7.0 * margin)
    scheduled = StopPlan(validation_now=True, validation_on_stop=True, saves_per_validation=1, saves_on_stop=2)
    assert planner.ahead(scheduled)["usd"] == pytest.approx(6.5 * margin + 1.0 + 7.0 * margin)
    step_saves = StopPlan(validation_on_stop=False, saves_on_stop=1, saves_now=1, saves_next=2)
    assert planner.ahead(step_saves)["usd"] == pytest.approx(0.5 * margin + 1.0 + 2 * 0.5 * margin + 0.5 * margin)
    edge = 100.0 - 1.0 - 7.0 * margin
    assert planner.decide(_cost(edge - 0.01), plan) is None
    breach = planner.decide(_cost(edge + 0.01), plan)
    assert breach.cap == "max_usd" and breach.predicted == pytest.approx(100.01)
    assert breach.reserve == pytest.approx(7.0 * margin) and breach.next_batch == 1.0


def test_validation_prior_before_one_is_measured():
    planner = BudgetPlanner({"max_usd": 100.0}, warmup_batches=0)
    planner.validation_batches = 10
    for _ in range(5):
        planner.observe_batch(_cost(1.0, flops=100.0, elapsed_s=1.0))
    assert planner.validation_cost()["usd"] == pytest.approx(10.0)  # a training batch each, erring high
    assert planner.validation_cost()["flops"] == 0.0
    assert planner.validation_cost(conservative=False)["usd"] == pytest.approx(5.0)
    # The sanity check's first batch also starts the validation (1.5 above the others' mean).
    planner.observe_sanity_check([_cost(3.0, elapsed_s=3.0, flops=7.0), _cost(2.0), _cost(1.0)])
    assert planner.validation_cost()["usd"] == pytest.approx(1.5 + 10 * 2.0)  # the largest batch, for the reserve
    assert planner.validation_cost()["flops"] == 0.0
    assert planner.validation_cost(conservative=False)["usd"] == pytest.approx(1.5 + 10 * 1.5)  # the mean
    planner.observe_validation(_cost(12.0))
    assert planner.validation_cost(conservative=False)["usd"] == 12.0  # measured: the forecast uses it
    assert planner.validation_cost()["usd"] == pytest.approx(20.0)  # the reserve keeps the sanity floor
    planner.observe_validation(_cost(25.0))
    assert planner.validation_cost()["usd"] == 25.0


def test_checkpoint_prior_is_time_at_the_training_rate():
    planner = BudgetPlanner({"max_usd": 100.0}, warmup_batches=0)
    planner.checkpoint_prior_s = 3.0
    for _ in range(3):
        planner.observe_batch(_cost(2.0, flops=1e9, elapsed_s=0.5, kwh=0.1))
    prior = planner.checkpoint_cost()
    assert prior["usd"] == pytest.approx(12.0) and prior["kwh"] == pytest.approx(0.6) and prior["flops"] == 0.0


def test_the_most_crossed_cap_is_reported():
    planner = BudgetPlanner({"max_usd": 10.0, "max_time": 100.0}, warmup_batches=0)
    planner.observe_batch(_cost(1.0, elapsed_s=20.0))
    breach = planner.decide(_cost(5.0, elapsed_s=95.0), StopPlan(validation_on_stop=False, saves_on_stop=0))
    assert breach.cap == "max_time" and breach.unit == "elapsed_s" and breach.value == 95.0


def test_headroom_in_batches():
    planner = BudgetPlanner({"max_usd": 100.0}, warmup_batches=0)
    plan = StopPlan(validation_on_stop=False, saves_on_stop=0)
    assert planner.headroom_batches(_cost(0.0), plan, math.inf) == math.inf  # nothing measured yet
    planner.observe_batch(_cost(2.0))
    assert planner.headroom_batches(_cost(50.0), plan, math.inf) == pytest.approx(25.0)
    planner.observe_validation(_cost(10.0))
    # 2 a batch, plus a validation (10, with its margin) spread over 10 batches.
    per_batch = 2.0 + 10.0 * (1 + RESERVE_MARGIN) / 10
    assert planner.headroom_batches(_cost(50.0), plan, 10) == pytest.approx(50.0 / per_batch)
    assert planner.headroom_batches(_cost(101.0), plan, 10) == 0.0


# ---------------------------------------------------------------------------------------------
# Forecasts and warnings
# ---------------------------------------------------------------------------------------------


def test_forecast_counts_batches_validations_and_saves():
    planner = BudgetPlanner({"max_usd": 100.0}, warmup_batches=1)
    planner.observe_batch(_cost(9.0))  # warm-up, left out
    assert planner.forecast(_cost(9.0), 100) is None
    for _ in range(3):
        planner.observe_batch(_cost(1.0))
    planner.observe_validation(_cost(5.0))
    planner.observe_checkpoint(_cost(0.5))
    forecast = planner.forecast(_cost(17.0), remaining_batches=96, remaining_validations=3, remaining_saves=3)
    assert forecast["usd"] == pytest.approx(17.0 + 96 + 15 + 1.5)
    assert planner.forecast(_cost(17.0), math.inf) is None


def test_milestone_warnings_once_each_and_again_for_a_new_cap():
    planner = BudgetPlanner({"max_usd": 10.0}, warmup_batches=0)
    assert planner.new_warnings(_cost(4.9)) == []
    assert planner.new_warnings(_cost(8.5)) == [("max_usd", 0.5), ("max_usd", 0.8)]
    assert planner.new_warnings(_cost(9.0)) == []
    assert planner.new_warnings(_cost(9.6)) == [("max_usd", 0.95)]
    same = BudgetPlanner({"max_usd": 10.0})
    same.load_state_dict(planner.state_dict())
    assert same.new_warnings(_cost(9.9)) == []
    larger = BudgetPlanner({"max_usd": 20.0})
    larger.load_state_dict(planner.state_dict())
    assert larger.new_warnings(_cost(10.0)) == [("max_usd", 0.5)]


def test_state_round_trip():
    planner = BudgetPlanner({"max_kwh": 1.0}, warmup_batches=0)
    for i in range(5):
        planner.observe_batch(_cost(kwh=0.01 * (i + 1)))
    planner.observe_validation(_cost(kwh=0.05))
    planner.observe_checkpoint(_cost(kwh=0.001))
    planner.validation_batches = 7
    restored = BudgetPlanner({"max_kwh": 1.0})
    restored.load_state_dict(planner.state_dict())
    assert restored.next_batch() == planner.next_batch()
    assert restored.validation_cost() == planner.validation_cost()
    assert restored.checkpoint_cost() == planner.checkpoint_cost()
    assert restored.validation_batches == 7


def test_cost_vector_helpers():
    assert set(zero()) == set(UNITS)
    assert add(_cost(1.0), _cost(2.0))["usd"] == 3.0
    assert scale(_cost(2.0), 0.5)["usd"] == 1.0


def test_benchmark_replays_the_same_decision_code():
    spec = importlib.util.spec_from_file_location("cap_precision", REPO / "benchmarks" / "cap_precision.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["cap_precision"] = bench  # dataclasses look their module up
    try:
        spec.loader.exec_module(bench)
    finally:
        del sys.modules["cap_precision"]
    assert bench.BudgetPlanner is BudgetPlanner
    for kind in bench.TARGET_KINDS:
        spec = bench.RunSpec(kind=kind, seed=1, cap_fraction=0.3)
        predictive = bench.simulate(spec, mode="predictive")
        assert predictive.final_usd <= predictive.cap_usd and predictive.used > 0.95
        assert bench.simulate(spec, mode="EarlyStopping").final_usd > predictive.cap_usd  # the baseline overshoots
    ours, _ = bench.forecast_errors(bench.RunSpec(kind="steady", seed=1, cap_fraction=0.3))
    assert ours < 0.05


def test_reactive_keeps_a_scheduled_validation_besides_the_stops():
    """Reactive, with a validation due now: not stopping runs it, and the stop after the next batch
    runs another, so both are counted (counting one lets the stop overshoot by a whole
    validation). Batches of 1, a validation of 6 after every 10 and at the stop: never more than
    one batch over any cap."""
    for cap in [c + 0.25 for c in range(20, 80)]:
        planner = BudgetPlanner({"max_usd": cap}, predictive=False, warmup_batches=0)
        planner.observe_validation(_cost(6.0))
        spent = 0.0
        for b in range(1, 200):
            spent += 1.0
            planner.observe_batch(_cost(1.0))
            plan = StopPlan(validation_now=b % 10 == 0, validation_on_stop=True)
            if planner.decide(_cost(spent), plan) is not None:
                spent += 6.0
                break
            if b % 10 == 0:
                spent += 6.0
        assert spent - cap <= 1.0, cap


def test_headroom_at_mean_costs_forecasts_where_the_stop_falls():
    """The decision bounds the next batch by the largest recent one; where the stop will fall is a forecast, at the
    mean: batches of 1 and 15 in turn spend 8 a batch, not 15 (the stop's own reserve stays the decision's)."""
    planner = BudgetPlanner({"max_usd": 1000.0}, warmup_batches=0)
    for i in range(2 * FORECAST_MIN_BATCHES):
        planner.observe_batch(_cost(1.0 if i % 2 else 15.0))
    plan = StopPlan(validation_on_stop=False, saves_on_stop=0)
    safe = planner.headroom_batches(_cost(200.0), plan, math.inf)
    forecast = planner.headroom_batches(_cost(200.0), plan, math.inf, at_mean=True)
    assert safe == pytest.approx(800.0 / 15.0)
    assert forecast == pytest.approx((800.0 - 15.0 + 8.0) / 8.0)  # the decision still stops a largest batch early
    assert planner.headroom_batches(_cost(200.0), plan, 10, at_mean=True) == pytest.approx(forecast)  # no validation


def test_headroom_spreads_step_saves_over_batches():
    planner = BudgetPlanner({"max_usd": 100.0}, warmup_batches=0)
    planner.observe_batch(_cost(2.0))
    planner.observe_checkpoint(_cost(5.0))
    plan = StopPlan(validation_on_stop=False, saves_on_stop=0)
    # One save every 10 batches: 2 + 5 x 1.2 / 10 a batch.
    assert planner.headroom_batches(_cost(50.0), plan, math.inf, 0.1) == pytest.approx(50.0 / (2.0 + 0.6))


def test_state_from_a_newer_version_is_refused():
    planner = BudgetPlanner({"max_usd": 1.0})
    state = planner.state_dict()
    assert state["version"] == 1
    BudgetPlanner({"max_usd": 1.0}).load_state_dict({k: v for k, v in state.items() if k != "version"})  # older
    with pytest.raises(ValueError, match="version 2 is newer than this costaware reads"):
        BudgetPlanner({"max_usd": 1.0}).load_state_dict({**state, "version": 2})


def test_safe_skips_only_far_from_every_cap():
    """BudgetCap skips the decision for a few batches only while even a validation and saves after
    every batch would leave twice the room; near a cap, none."""
    planner = BudgetPlanner({"max_usd": 100.0}, warmup_batches=0)
    for _ in range(5):
        planner.observe_batch(_cost(0.1))
    planner.observe_validation(_cost(1.0))
    planner.observe_checkpoint(_cost(0.2))
    plan = StopPlan(saves_per_validation=1, saves_on_stop=2)
    assert planner.safe_skips(_cost(1.0), plan, most=7) == 7
    planner.new_warnings(_cost(97.0))  # as BudgetCap does at every checked batch: 50/80/95% warned
    assert planner.safe_skips(_cost(97.0), plan, most=7) == 0
    skips = [planner.safe_skips(_cost(spent), plan, most=7) for spent in (60.0, 70.0, 80.0, 90.0, 97.0)]
    assert skips == sorted(skips, reverse=True) and any(0 < n < 7 for n in skips)  # fewer, nearer the cap


def test_safe_skips_stop_short_of_a_warning_not_given_yet():
    """Far from the cap, the skipped span still ends before the next 50/80/95% share: its warning comes at
    the batch that reaches it. Once given, that share no longer limits the span."""
    planner = BudgetPlanner({"max_usd": 100.0}, warmup_batches=0)
    for _ in range(5):
        planner.observe_batch(_cost(0.1))
    plan = StopPlan()
    assert planner.safe_skips(_cost(10.0), plan, most=7) == 7  # 400 batches from 50%
    near = [planner.safe_skips(_cost(spent), plan, most=7) for spent in (49.0, 49.5, 49.8, 49.95)]
    assert near == sorted(near, reverse=True) and near[-1] == 0, near
    assert planner.safe_skips(_cost(50.2), plan, most=7) == 0  # reached, not warned yet: check now
    assert planner.new_warnings(_cost(50.2)) == [("max_usd", 0.5)]
    assert planner.safe_skips(_cost(50.2), plan, most=7) == 7  # the next share, 80%, is far
