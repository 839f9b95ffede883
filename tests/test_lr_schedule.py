"""The learning-rate schedule ahead: read off a copy of a torch scheduler, checked, and turned into an area."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from costaware.curves import MarginalGainPolicy
from costaware.lr_schedule import LrArea, check_schedule, probe_schedule


def _optimizer(lr=0.1):
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()  # optimizer state (moments) exists, as mid-run
    return optimizer


def _trainer(scheduler, global_step=0, interval="step", frequency=1, max_epochs=None, plateau=False):
    config = SimpleNamespace(scheduler=scheduler, interval=interval, frequency=frequency, reduce_on_plateau=plateau)
    return SimpleNamespace(lr_scheduler_configs=[config], global_step=global_step, max_epochs=max_epochs)


def _linear_decay(optimizer, total):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1.0 - s / total))


def test_a_linear_decay_is_read_ahead_without_touching_the_real_scheduler():
    optimizer = _optimizer()
    scheduler = _linear_decay(optimizer, 1000)
    for _ in range(200):
        optimizer.step()
        scheduler.step()
    before = (scheduler.last_epoch, optimizer.param_groups[0]["lr"], scheduler.state_dict())
    schedule = probe_schedule(_trainer(scheduler, global_step=200), planned_steps=1000)
    assert (scheduler.last_epoch, optimizer.param_groups[0]["lr"]) == before[:2]
    assert scheduler.state_dict() == before[2]
    fractions, lrs = np.array(schedule).T
    assert fractions[0] == pytest.approx(0.2) and fractions[-1] == pytest.approx(1.0)
    assert np.all(np.diff(fractions) > 0) and len(schedule) <= 128
    assert lrs == pytest.approx(0.1 * (1.0 - fractions), abs=1e-9)  # the schedule's own rates, to its end


@pytest.mark.parametrize("make", [
    lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=400),
    lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=400),
    lambda o: torch.optim.lr_scheduler.SequentialLR(
        o, [torch.optim.lr_scheduler.LinearLR(o, 0.1, 1.0, 40), torch.optim.lr_scheduler.CosineAnnealingLR(o, 360)],
        milestones=[40]),
])
def test_common_schedules_are_read_as_they_will_run(make):
    optimizer = _optimizer()
    schedule = probe_schedule(_trainer(make(optimizer)), planned_steps=400)
    # The same schedule, run for real, sets the same rates.
    optimizer = _optimizer()
    scheduler, ran = make(optimizer), {}
    for step in range(401):
        ran[step] = optimizer.param_groups[0]["lr"]
        if step < 400:
            optimizer.step()
            scheduler.step()
    for fraction, lr in schedule:
        assert lr == pytest.approx(ran[round(fraction * 400)], rel=1e-9, abs=1e-12)


def test_a_schedule_stepped_per_epoch_maps_to_optimizer_steps():
    optimizer = _optimizer()
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.1)
    schedule = probe_schedule(_trainer(scheduler, interval="epoch", max_epochs=10), planned_steps=500)
    fractions, lrs = np.array(schedule).T
    assert fractions == pytest.approx(np.arange(11) / 10)
    assert lrs == pytest.approx(0.1 * 0.1 ** (np.arange(11) // 3))


def test_no_schedule_when_it_cannot_be_known_ahead():
    optimizer = _optimizer()
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
    assert probe_schedule(_trainer(plateau, plateau=True), planned_steps=100) is None
    assert probe_schedule(SimpleNamespace(lr_scheduler_configs=[], global_step=0), planned_steps=100) is None
    per_epoch = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    assert probe_schedule(_trainer(per_epoch, interval="epoch", max_epochs=-1), planned_steps=100) is None
    assert probe_schedule(_trainer(_linear_decay(optimizer, 100)), planned_steps=float("inf")) is None
    assert probe_schedule(_trainer(object()), planned_steps=100) is None  # not a scheduler: no error, no schedule


@pytest.mark.parametrize("bad, match", [
    ([[0.0, 0.1]], "at least two"),
    ([[0.0, 0.1], [0.0, 0.05]], "must increase"),
    ([[0.0, 0.1], [0.5, -1.0]], ">= 0"),
    ([[0.0, 0.1], [0.5, float("nan")]], "finite"),
    ("fast", "pairs"),
])
def test_a_bad_schedule_is_refused_with_its_name(bad, match):
    with pytest.raises(ValueError, match=match):
        check_schedule(bad)
    with pytest.raises(ValueError, match="lr_schedule"):
        MarginalGainPolicy(usd_per_point=1.0, lr_schedule=bad)


def test_the_area_follows_the_rates_and_says_nothing_for_a_constant_rate():
    schedule = check_schedule([[0.0, 1.0], [1.0, 0.0]])
    area = LrArea.of([], [], schedule, planned_cost_usd=10.0)
    assert float(area.at(10.0)) == pytest.approx(5.0, rel=1e-2)  # half the peak over the plan
    assert float(area.at(5.0)) == pytest.approx(3.75, rel=1e-2)
    assert float(area.at(12.0)) > float(area.at(10.0))  # keeps growing past the plan (a floor rate)
    constant = check_schedule([[0.0, 0.1], [1.0, 0.1]])
    assert LrArea.of([], [], constant, planned_cost_usd=10.0) is None
    assert LrArea.of([], [], schedule, planned_cost_usd=None) is None
    # Rates seen at evaluations stand for the past; the schedule for what is ahead.
    seen = LrArea.of([2.0, 4.0], [1.0, 1.0], schedule, planned_cost_usd=10.0)
    assert float(seen.at(4.0)) == pytest.approx(4.0)


def _annealed_run(n=40, plan_usd=4.0, seed=3):
    """Accuracy rising in step with the area under a linear-decay rate, with a little noise: the last stretch of
    the schedule, at a rate near zero, adds little."""
    rng = np.random.default_rng(seed)
    cost = np.linspace(plan_usd / n, plan_usd, n)
    lr = 1e-3 * (1.0 - cost / plan_usd)
    area = np.cumsum(np.diff(np.concatenate([[0.0], cost])) * lr)
    acc = 0.5 + 0.4 * area / (1e-3 * plan_usd / 2) + 0.002 * rng.standard_normal(n)
    return cost, acc, lr


def test_the_end_of_an_annealed_schedule_is_priced_as_the_little_it_adds():
    cost, acc, lr = _annealed_run()
    i = int(0.9 * len(cost)) - 1  # 90% of the plan: 1% of the area is left
    estimates = {}
    for given in (None, [(0.0, 1e-3), (1.0, 0.0)]):
        policy = MarginalGainPolicy(usd_per_point=1.0, planned_cost_usd=4.0, lr_schedule=given)
        for c, a, r in zip(cost[: i + 1], acc[: i + 1], lr[: i + 1]):
            decision = policy.observe(c, a, lr=r)
        estimates[given is not None] = decision.estimate
    # Against cost, the recent rise goes on; against the area, the next stretches add little, as they then did
    # (the rest of the plan as a whole is priced on the cost curve, as the final metric: it alone stays up).
    assert estimates[True].gain_per_usd < 0.8 * estimates[False].gain_per_usd
    # The final metric is fitted against cost either way (the area misses what annealing brings by itself).
    assert estimates[True].predicted_final == estimates[False].predicted_final
    assert estimates[True].predicted_final_high == estimates[False].predicted_final_high


def test_the_schedule_is_kept_in_the_state_and_decides_the_same_after_a_resume():
    cost, acc, lr = _annealed_run()
    first = MarginalGainPolicy(usd_per_point=1.0, planned_cost_usd=4.0, lr_schedule=[(0.0, 1e-3), (1.0, 0.0)])
    for c, a, r in zip(cost[:20], acc[:20], lr[:20]):
        first.observe(c, a, lr=r)
    state = json.loads(json.dumps(first.state_dict()))
    assert state["lr_schedule"] == [[0.0, 1e-3], [1.0, 0.0]]
    resumed = MarginalGainPolicy(usd_per_point=1.0)
    resumed.load_state_dict(state)
    for c, a, r in zip(cost[20:], acc[20:], lr[20:]):
        assert first.observe(c, a, lr=r) == resumed.observe(c, a, lr=r)
    assert math.isclose(resumed.lr_schedule[1][0], 1e-3)
