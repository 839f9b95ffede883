"""Tests of the marginal-gain stopping policy (costaware.curves) and its replay benchmark."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from costaware.curves import Decision, GainEstimate, MarginalGainPolicy

REPO = Path(__file__).resolve().parent.parent
BENCHMARK = REPO / "benchmarks" / "replay_curves.py"
DEBERTA = REPO.parent / "shared" / "data" / "curves" / "deberta-mnli" / "deberta-base_tuning.results.jsonl"


def _replay(policy: MarginalGainPolicy, costs, metrics) -> tuple[int | None, list[Decision]]:
    """Feeds points until the first stop; returns (stop index or None, decisions)."""
    decisions = []
    for i, (c, m) in enumerate(zip(costs, metrics)):
        d = policy.observe(c, m)
        decisions.append(d)
        if d.stop:
            return i, decisions
    return None, decisions


def _saturating(n: int = 80, noise: float = 0.0015, seed: int = 0):
    """Accuracy a - b c^-alpha, evaluated every $0.01, with evaluation noise."""
    cost_usd = 0.01 * np.arange(1, n + 1)
    clean = 0.90 - 0.02 * (cost_usd / 0.01) ** -0.8
    rng = np.random.default_rng(seed)
    return cost_usd, clean, clean + rng.normal(0.0, noise, n)


def _best_stop_cost(cost_usd, clean, usd_per_point: float) -> float:
    """Cost at which the next evaluation's true gain stops paying for itself."""
    gain_usd = usd_per_point * 100.0 * np.diff(clean)
    step_usd = np.diff(cost_usd)
    first_bad = int(np.argmax(gain_usd < step_usd))
    return float(cost_usd[first_bad])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_saturating_curve_stops_near_the_break_even_point(seed):
    cost_usd, clean, noisy = _saturating(seed=seed)
    usd_per_point = 1.0
    target = _best_stop_cost(cost_usd, clean, usd_per_point)
    # The fit alone (without a plan the policy otherwise waits up to a point's worth, tested below, and past runs
    # price the next stretch: see test_past_runs_price_the_next_stretch_without_a_plan).
    stop, decisions = _replay(MarginalGainPolicy(usd_per_point=usd_per_point, anneal_fraction=None, prior=None),
                              cost_usd, noisy)
    assert stop is not None, "a saturated curve must stop"
    # Noise and the confidence margin make it stop somewhat after break-even, never far off.
    assert 0.5 * target <= cost_usd[stop] <= 3.0 * target, (cost_usd[stop], target)
    est = decisions[-1].estimate
    assert isinstance(est, GainEstimate)
    # A quantile, not a bound on the mean: for a right-skewed gain it may lie below it.
    assert est.gain_points_upper >= 0.0 and est.gain_points >= 0.0
    assert est.gain_points_upper * usd_per_point < est.increment_usd
    assert "not worth it" in decisions[-1].reason and "$" in decisions[-1].reason


def test_higher_price_stops_later():
    cost_usd, _, noisy = _saturating(n=120, seed=3)
    stops = [_replay(MarginalGainPolicy(usd_per_point=p), cost_usd, noisy)[0] for p in (0.2, 1.0, 5.0)]
    stops = [len(cost_usd) if s is None else s for s in stops]
    assert stops[0] <= stops[1] <= stops[2]
    assert stops[0] < stops[2]


def test_still_rising_linear_curve_does_not_stop():
    cost_usd = 0.01 * np.arange(1, 61)
    rng = np.random.default_rng(0)
    acc = 0.5 + 0.004 * np.arange(60) + rng.normal(0.0, 0.001, 60)  # +0.4 points per $0.01
    stop, decisions = _replay(MarginalGainPolicy(usd_per_point=1.0), cost_usd, acc)
    assert stop is None
    assert decisions[-1].estimate.gain_points > 0.2


@pytest.mark.parametrize("margin, most_stopped", [(1.5, 0.25), (2.0, 0.0)])
def test_a_steady_rise_worth_more_than_it_costs_is_rarely_stopped(margin, most_stopped):
    """A straight rise worth 1.5x / 2x its cost, 0.2 points of noise, 30 noise draws: few stops.

    Early in a run the curve fit leans towards saturating shapes (what most real curves do), so
    the mean of its gain falls below the truth and, re-judged at every evaluation, stops a run
    like this sooner or later. Weighing the gain's 80% quantile is what keeps it going (1 of the 30
    runs at 1.5x is stopped); weighing the mean stopped 27.
    """
    stopped = 0
    for seed in range(30):
        rng = np.random.default_rng(seed)
        steps = np.arange(5, 150, 5)  # an evaluation every 5 steps of $0.001: 0.5 points an evaluation pay for it
        acc = 0.001 * margin * steps + rng.normal(0.0, 0.002, steps.size)
        policy = MarginalGainPolicy(min_gain_per_usd=100.0, planned_cost_usd=0.15)
        stop, _ = _replay(policy, 0.001 * steps, acc)
        stopped += stop is not None
    assert stopped <= most_stopped * 30, stopped


def test_the_evaluation_noise_pools_the_fit_window_with_the_whole_run():
    """The next evaluations are priced with the scatter where the curve is fitted, pooled with the whole run's
    as two more evaluations would be: a quiet plateau after a noisy start (a high learning rate early) is not
    priced as a lottery ticket. A window of fewer than 8 evaluations cannot measure its own scatter: there the
    whole run's stays the floor (as it does for the final metric's interval)."""
    from costaware.curves import _fit_ensemble

    x = np.linspace(0.5, 1.0, 12)
    u = 85.0 + 0.1 * np.random.default_rng(0).standard_normal(12)  # points: a plateau scattering 0.1
    own = _fit_ensemble(x, u).noise_points
    pooled = _fit_ensemble(x, u, 1.0, history_weight_evals=2.0).noise_points
    assert own < 0.2 and pooled == pytest.approx(math.sqrt((9 * own**2 + 2 * 1.0**2) / (9 + 2)))  # 9 dof, 2 more
    assert _fit_ensemble(x, u, 1.0).noise_points == pytest.approx(1.0)
    assert _fit_ensemble(x[-5:], u[-5:], 1.0, history_weight_evals=2.0).noise_points == pytest.approx(1.0)


def test_a_run_below_its_curve_is_priced_lower_while_the_learning_rate_anneals(monkeypatch):
    """The last three evaluations' deviation from the fitted curve carries over, in part, to the next ones (a curve
    flattening sooner than the fit says): a run that has sat below its curve is priced lower than the curve alone
    prices it, one above it higher. At a constant learning rate a dip mean-reverts: nothing carries."""
    import costaware.curves as curves

    n = 40
    costs = 0.01 * np.arange(1, n + 1)
    acc = 0.9 - 0.2 * np.exp(-costs / 0.1) + 0.001 * np.sin(7.0 * np.arange(n))

    def estimate(shift: float, anneals: bool):
        policy = MarginalGainPolicy(usd_per_point=1.0, planned_cost_usd=0.8, anneals=anneals, prior=None)
        metrics = acc.copy()
        metrics[-3:] += shift  # 0.3 points off a curve scattering 0.1
        lrs = np.linspace(1e-3, 5e-4, n) if anneals else np.full(n, 1e-3)
        for c, m, lr in zip(costs, metrics, lrs):
            decision = policy.observe(float(c), float(m), lr=float(lr))
        return decision.estimate

    below, above, flat = estimate(-0.003, True), estimate(+0.003, True), estimate(-0.003, False)
    monkeypatch.setattr(curves, "_RESIDUAL_CARRY", 0.0)
    below_curve, above_curve = estimate(-0.003, True), estimate(+0.003, True)
    assert below.gain_points_upper < 0.5 * below_curve.gain_points_upper
    assert above.gain_points_upper > 1.2 * above_curve.gain_points_upper
    # The stated final metric carries it too: one curve behind both figures.
    assert below.predicted_final < below_curve.predicted_final and above.predicted_final > above_curve.predicted_final
    assert flat == estimate(-0.003, False)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_metric_stops_at_once(bad):
    policy = MarginalGainPolicy(usd_per_point=100.0)
    for i in range(5):
        assert not policy.observe(0.01 * (i + 1), 0.6 + 0.05 * i).stop
    decision = policy.observe(0.06, bad)
    assert decision.stop and "diverged" in decision.reason and decision.estimate is None


def test_nan_before_min_points_stops_too():
    policy = MarginalGainPolicy(usd_per_point=100.0, min_points=10)
    assert policy.observe(0.01, float("nan")).stop


def test_collapse_is_detected():
    policy = MarginalGainPolicy(usd_per_point=100.0)
    acc = [0.70, 0.75, 0.78, 0.80, 0.34, 0.33, 0.35, 0.33]
    stop, decisions = _replay(policy, 0.01 * np.arange(1, 9), acc)
    assert stop == 6
    assert decisions[-1].reason.startswith("collapse")
    # A single glitch is not a collapse.
    policy = MarginalGainPolicy(usd_per_point=100.0)
    stop, _ = _replay(policy, 0.01 * np.arange(1, 9), [0.70, 0.75, 0.78, 0.80, 0.34, 0.33, 0.81, 0.82])
    assert stop is None


def test_a_fall_back_to_chance_is_a_collapse_after_two_evaluations():
    """With a baseline, two evaluations back at chance are enough (a diverged classifier); one is not, nor are two
    that fell far but stayed above chance."""
    cost_usd = 0.01 * np.arange(1, 9)
    stop, decisions = _replay(MarginalGainPolicy(usd_per_point=100.0, baseline=0.33), cost_usd,
                              [0.70, 0.75, 0.78, 0.80, 0.34, 0.33, 0.35, 0.33])
    assert stop == 5 and "back at chance" in decisions[-1].reason
    stop, _ = _replay(MarginalGainPolicy(usd_per_point=100.0, baseline=0.33), cost_usd,
                      [0.70, 0.75, 0.78, 0.80, 0.34, 0.79, 0.81, 0.82])
    assert stop is None
    stop, decisions = _replay(MarginalGainPolicy(usd_per_point=100.0, baseline=0.33), cost_usd,
                              [0.70, 0.75, 0.78, 0.80, 0.45, 0.44, 0.45, 0.44])
    assert stop == 6 and "back at chance" not in decisions[-1].reason  # 35 points down, three times: the old rule
    # A run that never got collapse_points above its baseline is judged by the fit, not as fallen.
    stop, decisions = _replay(MarginalGainPolicy(usd_per_point=100.0, baseline=0.33), cost_usd,
                              [0.40, 0.45, 0.48, 0.50, 0.34, 0.33, 0.34, 0.33])
    assert not any("back at chance" in d.reason for d in decisions)


def test_collapse_is_judged_against_the_runs_own_scatter():
    """A percentage logged with points_per_unit=100 scatters by 100+ points between evaluations: a dip of that
    size three times in a row is its noise, not a collapse; its fall to chance still is one."""
    rng = np.random.default_rng(0)
    percent = 100 * (0.80 - 0.3 * np.exp(-np.arange(1, 21) / 4.0)) + rng.normal(0.0, 1.0, 20)
    percent[14:17] = percent[:14].max() - 1.5  # 150 points below the best, three evaluations running
    policy = MarginalGainPolicy(usd_per_point=100.0, planned_cost_usd=1.0)
    _, decisions = _replay(policy, 0.01 * np.arange(1, 21), list(percent))
    assert not any(d.reason.startswith("collapse") for d in decisions)
    fallen = list(percent[:14]) + [33.0, 34.0, 33.5]
    policy = MarginalGainPolicy(usd_per_point=100.0, planned_cost_usd=1.0)
    stop, decisions = _replay(policy, 0.01 * np.arange(1, 18), fallen)
    assert stop == 16 and decisions[-1].reason.startswith("collapse")
    # A noisy SSL probe (ssl-123 of benchmarks/curves/digits.jsonl): 25 points down for three evaluations, then it
    # went on to 0.84. Its scatter before the dip was as large: it was stopped here, 8.4 points short.
    ssl = [0.206, 0.082, 0.420, 0.412, 0.276, 0.362, 0.655, 0.737, 0.764, 0.670, 0.673, 0.719, 0.491, 0.451, 0.509]
    policy = MarginalGainPolicy(usd_per_point=10.0, planned_cost_usd=0.4)
    _, decisions = _replay(policy, 0.01 * np.arange(1, 16), ssl)
    assert not any(d.reason.startswith("collapse") for d in decisions)


def test_declining_run_stops_soon_after_min_points():
    cost_usd = 0.01 * np.arange(1, 40)
    acc = 0.82 - 0.004 * np.arange(39)  # overfitting / too high a learning rate
    stop, _ = _replay(MarginalGainPolicy(usd_per_point=5.0, start_fraction=None, anneal_fraction=None), cost_usd, acc)
    assert stop is not None and stop <= 6
    # Without a plan, where its schedule stands is unknown: the fit is trusted once a point's worth is spent.
    stop, decisions = _replay(MarginalGainPolicy(usd_per_point=0.1, start_fraction=None), cost_usd, acc)
    assert stop is not None and 0.1 <= cost_usd[stop] < 0.11 + 1e-9
    assert decisions[5].reason.startswith("waiting for the annealing to an end not planned until $0.1 ")


def test_run_that_has_not_started_learning_gets_a_priced_wait():
    # A loss stuck at its first value (a plateau before learning), then a break-out.
    cost_usd = 0.1 * np.arange(1, 51)
    steps = np.arange(50)
    noise = np.random.default_rng(0).normal(0.0, 0.002, 50)
    loss = 7.0 - 0.1 * np.sqrt(np.maximum(steps - 14, 0)) + noise
    # Without the wait the flat start looks converged and the run is stopped.
    stop, _ = _replay(MarginalGainPolicy(mode="min", usd_per_point=1.0, start_fraction=None), cost_usd, loss)
    assert stop is not None and stop < 15
    # 1% of 7.0 is 7 points, worth $7 at $1/point: more than the plateau costs ($1.5).
    stop, decisions = _replay(MarginalGainPolicy(mode="min", usd_per_point=1.0), cost_usd, loss)
    assert stop is None or stop > 15
    assert decisions[5].reason.startswith("not started learning")
    assert decisions[15].reason.startswith("started learning")
    # At $0.02/point the wait is worth only $0.14: the flat run is stopped soon after it.
    stop, decisions = _replay(MarginalGainPolicy(mode="min", usd_per_point=0.02), cost_usd, loss)
    assert stop is not None and cost_usd[stop] >= 0.14 and stop < 15


def _stuck_at_chance(n: int = 60):
    """A diverged 3-class classifier: it predicts one class, so its accuracy is one class's share."""
    shares = np.array([0.318, 0.327, 0.354])
    return 0.05 * np.arange(1, n + 1), shares[np.random.default_rng(3).integers(0, 3, n)]


def test_a_baseline_stops_a_run_that_never_learns_once_its_priced_wait_is_over():
    cost_usd, acc = _stuck_at_chance()  # planned end: $3.00
    # Without a baseline, jumps between class shares look like noise around a plateau that may
    # still yield a lucky best: the run goes on well past the baseline's priced wait below ($0.177).
    stop, _ = _replay(MarginalGainPolicy(prior=None, usd_per_point=0.5, planned_cost_usd=3.0), cost_usd, acc)
    assert stop is None or cost_usd[stop] >= 0.5
    # With the majority share as baseline it has not started: it waits 1% of 35.4 = 0.354 points, worth $0.177 at
    # $0.5/point; with no past runs to ask whether it will start, as long as the annealing wait (1 point, $0.50,
    # before half the plan), then stops.
    policy = MarginalGainPolicy(prior=None, usd_per_point=0.5, planned_cost_usd=3.0, baseline=0.354)
    stop, decisions = _replay(policy, cost_usd, acc)
    assert stop is not None and 0.5 <= cost_usd[stop] < 0.5 + 0.05
    assert decisions[2].reason.startswith("not started learning") and "the baseline 0.354" in decisions[2].reason
    assert "with no past runs to say whether it will start" in decisions[5].reason  # $0.30
    assert decisions[-1].reason.startswith("not learning: the best, 0.354,")
    assert "(waited up to $0.5)" in decisions[-1].reason
    # The same start from chance that breaks out before the wait is over learns on.
    rising = np.concatenate([acc[:2], 0.40 + 0.4 * (1.0 - np.exp(-0.2 * np.arange(58)))])
    stop, decisions = _replay(MarginalGainPolicy(prior=None, usd_per_point=0.5, planned_cost_usd=3.0, baseline=0.354),
                              cost_usd, rising)
    assert not any(d.reason.startswith("not learning") for d in decisions)
    assert stop is None or cost_usd[stop] > 0.5
    # A run that starts above the baseline is judged exactly as without one.
    cost_usd, acc = _anneal_curve()
    with_baseline = _replay(MarginalGainPolicy(prior=None, usd_per_point=0.5, planned_cost_usd=2.0, baseline=0.354),
                            cost_usd, acc)
    without = _replay(MarginalGainPolicy(prior=None, usd_per_point=0.5, planned_cost_usd=2.0), cost_usd, acc)
    assert [d.reason for d in with_baseline[1]] == [d.reason for d in without[1]]


def test_without_past_runs_a_run_at_chance_waits_as_long_as_the_annealing_wait():
    # From scratch on 10 classes, no plan and no prior (nothing to say whether it will start): at chance (one class's
    # share, the majority's 0.104 at most) until $2.10, then it learns. The start threshold alone (1% of 10.4 points,
    # worth $0.31 at $3/point) stopped it at $0.40.
    cost_usd = 0.1 * np.arange(1, 61)
    flat = np.array([0.096, 0.1, 0.104])[np.random.default_rng(7).integers(0, 3, 60)]
    acc = flat + 0.8 * (1.0 - np.exp(-0.15 * np.clip(np.arange(60) - 20, 0, None)))
    stop, decisions = _replay(MarginalGainPolicy(prior=None, usd_per_point=3.0, baseline=0.104), cost_usd, acc)
    assert not any(d.reason.startswith("not learning") for d in decisions)
    assert stop is None or acc[stop] > 0.8, (stop, decisions[-1].reason)
    assert "with no past runs to say whether it will start" in decisions[10].reason
    # One that never starts stops once one point's worth ($3.00) is spent.
    stop, decisions = _replay(MarginalGainPolicy(prior=None, usd_per_point=3.0, baseline=0.104), cost_usd, flat)
    assert stop is not None and 3.0 <= cost_usd[stop] < 3.1 and decisions[-1].reason.startswith("not learning")


def test_a_baseline_for_a_loss_is_a_ceiling():
    # Cross-entropy of 3 balanced classes without learning: log(3) = 1.0986.
    cost_usd = 0.05 * np.arange(1, 41)
    loss = 1.1 + np.random.default_rng(1).normal(0.0, 0.003, 40)
    stop, decisions = _replay(MarginalGainPolicy(mode="min", usd_per_point=0.5, baseline=math.log(3)), cost_usd, loss)
    # 1% of 109.9 points is 1.1 points, worth $0.55: the wait, then the stop.
    assert stop is not None and 0.55 <= cost_usd[stop] < 0.55 + 0.05
    assert decisions[-1].reason.startswith("not learning")


def _anneal_curve():
    """A linearly annealed run: a noisy plateau at a high learning rate, then the annealing gain."""
    cost_usd = 0.05 * np.arange(1, 41)  # planned end: $2.00
    noise = np.random.default_rng(5).normal(0.0, 0.003, 40)
    acc = 0.82 + 0.04 * np.clip((np.arange(40) - 12) / 27, 0.0, 1.0) ** 2 + noise
    return cost_usd, acc


def test_a_planned_run_waits_for_its_annealing_up_to_what_it_is_worth():
    cost_usd, acc = _anneal_curve()
    # Without the wait, the plateau looks converged and the run stops before $0.5.
    no_wait = MarginalGainPolicy(prior=None, usd_per_point=0.5, planned_cost_usd=2.0, anneal_fraction=None)
    stop, _ = _replay(no_wait, cost_usd, acc)
    assert stop is not None and cost_usd[stop] < 0.5
    # With it, the fit is not trusted before min(50% of $2, 1 point x $0.5/point) = $0.5.
    policy = MarginalGainPolicy(prior=None, usd_per_point=0.5, planned_cost_usd=2.0)
    stop, decisions = _replay(policy, cost_usd, acc)
    assert stop is not None and cost_usd[stop] >= 0.5 - 1e-12
    assert any(d.reason.startswith("waiting for the annealing") for d in decisions)
    # Cheap points make the wait short: 1 point at $0.05 pays for $0.05 of waiting.
    cheap = MarginalGainPolicy(prior=None, usd_per_point=0.05, planned_cost_usd=2.0)
    stop, decisions = _replay(cheap, cost_usd, acc)
    assert stop is not None and cost_usd[stop] < 0.2
    assert not any(d.reason.startswith("waiting") for d in decisions)
    # Without a plan, where the schedule stands is unknown: the same wait, up to a point's worth.
    stop, decisions = _replay(MarginalGainPolicy(prior=None, usd_per_point=0.5), cost_usd, acc)
    assert stop is None or cost_usd[stop] >= 0.5 - 1e-12
    assert any(d.reason.startswith("waiting for the annealing to an end not planned") for d in decisions)
    # Nor at a constant learning rate: the run is judged on the fit alone, as without the wait.
    constant = MarginalGainPolicy(prior=None, usd_per_point=0.5, planned_cost_usd=2.0, anneals=False)
    fresh_no_wait = MarginalGainPolicy(prior=None, usd_per_point=0.5, planned_cost_usd=2.0, anneal_fraction=None)
    assert _replay(constant, cost_usd, acc)[0] == _replay(fresh_no_wait, cost_usd, acc)[0]
    # The flag can change between evaluations (the callback passes it at each one).
    late = MarginalGainPolicy(prior=None, usd_per_point=0.5, planned_cost_usd=2.0)
    assert late.observe(cost_usd[0], acc[0], anneals=False) and late.anneals is False


def test_nan_points_in_history_are_survivable():
    policy = MarginalGainPolicy(usd_per_point=1.0, min_points=3)
    policy.load_state_dict({"costs_usd": [0.01, 0.02, 0.03], "metrics": [0.5, float("nan"), 0.6]})
    decision = policy.observe(0.04, 0.62)
    assert isinstance(decision, Decision)


@pytest.mark.parametrize("min_points", [3, 5, 8])
def test_min_points_is_respected(min_points):
    policy = MarginalGainPolicy(usd_per_point=1e-6, min_points=min_points)  # a point is worthless
    stop, decisions = _replay(policy, 0.01 * np.arange(1, 20), [0.8] * 19)
    assert stop == min_points - 1
    assert all(d.estimate is None for d in decisions[:-1])


def test_mode_min_mirrors_mode_max():
    cost_usd, _, noisy = _saturating(seed=4)
    # The not-started test is relative to the metric's magnitude (not mirror-symmetric): off.
    fit_alone = {"usd_per_point": 1.0, "start_fraction": None, "anneal_fraction": None, "prior": None}
    stop_max, dec_max = _replay(MarginalGainPolicy(mode="max", **fit_alone), cost_usd, noisy)
    loss = 3.0 - noisy  # the same curve as a loss to minimise
    stop_min, dec_min = _replay(MarginalGainPolicy(mode="min", **fit_alone), cost_usd, loss)
    assert stop_max == stop_min is not None
    assert dec_min[-1].estimate.gain_points == pytest.approx(dec_max[-1].estimate.gain_points, rel=1e-6, abs=1e-9)
    assert dec_min[-1].estimate.predicted_final == pytest.approx(3.0 - dec_max[-1].estimate.predicted_final)


def test_mode_min_still_falling_loss_does_not_stop():
    cost_usd = 0.05 * np.arange(1, 41)
    loss = 4.0 - 0.03 * np.arange(40)  # -3 points per evaluation
    stop, _ = _replay(MarginalGainPolicy(mode="min", usd_per_point=1.0), cost_usd, loss)
    assert stop is None


def test_min_gain_per_usd_is_the_same_knob():
    cost_usd, _, noisy = _saturating(seed=5)
    a = _replay(MarginalGainPolicy(usd_per_point=2.0), cost_usd, noisy)[0]
    b = _replay(MarginalGainPolicy(min_gain_per_usd=0.5), cost_usd, noisy)[0]
    assert a == b


def test_planned_cost_caps_the_increment_and_sets_the_final_prediction():
    cost_usd, _, noisy = _saturating(n=30, seed=6)
    policy = MarginalGainPolicy(usd_per_point=1e3, planned_cost_usd=0.30)
    _, decisions = _replay(policy, cost_usd[:20], noisy[:20])
    est = decisions[-1].estimate
    assert est.usd_to_predicted_final == pytest.approx(0.10)
    assert est.increment_usd <= 0.10 + 1e-12
    assert 0.85 < est.predicted_final < 0.95
    at_end = policy.observe(0.30, 0.9)  # at the plan's end it judges without the plan
    assert at_end.estimate is not None and at_end.estimate.usd_to_predicted_final is None


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"mode": "maximize"}, "mode"),
        ({"usd_per_point": 0}, "usd_per_point"),
        ({"usd_per_point": -1.0}, "usd_per_point"),
        ({"usd_per_point": float("nan")}, "usd_per_point"),
        ({"min_gain_per_usd": 0.0}, "min_gain_per_usd"),
        ({"usd_per_point": 1.0, "min_gain_per_usd": 1.0}, "min_gain_per_usd"),
        ({"confidence": 1.0}, "confidence"),
        ({"confidence": 0}, "confidence"),
        ({"min_points": 2}, "min_points"),
        ({"min_points": 4.5}, "min_points"),
        ({"points_per_unit": 0}, "points_per_unit"),
        ({"increment_fraction": -0.1}, "increment_fraction"),
        ({"fit_fraction": 0.0}, "fit_fraction"),
        ({"planned_cost_usd": -5.0}, "planned_cost_usd"),
        ({"collapse_points": 0}, "collapse_points"),
        ({"start_fraction": -0.1}, "start_fraction"),
        ({"anneal_fraction": 1.5}, "anneal_fraction"),
        ({"anneal_fraction": 0}, "anneal_fraction"),
        ({"anneal_points": -1.0}, "anneal_points"),
        ({"anneals": "yes"}, "anneals"),
        ({"baseline": "chance"}, "baseline"),
        ({"baseline": float("nan")}, "baseline"),
        ({"baseline": 0.33, "start_fraction": None}, "baseline"),
        ({"n_samples": 4}, "n_samples"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        MarginalGainPolicy(**kwargs)


@pytest.mark.parametrize("cost", [float("nan"), -1.0])
def test_bad_cost_raises(cost):
    with pytest.raises(ValueError, match="cost_usd"):
        MarginalGainPolicy().observe(cost, 0.5)


def test_cost_going_backwards_raises():
    policy = MarginalGainPolicy()
    policy.observe(1.0, 0.5)
    with pytest.raises(ValueError, match="cost_usd"):
        policy.observe(0.5, 0.6)


def test_state_dict_round_trip_gives_identical_decisions():
    cost_usd, _, noisy = _saturating(n=60, seed=7)
    first = MarginalGainPolicy(usd_per_point=1.0, planned_cost_usd=0.6)
    for c, m in zip(cost_usd[:15], noisy[:15]):
        first.observe(c, m)
    state = json.loads(json.dumps(first.state_dict()))  # must survive a checkpoint as plain data
    resumed = MarginalGainPolicy(usd_per_point=1.0)
    resumed.load_state_dict(state)
    assert resumed.num_points == 15 and resumed.planned_cost_usd == pytest.approx(0.6)
    for c, m in zip(cost_usd[15:], noisy[15:]):
        assert first.observe(c, m) == resumed.observe(c, m)


def test_observe_with_100_points_fits_and_does_not_stop_at_a_high_price():
    # (How fast a decision is, is measured by benchmarks/replay_curves.py, not here.)
    cost_usd, _, noisy = _saturating(n=100, seed=8)
    policy = MarginalGainPolicy(usd_per_point=1e3)
    policy.load_state_dict({"costs_usd": list(cost_usd[:99]), "metrics": list(noisy[:99])})
    decision = policy.observe(cost_usd[99], noisy[99])
    assert not decision.stop and decision.estimate is not None
    assert decision.estimate.curve_usd[0] >= 0.4 * cost_usd[99]  # only the recent half is fitted


def test_a_plan_estimated_too_low_does_not_switch_the_policy_off():
    cost_usd, _, noisy = _saturating(n=40, seed=3)
    policy = MarginalGainPolicy(usd_per_point=1e-3, planned_cost_usd=float(cost_usd[9]))
    decisions = [policy.observe(c, m) for c, m in zip(cost_usd, noisy)]
    assert any(d.stop for d in decisions[10:])
    assert not any(d.reason == "planned end reached" for d in decisions)


def test_an_evaluation_before_any_spend_is_left_off_the_fit():
    cost_usd, _, noisy = _saturating(n=12, seed=4)
    with_zero = MarginalGainPolicy(usd_per_point=1.0)
    with np.errstate(divide="raise", invalid="raise"):
        decisions = [with_zero.observe(c, m) for c, m in zip([0.0, *cost_usd], [0.3, *noisy])]
    assert decisions[-1].estimate is not None and math.isfinite(decisions[-1].estimate.gain_points)


def test_a_newer_state_is_refused():
    with pytest.raises(ValueError, match="newer"):
        MarginalGainPolicy(usd_per_point=1.0).load_state_dict({"version": 99, "costs_usd": [], "metrics": []})


# ---------------------------------------------------------------------- replay benchmark
def _benchmark_module():
    spec = importlib.util.spec_from_file_location("replay_curves", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules["replay_curves"] = module
    spec.loader.exec_module(module)
    return module


def test_the_replays_team_prior_is_fitted_on_the_runs_it_is_given_and_skips_a_loss():
    """A team's own prior (the replay's last line per set) learns from the tune half alone: runs that all rise
    late give a prior in which a run at chance early gains more than in one fitted on runs that never start."""
    rc = _benchmark_module()
    t = np.linspace(0.05, 1.0, 20)

    def run(i: int, rises: bool) -> object:
        acc = 0.1 + (0.8 / (1.0 + np.exp(-(t - 0.5) * 20.0)) if rises else 0.0) + 0.002 * np.sin(i + 7 * t)
        return rc.Run(f"r{i}", "max", 10.0 * t, acc, 10.0, 0.1)

    late = rc.team_prior([run(i, True) for i in range(20)])
    never = rc.team_prior([run(i, False) for i in range(20)])
    cell = (1, "unknown", 0, 0)  # 10-25% of the plan, no learning rates, at chance, flat
    assert late.gain_mean(cell) > 0.5 > 0.05 > never.gain_mean(cell)
    loss = rc.Run("l", "min", np.arange(1.0, 6.0), np.array([3.0, 2.5, 2.2, 2.1, 2.05]), 5.0)
    assert rc.team_prior([loss]) is None


def test_a_generic_records_metric_range_reaches_the_replayed_policy_and_the_team_prior():
    """An error rate (mode min) is bounded only where the record says so ("auto" bounds a loss by 0 alone): the
    replay once dropped the record's metric_range, so such a set was replayed as an unbounded loss."""
    rc = _benchmark_module()
    record = {"id": "e", "mode": "min", "metric_range": [0.0, 1.0], "planned_cost_usd": 5.0, "baseline": 0.5,
              "points": [[c, 0.5 - 0.08 * c] for c in (1.0, 2.0, 3.0, 4.0, 5.0)]}
    run = rc.run_from_generic(record)
    assert run.metric_range == (0.0, 1.0)
    assert rc.policy_for(run, {"usd_per_point": 1.0}, run.planned_cost_usd).metric_range == (0.0, 1.0)
    assert rc.policy_for(rc.run_from_generic({**record, "metric_range": None}), {"usd_per_point": 1.0},
                         5.0).metric_range == "auto"
    t = np.linspace(0.05, 1.0, 20)
    runs = [rc.run_from_generic({**record, "id": f"e{i}", "points": [[10.0 * x, 0.5 - 0.4 * x + 0.001 * i]
                                                                      for x in t]}) for i in range(5)]
    assert rc.team_prior(runs) is not None  # bounded by its range: a prior is fitted
    assert rc.team_prior([replace(r, metric_range=None) for r in runs]) is None  # a loss without bounds: none
    # Such a file gets a note: a mode-min record in [0, 1] without a range may be an error rate.
    unmarked = {k: v for k, v in record.items() if k != "metric_range"}
    loss_above_one = {**unmarked, "points": [[1.0, 2.3], [2.0, 0.9]]}
    assert rc.looks_like_error_rates([record, unmarked, loss_above_one, {**unmarked, "mode": "max"}]) == 1


def test_a_percentage_replays_as_the_same_accuracy_given_its_points_per_unit():
    """A record in percent with points_per_unit 1 and its range scores and decides as the same run in [0, 1]; a
    file that looks like percentages read as fractions is counted, so the replay can say so."""
    rc = _benchmark_module()
    acc = [0.62, 0.70, 0.78, 0.82, 0.84, 0.85, 0.855, 0.86]
    base = {"id": "p", "mode": "max", "planned_cost_usd": 8.0, "baseline": 0.62}
    fraction = rc.run_from_generic({**base, "points": [[i + 1.0, a] for i, a in enumerate(acc)]})
    percent = {**base, "baseline": 62.0, "points_per_unit": 1, "metric_range": [0, 100],
               "points": [[i + 1.0, 100 * a] for i, a in enumerate(acc)]}
    run = rc.run_from_generic(percent)
    assert run.points_per_unit == 1.0 and np.allclose(run.points, fraction.points)
    assert rc.run_learns(run) and rc.score(run, 3) == pytest.approx(rc.score(fraction, 3))
    for price in (0.01, 1.0):
        kwargs = {"usd_per_point": price}
        assert rc.policy_stop_index(run, kwargs)[0] == rc.policy_stop_index(fraction, kwargs)[0]
    with pytest.raises(ValueError, match="points_per_unit must be a positive number"):
        rc.run_from_generic({**percent, "points_per_unit": 0})
    as_fractions = {k: v for k, v in percent.items() if k not in ("points_per_unit", "metric_range")}
    assert rc.looks_like_percentages([percent, as_fractions, {**base, "points": [[1.0, 0.5]]},
                                      {**as_fractions, "mode": "min"}]) == 1


def test_the_mean_loss_oracle_puts_the_allowed_loss_where_it_saves_most():
    """The bound for a mean-loss target: a run that loses 0.6 points by stopping at once and a flat one both stop at
    once (mean 0.3), where an oracle allowed 0.3 points on every run keeps the first to its end."""
    rc = _benchmark_module()
    costs = np.arange(1.0, 11.0)
    rising = rc.Run("a", "max", costs, np.r_[0.800, np.full(9, 0.806)])
    flat = rc.Run("b", "max", costs, np.full(10, 0.800))
    assert [rc.oracle_stop_index(r, 0.3) for r in (rising, flat)] == [1, 0]
    assert rc.mean_loss_oracle_stop_indices([rising, flat], 0.3) == [0, 0]
    assert rc.mean_loss_oracle_stop_indices([rising, flat], 0.1) == [1, 0]


def test_a_degraded_record_keeps_every_kth_evaluation_and_its_last_and_drops_its_plan():
    rc = _benchmark_module()
    record = {"id": "r", "mode": "max", "planned_cost_usd": 5.0, "baseline": 0.1,
              "points": [[c, 0.1 * c, 1e-3 / c] for c in (1.0, 2.0, 3.0, 4.0, 5.0)]}
    assert [p[0] for p in rc.degraded(record, every=2)["points"]] == [2.0, 4.0, 5.0]
    assert [p[0] for p in rc.degraded(record, every=5)["points"]] == [5.0]
    bare = rc.degraded(record, every=3, no_plan=True)
    assert bare["points"] == [[3.0, 0.1 * 3.0], [5.0, 0.1 * 5.0]] and "planned_cost_usd" not in bare
    assert bare["baseline"] == 0.1 and record["planned_cost_usd"] == 5.0 and len(record["points"]) == 5
    run = rc.run_from_generic(bare)
    assert run.planned_cost_usd is None and run.lrs is None
    assert rc.degraded(record) == record
    with_lr = rc.run_from_generic(rc.degraded(record, no_plan=True, keep_lr=True))  # a scheduler, no planned end
    assert with_lr.planned_cost_usd is None and with_lr.lrs is not None and len(with_lr.lrs) == 5


def test_a_noisy_record_draws_its_noise_once_per_run_and_keeps_an_accuracy_in_its_range():
    rc = _benchmark_module()
    record = {"id": "r", "mode": "max", "points": [[c, v, 1e-3] for c, v in ((1.0, 0.001), (2.0, 0.5), (3.0, 0.999))]}
    noisy = rc.degraded(record, noise_points=2.0)["points"]
    assert noisy == rc.degraded(record, noise_points=2.0)["points"]  # seeded by the run's id
    assert noisy != rc.degraded({**record, "id": "other"}, noise_points=2.0)["points"]
    assert all(0.0 <= p[1] <= 1.0 for p in noisy) and [p[0] for p in noisy] == [1.0, 2.0, 3.0]
    assert all(len(p) == 3 for p in noisy) and abs(noisy[1][1] - 0.5) < 0.1  # 2 points SD: 0.02
    loss = {"id": "l", "mode": "min", "points": [[1.0, 7.0], [2.0, float("nan")]]}
    assert math.isnan(rc.degraded(loss, noise_points=1.0)["points"][1][1])  # a NaN stays what it was


def test_the_priced_oracle_stops_where_the_regret_is_least():
    """The stop the regret is measured against: 0.6 points for $1 more are worth it at $2/point, not at $1."""
    rc = _benchmark_module()
    rising = rc.Run("a", "max", np.arange(1.0, 11.0), np.r_[0.800, np.full(9, 0.806)])
    assert rc.priced_oracle_stop_index(rising, 2.0) == 1
    assert rc.priced_oracle_stop_index(rising, 1.0) == 0
    assert rc.excess_regret_usd(rising, 0, 1.0) == 0.0
    assert rc.excess_regret_usd(rising, 9, 1.0) == pytest.approx(10.0 - 1.6)


def test_the_replay_tells_which_side_of_the_interval_a_final_metric_missed_on():
    rc = _benchmark_module()
    acc = rc.run_from_generic({"id": "a", "mode": "max", "points": [[1.0, 0.5], [2.0, 0.8]]})
    loss = rc.run_from_generic({"id": "l", "mode": "min", "points": [[1.0, 2.0], [2.0, 1.0]]})
    assert rc.ended_better(acc, (False, 0.6, 0.7)) and not rc.ended_better(acc, (False, 0.85, 0.9))
    assert rc.ended_better(loss, (False, 1.5, 1.2)) and not rc.ended_better(loss, (False, 0.5, 0.9))
    assert not rc.ended_better(acc, (True, 0.7, 0.8))  # the better end itself is inside


@pytest.mark.skipif(not DEBERTA.exists(), reason="shared DeBERTa-MNLI curves not available")
def test_replay_on_real_deberta_runs():
    rc = _benchmark_module()
    records = rc.deberta_records(DEBERTA, usd_per_example=1e-6)
    by_id = {r["id"]: rc.run_from_generic(r) for r in records}
    assert len(by_id) == 1024
    learners = [r for r in by_id.values() if np.nanmax(r.metrics) > rc.DEBERTA_LEARNS_ABOVE]
    assert len(learners) == 859
    # Iteration 1: a healthy run; iteration 2: collapses to chance after the first evaluation.
    healthy, collapsed = by_id["deberta-1"], by_id["deberta-2"]
    assert healthy.planned_cost_usd == pytest.approx(healthy.costs_usd[-1])
    i, reason = rc.policy_stop_index(collapsed, {"usd_per_point": 1.0})
    assert i == 2 and "back at chance" in reason, reason  # 72.5, then 35.4 and 31.8: two at chance
    for run in (healthy, by_id["deberta-3"], by_id["deberta-5"]):
        i, _ = rc.policy_stop_index(run, {"usd_per_point": 1.0})
        lost, saved = rc.score(run, i)
        assert 0.0 <= lost < 2.0 and 0.0 <= saved < 1.0
        assert rc.excess_regret_usd(run, i, 1.0) >= 0.0
        assert rc.score(run, rc.oracle_stop_index(run, 0.35))[0] <= 0.35 + 1e-9
    # EarlyStopping replay: patience 1 stops no later than patience 10.
    assert rc.patience_stop_index(healthy, 1) <= rc.patience_stop_index(healthy, 10)
    # Iteration 14 diverged before its first evaluation: it predicts one class, so its accuracy
    # jumps between class shares. With the majority share as baseline it stops as not learning.
    # (The fit and the baseline alone: with the shipped prior, past runs decide how long to wait; without, the
    # annealing wait, one point's worth: $0.50.)
    stuck = by_id["deberta-14"]
    assert stuck.baseline == pytest.approx(0.354457, abs=1e-6) == np.nanmax(stuck.metrics)
    i, reason = rc.policy_stop_index(stuck, {"usd_per_point": 0.5, "prior": None})
    assert reason.startswith("not learning") and 0.5 <= stuck.costs_usd[i] < 0.55, (i, reason)
    assert rc.policy_stop_index(stuck, {"usd_per_point": 0.5, "baseline": None, "prior": None})[0] > i
    # The schedule's learning rate rides along: warmup, then linear decay to 0 at the planned end.
    assert healthy.lrs is not None and healthy.lrs[-1] == 0.0 and max(healthy.lrs) <= 6.69e-06


@pytest.mark.skipif(not DEBERTA.exists(), reason="shared DeBERTa-MNLI curves not available")
def test_the_deberta_runs_scored_on_mismatched_validation_keep_their_costs_and_take_that_sets_majority(capsys):
    """--mismatched: the same runs and dollars, the other validation set's accuracy and its majority-class baseline
    (the share a run that predicts one class scores there: checked on iteration 14, which does)."""
    rc = _benchmark_module()
    matched = {r["id"]: r for r in rc.deberta_records(DEBERTA, usd_per_example=1e-6)}
    mismatched = {r["id"]: r for r in rc.deberta_records(DEBERTA, usd_per_example=1e-6, validation="mismatched")}
    assert matched.keys() == mismatched.keys()
    a, b = rc.run_from_generic(matched["deberta-1"]), rc.run_from_generic(mismatched["deberta-1"])
    np.testing.assert_array_equal(a.costs_usd, b.costs_usd)
    np.testing.assert_array_equal(a.lrs, b.lrs)
    assert a.planned_cost_usd == b.planned_cost_usd and not np.array_equal(a.metrics, b.metrics)
    stuck = rc.run_from_generic(mismatched["deberta-14"])
    assert stuck.baseline == rc.MNLI_MISMATCHED_MAJORITY_ACC == np.nanmax(stuck.metrics)
    assert {r["baseline"] for r in mismatched.values()} == {rc.MNLI_MISMATCHED_MAJORITY_ACC}
    with pytest.raises(SystemExit):
        rc.main(["--generic", str(DEBERTA), "--mismatched"])
    assert "--mismatched applies to the shared DeBERTa runs" in capsys.readouterr().err


def test_the_replay_checks_the_stated_gain_and_counts_dollars_saved():
    """gain_checks pairs each gain the policy states with what the kept best then made by the end of the stated
    increment (none past the run's end); dollars_saved_share weighs each run by its dollars."""
    rc = _benchmark_module()
    costs = 0.01 * np.arange(1, 41)
    rising = rc.Run("r", "max", costs, 0.5 + 0.3 * (1 - np.exp(-costs / 0.1)), float(costs[-1]))
    checks = rc.gain_checks(rising, {"usd_per_point": 1.0})
    assert checks and all(0 < at < 1 and stated >= 0 for at, stated, *_ in checks)
    assert all(made > 0 for _, _, made, *_ in checks)  # a clean rise: every increment raises the best
    # Past runs were asked (a bounded metric, a plan): the rate used lies between the fit's and theirs (a weighted
    # geometric mean), and the rate made over the next doubling is what the best then gained per dollar.
    rates = [c[3:] for c in checks if math.isfinite(c[3])]
    assert rates and all(min(fit, past) * (1 - 1e-9) <= used <= max(fit, past) * (1 + 1e-9) and made >= 0
                         for fit, past, used, made in rates)
    alone = rc.gain_checks(rising, {"usd_per_point": 1.0, "prior": None})
    assert alone and all(math.isnan(c[3]) for c in alone)  # no prior, no past runs' rate
    flat = rc.Run("f", "max", costs, np.full(40, 0.8), float(costs[-1]))
    assert all(made == 0 for _, _, made, *_ in rc.gain_checks(flat, {"usd_per_point": 1.0}))
    cheap = rc.Run("c", "max", np.array([1.0, 2.0]), np.array([0.5, 0.6]))
    dear = rc.Run("d", "max", np.array([10.0, 20.0]), np.array([0.5, 0.6]))
    assert rc.dollars_saved_share([cheap, dear], [1, 0]) == pytest.approx(10.0 / 22.0)  # spent 2 + 10 of 22
    assert rc.summarize([cheap, dear], [1, 0])["cost_saved_mean"] == pytest.approx(0.25)  # per run: 0 and 50%


def test_benchmark_script_on_a_tiny_generic_file(tmp_path):
    cost_usd, _, noisy = _saturating(n=40, seed=9)
    runs = [
        {"id": "rising", "mode": "max", "points": [[c, m] for c, m in zip(cost_usd, noisy)]},
        {"id": "loss", "mode": "min", "points": [[c, 3.0 - m] for c, m in zip(cost_usd, noisy)],
         "planned_cost_usd": float(cost_usd[-1])},
        {"id": "nan", "mode": "min", "points": [[0.01, 5.0], [0.02, 6.0], [0.03, None]]},
        {"id": "all-nan", "mode": "min", "points": [[0.01, None]]},
    ]
    data = tmp_path / "runs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in runs))
    out = tmp_path / "summary.json"
    proc = subprocess.run(
        [sys.executable, str(BENCHMARK), "--generic", str(data), "--json", str(out), "--workers", "1"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "EarlyStopping(patience=3)" in proc.stdout and "MarginalGainPolicy" in proc.stdout
    summary = json.loads(out.read_text())
    ds = summary["datasets"]["runs"]
    assert ds["runs"] == 4
    assert set(ds["halves"]) == {"tune", "test"}
    assert math.isfinite(ds["operating_usd_per_point"])
    assert "DeBERTa" not in proc.stdout and "digits-pairs" not in proc.stdout  # the header is about this file
    assert "target is 0.3 points lost" in proc.stdout


def test_generic_replay_of_from_scratch_runs_at_a_team_s_prices(tmp_path):
    """A user's own from-scratch runs get the from-scratch loss target and their prices; a run at its baseline is
    scored apart as one that does not learn."""
    t = np.linspace(0.05, 1.0, 30)
    runs = [{"id": f"r{i}", "mode": "max", "baseline": 0.1, "planned_cost_usd": 10.0,
             "points": [[10.0 * c, 0.1 + 0.8 / (1.0 + np.exp(-(c - 0.5) * 12.0)) + 0.003 * np.sin(i + 9 * c)]
                        for c in t]} for i in range(8)]
    runs.append({"id": "dead", "mode": "max", "baseline": 0.1, "planned_cost_usd": 10.0,
                 "points": [[10.0 * c, 0.1 + 0.001 * np.sin(5 * c)] for c in t]})
    data = tmp_path / "scratch.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in runs))
    out = tmp_path / "summary.json"
    proc = subprocess.run(
        [sys.executable, str(BENCHMARK), "--generic", str(data), "--from-scratch", "--prices", "0.5", "2",
         "--json", str(out), "--workers", "1"], capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "patience 10's mean loss on tune" in proc.stdout
    ds = json.loads(out.read_text())["datasets"]["scratch"]
    assert sum(ds["learners"].values()) == 8 and ds["non_learning"]["runs"] == 1
    assert [row["usd_per_point"] for row in ds["halves"]["test"]["regret"]] == [0.5, 2.0]


@pytest.mark.parametrize("argv, complaint", [
    (["--generic", "x.jsonl", "--prices", "-1"], "--prices must be positive"),
    (["--from-scratch"], "apply to a --generic file only"),
])
def test_the_replay_refuses_bad_flags_before_replaying(argv, complaint, capsys):
    rc = _benchmark_module()
    with pytest.raises(SystemExit):
        rc.main(argv)
    assert complaint in capsys.readouterr().err


@pytest.mark.parametrize("bad_line, complaint", [
    ('{"id": "cut", "points": [[0.1, 0.5]', "line 2: not JSON"),
    ('{"id": "restart", "points": [[0.1, 0.5], [0.2, 0.6], [0.05, 0.7]]}',
     "line 2: run 'restart': cumulative costs must not decrease (point 2: 0.05 after 0.2)"),
    ('{"id": "empty", "points": []}', "line 2: run 'empty': 'points' must be a non-empty list"),
])
def test_a_bad_line_in_a_generic_file_ends_the_replay_at_once_naming_the_line(tmp_path, bad_line, complaint, capsys):
    """One corrupt run in a team's file is named with its line (how they find it among hundreds), in one line on
    stderr, not as a Python traceback that named the run alone."""
    data = tmp_path / "runs.jsonl"
    data.write_text('{"id": "fine", "points": [[0.1, 0.5], [0.2, 0.6]]}\n' + bad_line + "\n",
                    encoding="utf-8-sig")  # a byte-order mark (PowerShell, Excel) does not make line 1 the bad one
    rc = _benchmark_module()
    with pytest.raises(SystemExit) as exit_info:
        rc.main(["--generic", str(data)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"{data}: {complaint}" in err and "Traceback" not in err


def test_a_run_learns_when_its_best_beats_its_baseline_in_either_direction():
    rc = _benchmark_module()
    acc = rc.Run("a", "max", np.arange(1.0, 4.0), np.array([0.1, 0.15, 0.25]), baseline=0.1)
    loss = rc.Run("l", "min", np.arange(1.0, 4.0), np.array([2.3, 2.25, 2.1]), baseline=2.3)
    assert rc.run_learns(acc) and not rc.run_learns(acc, above_points=20.0)
    assert rc.run_learns(loss) and not rc.run_learns(loss, above_points=25.0)
    assert rc.run_learns(replace(acc, baseline=None))  # no baseline: any finite metric
    assert not rc.run_learns(replace(acc, metrics=np.full(3, np.nan)))


# ---------------------------------------------------------------------- bounded metrics, explanations
def test_a_bounded_metric_is_never_predicted_outside_its_range():
    cost_usd = 0.01 * np.arange(1, 31)
    acc = np.minimum(0.90 + 0.0035 * np.arange(30), 0.999)  # a straight line heading past 1
    policy = MarginalGainPolicy(usd_per_point=100.0, planned_cost_usd=3.0, prior=None)
    _, decisions = _replay(policy, cost_usd, acc)
    est = decisions[-1].estimate
    assert 0.0 <= est.predicted_final_low <= est.predicted_final <= est.predicted_final_high <= 1.0
    assert all(0.0 <= v <= 1.0 for v in est.curve_metric)
    # A loss is bounded below by 0 (auto), and an explicit range is respected too.
    loss = np.maximum(0.3 - 0.012 * np.arange(30), 0.001)
    for kwargs in ({}, {"metric_range": (0.0, 10.0)}):
        _, decisions = _replay(MarginalGainPolicy(mode="min", usd_per_point=100.0, planned_cost_usd=3.0, **kwargs),
                               cost_usd, loss)
        est = decisions[-1].estimate
        assert 0.0 <= est.predicted_final_high <= est.predicted_final <= est.predicted_final_low
        # The fields run worse to better; the reason states the interval in numbers' order, as a person writes one.
        assert f"interval {est.predicted_final_high:.4g} to {est.predicted_final_low:.4g}," in decisions[-1].reason
    # Unbounded on request: the straight line may then be extrapolated past 1.
    _, decisions = _replay(MarginalGainPolicy(usd_per_point=100.0, planned_cost_usd=3.0, metric_range=None,
                                              prior=None), cost_usd, acc)
    assert decisions[-1].estimate.predicted_final_high > 1.0


def test_an_error_rate_with_its_range_is_judged_as_the_accuracy_it_mirrors():
    """The start threshold is relative to the distance from a bounded metric's worse end: an error rate of 0.99 at
    chance starts when its accuracy mirror (0.01) would, not after 0.99 points (1% of the value itself)."""
    cost_usd = 0.01 * np.arange(1, 61)
    rng = np.random.default_rng(3)
    rise = 0.6 / (1.0 + np.exp(-(np.arange(60) - 25) / 3.0))
    acc = 0.01 + np.where(rise > 0.01, rise + 0.002 * rng.standard_normal(60), 0.0)  # exactly at chance first
    as_acc = MarginalGainPolicy(usd_per_point=0.05, planned_cost_usd=0.6, baseline=0.01)
    as_err = MarginalGainPolicy(mode="min", usd_per_point=0.05, planned_cost_usd=0.6, baseline=0.99,
                                metric_range=(0.0, 1.0))
    stop_acc, decisions_acc = _replay(as_acc, cost_usd, acc)
    stop_err, decisions_err = _replay(as_err, cost_usd, 1.0 - acc)
    assert stop_acc == stop_err
    starts = [[i for i, d in enumerate(ds) if d.reason.startswith("started learning")] for ds in
              (decisions_acc, decisions_err)]
    assert starts[0] == starts[1] == [13]  # the first evaluation off chance: 0.0195, or an error of 0.9805
    assert [d.reason.split(" ")[:3] for d in decisions_acc] == [d.reason.split(" ")[:3] for d in decisions_err]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_every_figure_in_a_reason_is_consistent(seed):
    cost_usd, _, noisy = _saturating(n=60, seed=seed)
    _, decisions = _replay(MarginalGainPolicy(usd_per_point=1.0, planned_cost_usd=1.0), cost_usd, noisy)
    for d in decisions:
        if d.estimate is None:
            continue
        est = d.estimate
        assert 0.0 <= est.gain_points <= est.gain_points_upper  # a median, never above the stated bound
        assert est.predicted_final_low <= est.predicted_final <= est.predicted_final_high
        assert f"interval 0 to {est.gain_points_upper:.3f}" in d.reason
        assert f"{est.predicted_final_low:.4g} to {est.predicted_final_high:.4g}" in d.reason


def test_bad_metric_range_lr_and_prior_raise_naming_the_argument(tmp_path):
    for bad in ((1.0, 0.0), "percent", (0.0,)):
        with pytest.raises(ValueError, match="metric_range"):
            MarginalGainPolicy(metric_range=bad)
    with pytest.raises(ValueError, match="`lr`"):
        MarginalGainPolicy().observe(0.1, 0.5, lr=-1.0)
    with pytest.raises(ValueError, match="prior"):
        MarginalGainPolicy(prior=str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text('{"cells": {}}')
    with pytest.raises(ValueError, match="version"):
        MarginalGainPolicy(prior=str(tmp_path / "bad.json"))
    (tmp_path / "v1.json").write_text('{"version": 1, "cells": {"*/*/*/*": {}}}')  # before `next` was recorded
    with pytest.raises(ValueError, match=r"version 1: this costaware reads version 2 .*costaware prior fit"):
        MarginalGainPolicy(prior=str(tmp_path / "v1.json"))


# ---------------------------------------------------------------------- slow starts and the prior
def _slow_start_runs(n_runs: int = 60, seed: int = 0, start: float | None = None) -> list[dict]:
    """From-scratch-like runs: flat at chance while the LR warms up, then a steep rise and annealing."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0.04, 1.0, 25)
    lr = np.where(t < 0.3, 0.004 + 0.096 * t / 0.3, 0.1 * (1 + np.cos(np.pi * (t - 0.3) / 0.7)) / 2)
    runs = []
    for i in range(n_runs):
        mid, top = rng.uniform(0.15, 0.45) if start is None else start, rng.uniform(0.6, 0.95)
        acc = 0.1 + (top - 0.1) / (1.0 + np.exp(-(t - mid) / 0.05)) + rng.normal(0.0, 0.004, t.size)
        acc = np.clip(acc, 0.08, 1.0)
        runs.append({"id": f"slow-{i}", "mode": "max", "planned_cost_usd": 10.0, "baseline": 0.1,
                     "points": [[10.0 * c, float(a), float(r)] for c, a, r in zip(t, acc, lr)]})
    return runs


def test_slow_start_families_fit_a_sigmoidal_rise():
    x = np.linspace(0.5, 1.0, 20)
    u = 10.0 + 50.0 / (1.0 + (x / 0.8) ** -5.0)  # log-logistic in cost, its midpoint behind "now"
    from costaware.curves import _fit_ensemble

    fit = _fit_ensemble(x, u)
    assert "top loglogistic" in fit.describe() or "top weibull" in fit.describe()


def test_a_prior_from_past_runs_keeps_a_slow_start_going(tmp_path):
    from costaware.curve_prior import CurvePrior, run_from_record

    past, new = _slow_start_runs(seed=0), _slow_start_runs(n_runs=1, seed=7, start=0.45)[0]
    prior = CurvePrior.fit([run_from_record(r) for r in past])
    path = tmp_path / "prior.json"
    prior.save(path)
    costs, acc, lrs = (np.asarray([p[k] for p in new["points"]]) for k in range(3))

    def stop_at(policy_prior) -> int:
        policy = MarginalGainPolicy(usd_per_point=1.0, planned_cost_usd=10.0, baseline=0.1, prior=policy_prior)
        for i, (c, a, r) in enumerate(zip(costs, acc, lrs)):
            d = policy.observe(c, a, lr=r)
            if d.stop:
                return i
        return len(costs)

    flat = int(np.argmax(acc > 0.2))  # the last evaluations of the flat start
    # The fit alone sees a flat run at chance and stops it before its rise.
    assert stop_at(None) < flat
    # Past runs at that stage (LR still warming up, at chance) went on to gain tens of points,
    # worth more at $1/point than the rest of the plan costs: it goes on past the rise.
    assert stop_at(str(path)) > flat + 3
    assert stop_at(CurvePrior.from_dict(json.loads(path.read_text()))) == stop_at(prior)


def test_a_run_without_a_plan_asks_past_runs_at_its_learning_rate_state_first():
    """Without a plan a stage has no share of it; its learning rate's state still tells a run at its peak rate (a
    slow start may be ahead) from one that has annealed: the cells of every share at that state come first."""
    from costaware.curve_prior import NO_PLAN, CurvePrior, run_from_record

    prior = CurvePrior.fit([run_from_record(r) for r in _slow_start_runs(seed=0)])
    assert prior.lookup((NO_PLAN, "high", 0, 0))[0] == "*/high/0/0"
    assert prior.lookup((NO_PLAN, "unknown", 0, 0))[0] == "*/*/0/0"  # no past run without learning rates
    assert prior.lookup((0, "high", 0, 0))[0] == "0/high/0/0"  # with a share of the plan, as before
    policy = MarginalGainPolicy(usd_per_point=1.0, baseline=0.1, prior=prior)
    for c, a, r in _slow_start_runs(n_runs=1, seed=3)[0]["points"][:6]:
        policy.observe(c, a, lr=r)
    view = policy._prior_view()
    assert view is not None and view.planless and "cell */warming/" in view.cell, view


def test_the_prior_records_what_the_next_doubling_of_the_spend_brought():
    """``next``: the best by the time the spend has doubled (at most to the plan's end) against the best so far, as a
    fraction of the headroom; ``gain`` is the same to the run's end."""
    from costaware.curve_prior import PriorRun, stage_samples

    costs = np.array([1.0, 2.0, 3.0, 4.0, 8.0])
    samples = stage_samples(PriorRun(costs, np.array([0.5, 0.6, 0.55, 0.7, 0.9]), planned_cost_usd=8.0))
    assert [s[3] for s in samples[:3]] == pytest.approx([0.1 / 0.5, 0.1 / 0.4, 0.1 / 0.4])  # by $2, $4, $6
    assert samples[3][3] == pytest.approx(samples[3][1]) == pytest.approx(0.2 / 0.3)  # by $8: the plan's end


def _prior_with_next(fraction: float):
    """A prior fitted on slow starts whose every cell says the next doubling of the spend brought ``fraction`` of
    the headroom."""
    from costaware.curve_prior import CurvePrior, run_from_record

    fitted = CurvePrior.fit([run_from_record(r) for r in _slow_start_runs(seed=0)])
    return CurvePrior({key: {**cell, "next": [fraction] * len(cell["next"]), "next_mean": fraction}
                       for key, cell in fitted.cells.items()})


def test_past_runs_weigh_in_on_the_rate_as_far_as_the_fit_is_unsure():
    from costaware.curves import _past_weight

    cost_usd, _, noisy = _saturating(n=40, noise=0.01, seed=1)
    estimates = {}
    for fraction in (0.0, 0.5):
        policy = MarginalGainPolicy(usd_per_point=1.0, planned_cost_usd=1.0, baseline=0.5,
                                    prior=_prior_with_next(fraction))
        decisions = [policy.observe(c, a) for c, a in zip(cost_usd, noisy)]
        estimates[fraction] = decisions[-1].estimate
        reason = decisions[-1].reason
        assert "past runs at this stage gained up to" in reason and "on past runs" in reason
    nothing, much = estimates[0.0], estimates[0.5]
    assert nothing.past_gain_points_upper == 0.0 and much.past_gain_points_upper > 0.0
    assert nothing.gain_per_usd < much.gain_per_usd
    # Recomputable from the estimate's own figures: the weighted geometric mean of the two rates.
    w = _past_weight(much)
    assert 0.0 < w <= 0.5
    fit_rate = much.gain_points_upper / much.increment_usd
    assert much.gain_per_usd == pytest.approx(
        fit_rate ** (1 - w) * (much.past_gain_points_upper / much.past_increment_usd) ** w)
    # A fit that knows its gain (a clean straight rise) keeps it: past runs get almost no weight.
    policy = MarginalGainPolicy(min_gain_per_usd=100.0, planned_cost_usd=0.3, prior=_prior_with_next(0.0))
    for c in 0.001 * np.arange(5, 150, 5):
        decision = policy.observe(c, 0.0015 * c / 0.001)
    assert decision.estimate.past_gain_points_upper == 0.0 and _past_weight(decision.estimate) < 0.01
    assert not decision.stop


def test_past_runs_price_the_next_stretch_without_a_plan():
    """Without a plan (or past one), past runs still say what the next doubling of the spend brought them, from the
    cells that pool every share of the plan; what they gained by their end, and where they ended, are about an end
    this run does not have: no "past runs ... by their end" reason, and the interval stays the curve fit's."""
    from costaware.curve_prior import CurvePrior

    cost_usd, _, noisy = _saturating(n=40, noise=0.01, seed=1)
    rates = {}
    for fraction in (0.0, 0.5):
        stating = CurvePrior.from_dict(_prior_with_next(fraction).to_dict())
        assert stating.states_interval
        policy = MarginalGainPolicy(usd_per_point=1.0, baseline=0.5, prior=stating)
        decisions = [policy.observe(c, a) for c, a in zip(cost_usd, noisy)]
        estimate, reason = decisions[-1].estimate, decisions[-1].reason
        assert estimate.past_increment_usd == pytest.approx(cost_usd[-1])  # the next doubling
        assert "past runs at this stage gained up to" in reason and "by their end" not in reason
        assert estimate.interval_from == "the curve fit"
        rates[fraction] = estimate.gain_per_usd
    assert rates[0.0] < rates[0.5]
    past_plan = MarginalGainPolicy(usd_per_point=1.0, baseline=0.5, planned_cost_usd=0.2, prior=_prior_with_next(0.5))
    estimate = [past_plan.observe(c, a) for c, a in zip(cost_usd, noisy)][-1].estimate
    assert estimate.past_increment_usd == pytest.approx(cost_usd[-1])  # past a plan estimated too low: as without
    alone = MarginalGainPolicy(usd_per_point=1.0, baseline=0.5, prior=None)
    assert "past runs" not in [alone.observe(c, a) for c, a in zip(cost_usd, noisy)][-1].reason


def test_past_runs_are_not_asked_for_the_rate_near_chance():
    """Within a tenth of the way from the baseline to the ceiling, the shipped prior pools fine-tunes that diverged
    with slow starts: the fit alone prices the next stretch."""
    policy = MarginalGainPolicy(usd_per_point=1.0, planned_cost_usd=10.0, baseline=0.1, prior=_prior_with_next(0.0))
    for c, a in zip(np.linspace(0.5, 3.0, 12), np.linspace(0.10, 0.15, 12)):
        decision = policy.observe(float(c), float(a), lr=0.1)
    assert decision.estimate is not None and decision.estimate.past_gain_points_upper is None
    assert "past runs at this stage gained up to" not in decision.reason


def test_the_prior_states_a_calibrated_interval_on_runs_like_its_own():
    from costaware.curve_prior import CurvePrior, run_from_record

    prior = CurvePrior.fit([run_from_record(r) for r in _slow_start_runs(n_runs=200, seed=1)])
    inside = []
    for run in _slow_start_runs(n_runs=60, seed=2):
        policy = MarginalGainPolicy(usd_per_point=1e6, planned_cost_usd=10.0, baseline=0.1, prior=prior)
        for c, a, r in run["points"][:7]:  # about 25% of the run
            est = policy.observe(c, a, lr=r).estimate
        final = run["points"][-1][1]
        inside.append(est.predicted_final_low <= final <= est.predicted_final_high)
        assert "past runs" in est.interval_from
    assert 0.65 <= np.mean(inside) <= 0.95


def test_the_shipped_prior_leaves_the_stated_interval_to_the_fit_and_a_teams_own_states_it():
    """The shipped prior pools kinds of runs: its spread at a stage is not one run's, so the interval comes from
    the fit. The same cells as a team's own file state it. Either way the decisions are the same: the interval is
    what the policy says, not what it decides on."""
    from costaware.curve_prior import CurvePrior, load_prior

    shipped = load_prior("default")
    own = CurvePrior.from_dict(shipped.to_dict())
    assert not shipped.states_interval and own.states_interval
    run = _slow_start_runs(n_runs=1, seed=2)[0]
    said, stops = {}, {}
    for name, prior in (("shipped", "default"), ("own", own)):
        policy = MarginalGainPolicy(usd_per_point=3.0, planned_cost_usd=10.0, baseline=0.1, prior=prior)
        decisions = [policy.observe(c, a, lr=r) for c, a, r in run["points"]]
        said[name] = [d.estimate.interval_from for d in decisions if d.estimate is not None]
        stops[name] = [d.stop for d in decisions]
    assert said["shipped"] and set(said["shipped"]) == {"the curve fit"}
    assert all(s.startswith("past runs") for s in said["own"][:-1])  # the last evaluation is at the plan's end
    assert stops["shipped"] == stops["own"]


def test_lr_is_kept_in_the_state_and_read_back():
    policy = MarginalGainPolicy(usd_per_point=1.0)
    for i in range(4):
        policy.observe(0.1 * (i + 1), 0.5 + 0.01 * i, lr=0.1 / (i + 1))
    state = policy.state_dict()
    assert state["lrs"] == pytest.approx([0.1, 0.05, 0.1 / 3, 0.025])
    restored = MarginalGainPolicy(usd_per_point=1.0)
    restored.load_state_dict({k: v for k, v in state.items() if k != "lrs"})  # a version-1 state: no LRs
    assert restored.num_points == 4


def test_prior_fit_command_on_generic_jsonl(tmp_path, capsys):
    from costaware.cli import main

    data = tmp_path / "runs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _slow_start_runs(n_runs=30)))
    out = tmp_path / "prior.json"
    assert main(["prior", "fit", str(data), "-o", str(out)]) == 0
    assert "prior fitted on 30 of 30 runs" in capsys.readouterr().out
    assert MarginalGainPolicy(prior=str(out)).prior.cells["*/*/*/*"]["runs"] == 30
    # The same file saved with a byte-order mark (PowerShell, Excel) reads the same.
    bom = tmp_path / "bom.jsonl"
    bom.write_text(data.read_text(), encoding="utf-8-sig")
    assert main(["prior", "fit", str(bom), "-o", str(tmp_path / "bom.json")]) == 0
    assert "prior fitted on 30 of 30 runs" in capsys.readouterr().out
    # A file of losses (unbounded) cannot inform it: a clear error, exit code 1.
    loss = tmp_path / "loss.jsonl"
    loss.write_text(json.dumps({"id": "l", "mode": "min", "points": [[0.1, 3.0], [0.2, 2.5]]}) + "\n")
    assert main(["prior", "fit", str(loss), "-o", str(tmp_path / "x.json")]) == 1
    assert "no run to fit a prior on" in capsys.readouterr().err
    # Each run left out is counted with why: a run stopped short of its plan once went unexplained.
    stopped = {"id": "s", "planned_cost_usd": 10.0, "points": [[1.0, 0.5], [2.0, 0.6], [3.0, 0.65]]}
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(json.dumps(r) + "\n" for r in [*_slow_start_runs(n_runs=30), stopped,
                                                             json.loads(loss.read_text())]))
    assert main(["prior", "fit", str(mixed), "-o", str(out)]) == 0
    said = capsys.readouterr().out
    assert "prior fitted on 30 of 32 runs" in said
    assert ("left out: 1 run: it stopped before 90% of its plan (what the rest of a plan brings is unknown); "
            "1 run: its metric is not bounded") in said
    assert main(["prior", "fit", str(loss), str(loss), "-o", str(out)]) == 1
    assert "2 runs: its metric is not bounded" in capsys.readouterr().err


@pytest.mark.parametrize(("line", "says"), [
    ('{"id": "a", "points": [[0.1, 0.5], [0.3, 0.6], [0.2, 0.7]]}',
     "line 2: run 'a': cumulative costs must not decrease (point 2: 0.2 after 0.3)"),
    ('{"id": "a", "mode": "maximize", "points": [[0.1, 0.5]]}', "line 2: run 'a': mode must be 'max' or 'min'"),
    ('{"id": "a", "points": []}', "line 2: run 'a': 'points' must be a non-empty list"),
    ('{"id": "a", "points": [[0.1]]}', "line 2: run 'a': every point must be [cumulative_cost_usd, metric(, lr)]"),
    ('{"id": "a", "points": [[-0.1, 0.5]]}', "line 2: run 'a': costs must be finite and not negative"),
    ('{"id": "a", "points": [[0.1, 0.5]], "planned_cost_usd": 0}', "run 'a': planned_cost_usd must be a positive"),
    ('{"id": "a", "points": [[0.1, 0.5]], "metric_range": [1, 0]}', "run 'a': metric_range must be [low, high]"),
    ('{"id": "a", "points": [[0.1, 0.5]], "metric_range": ["0", 1]}', "run 'a': metric_range must be [low, high]"),
    ('{"id": "a", "points": [[0.1, 0.5]], "baseline": "chance"}', "run 'a': baseline must be a number"),
    ('{"id": "a", "points": [[0.1, 0.5]', "line 2: not JSON"),
])
def test_prior_fit_names_the_line_and_the_problem_of_a_corrupt_record(tmp_path, capsys, line, says):
    """A prior fitted on a corrupt record would mislead every decision made with it: refused, exit code 1 (bad
    input), naming the file, the line, the run and what is wrong; no prior file is written."""
    from costaware.cli import main

    good = json.dumps(_slow_start_runs(n_runs=1)[0])
    data = tmp_path / "runs.jsonl"
    data.write_text(good + "\n" + line + "\n")
    out = tmp_path / "prior.json"
    code = main(["prior", "fit", str(data), "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and f"{data}: " in err and says in err, err
    assert not out.exists()


def test_the_shipped_prior_loads():
    policy = MarginalGainPolicy()
    assert policy.prior is not None and "*/*/*/*" in policy.prior.cells
    assert "tune halves" in policy.prior.source


def test_the_packaged_from_scratch_prior_expects_more_from_a_run_at_chance():
    """prior="from-scratch" holds from-scratch and SSL runs alone: at chance between 10% and 50% of the plan, its
    runs went on to gain more than the default's, where diverged fine-tuning runs sit at chance for good."""
    from costaware.curve_prior import PACKAGED_PRIORS, load_prior

    default, scratch = load_prior("default"), load_prior("from-scratch")
    assert "digits corpus" in scratch.source and "DeBERTa" not in scratch.source
    assert not scratch.states_interval and set(PACKAGED_PRIORS) == {"default", "from-scratch"}
    for cell in ((1, "unknown", 0, 0), (2, "unknown", 0, 0), (2, "high", 0, 0)):
        assert scratch.gain_mean(cell) > 2.0 * default.gain_mean(cell), cell
    assert MarginalGainPolicy(prior="from-scratch").prior is scratch
    with pytest.raises(ValueError, match="'default', 'from-scratch', a CurvePrior"):
        MarginalGainPolicy(prior="scratch")


def test_the_packaged_from_scratch_prior_is_what_its_script_fits_on_the_tune_half():
    from costaware.curve_prior import load_prior

    rc = _benchmark_module()
    spec = importlib.util.spec_from_file_location("fit_default_prior", BENCHMARK.parent / "fit_default_prior.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with open(rc.CORPUS) as f:
        refit = script.fit_tune_half([json.loads(line) for line in f], "from-scratch", script.FROM_SCRATCH_WHAT)
    assert refit.to_dict() == load_prior("from-scratch").to_dict()


def test_a_confidence_below_one_half_is_refused():
    # The stated gain is the median: an interval of less than 50% could leave it outside.
    with pytest.raises(ValueError, match="confidence"):
        MarginalGainPolicy(usd_per_point=1.0, confidence=0.3)


def test_a_run_at_chance_waits_for_its_schedule_not_for_the_whole_plan():
    from costaware.curve_prior import CurvePrior, run_from_record

    # Past runs: 8 of 60 start late (tens of points gained), the rest never leave chance. At the start
    # the prior's gain is worth less than the whole plan costs, more than the wait until the LR anneals.
    rng = np.random.default_rng(4)
    starters = _slow_start_runs(n_runs=8, seed=5, start=0.4)
    stuck = [{**r, "id": f"stuck-{i}", "points": [[c, float(0.1 - abs(rng.normal(0.0, 0.004))), lr]
                                                  for c, _, lr in r["points"]]}
             for i, r in enumerate(_slow_start_runs(n_runs=52, seed=6))]
    prior = CurvePrior.fit([run_from_record(r) for r in starters + stuck])

    def replay(run: dict) -> tuple[int, str]:
        policy = MarginalGainPolicy(usd_per_point=1.0, planned_cost_usd=10.0, baseline=0.1, prior=prior)
        for i, (c, a, r) in enumerate(run["points"]):
            d = policy.observe(c, a, lr=r)
            if d.stop:
                return i, d.reason
        return len(run["points"]), "ran to the end"

    late = _slow_start_runs(n_runs=1, seed=8, start=0.4)[0]
    flat = int(np.argmax(np.asarray([p[1] for p in late["points"]]) > 0.2))
    i, reason = replay(late)
    assert i > flat + 3 and not reason.startswith("not learning"), (i, flat, reason)
    # One that never starts is stopped as not learning once past runs say it will not start, long before its end.
    i, reason = replay(stuck[0])
    costs = [p[0] for p in stuck[0]["points"]]
    assert reason.startswith("not learning") and 2.0 < costs[i] < 9.0, (costs[i], reason)


def test_an_interval_from_a_coarser_cell_of_the_prior_is_wider():
    from costaware.curve_prior import CurvePrior, run_from_record

    prior = CurvePrior.fit([run_from_record(r) for r in _slow_start_runs(n_runs=200, seed=1)])
    run = _slow_start_runs(n_runs=1, seed=2)[0]
    estimates = {}
    for with_lr in (True, False):
        policy = MarginalGainPolicy(usd_per_point=1e6, planned_cost_usd=10.0, baseline=0.1, prior=prior)
        for c, a, r in run["points"][:7]:
            estimates[with_lr] = policy.observe(c, a, lr=r if with_lr else None).estimate
    # Without learning rates the stage's cell drops its LR state: the same past runs (they all share one
    # schedule), pooled as if they might be of other kinds, so the stated interval is wider.
    assert "/*/" not in estimates[True].interval_from and "/*/" in estimates[False].interval_from
    width = {k: e.predicted_final_high - e.predicted_final_low for k, e in estimates.items()}
    assert width[False] > width[True] > 0.0


def _wait_at_chance(gain_upper: float, start_usd: float, cost_now: float, evals: int) -> str | None:
    """Why a run at chance (LR at its peak, $10 plan, $1/point) would wait at ``cost_now``, past runs' gain worth
    ``gain_upper`` points; None if it would not."""
    from costaware.curves import _PriorView

    view = _PriorView("test cell", gain_upper=gain_upper, final_low=10.0, final_median=10.0, final_high=10.0,
                      next_gain_upper=0.0, next_usd=None)
    policy = MarginalGainPolicy(usd_per_point=1.0, planned_cost_usd=10.0, baseline=0.1, prior=None)
    for c in np.linspace(start_usd, cost_now, evals):
        policy.observe(float(c), 0.1, lr=0.1)
    return policy._prior_says_wait_at_chance(view)


def test_a_run_at_chance_whose_learning_rate_never_anneals_does_not_wait_to_the_end():
    # Plan $10, anneal_fraction 0.5: with the learning rate still at its peak past $5, the wait for a slow start
    # lasts until $7.5, a fixed point. Past runs' gain here is worth $1.8: at $6 the $1.5 wait to $7.5 is worth it,
    # at $8 there is no wait left (a horizon of half what is left, recomputed at every evaluation, never ends).
    reasons = {cost_now: _wait_at_chance(1.8, 0.5, cost_now, 8) for cost_now in (6.0, 8.0)}
    assert reasons[6.0] is not None and "until $7.5" in reasons[6.0], reasons
    assert reasons[8.0] is None


def test_a_run_at_chance_waits_one_doubling_at_a_time():
    """The wait for a slow start is judged one doubling of the spend at a time: at 12% of a $10 plan, past runs'
    gain worth $2 does not pay the $3.8 wait until half the plan, but pays the $1.2 one until $2.4; by $3 the next
    step (to $5) costs $2, as much as the gain is worth: no more waiting."""
    reasons = {cost_now: _wait_at_chance(2.0, 0.2, cost_now, 6) for cost_now in (1.2, 3.0)}
    assert reasons[1.2] is not None and "until $2.4" in reasons[1.2], reasons
    assert reasons[3.0] is None, reasons


def test_a_run_at_chance_with_no_plan_waits_one_doubling_at_a_time_while_past_runs_say_it_pays():
    """Without a plan, past runs' gains by their end are about an end this run does not have: the wait for a slow
    start is priced by what past runs at chance gained over the next doubling of their spend, against the cost of
    that doubling (the spend so far)."""
    cost_usd = 0.5 * np.arange(1, 41)
    flat = np.array([0.096, 0.1, 0.104])[np.random.default_rng(7).integers(0, 3, 40)]

    def replay(next_fraction: float) -> tuple[int | None, list]:
        policy = MarginalGainPolicy(usd_per_point=1.0, baseline=0.104, prior=_prior_with_next(next_fraction))
        return _replay(policy, cost_usd, flat)

    # A tenth of the headroom (about 9 points, worth $9) over each doubling: the wait goes on until doubling costs
    # more than that, past the blind wait (one point's worth, $1).
    stop, decisions = replay(0.1)
    assert stop is not None and 8.5 < cost_usd[stop] <= 9.5, (stop, decisions[-1].reason)
    assert "at chance, no plan" in decisions[4].reason and "as their spend doubled" in decisions[4].reason
    assert decisions[-1].reason.startswith("not learning") and "no more than the $9" in decisions[-1].reason
    # Past runs that gained nothing as their spend doubled: the blind wait alone.
    stop, decisions = replay(0.0)
    assert stop is not None and cost_usd[stop] <= 1.5 and decisions[-1].reason.startswith("not learning")


def test_a_learning_rate_still_at_its_peak_is_not_judged_converged_on_its_plateau():
    """A step schedule that drops late (at 75% of the plan): on the high-LR plateau the fit sees convergence.
    Past anneal_fraction of the plan, the policy without learning rates trusts it and stops; with them, it
    sees a rate not annealed yet and waits (up to anneal_points' worth), so it reaches the drop's gain (and may
    stop after it: the rest of the plan, flat at 0.88, buys nothing)."""
    t = np.linspace(0.04, 1.0, 25)
    acc = np.where(t < 0.75, 0.80 - 0.3 * np.exp(-t / 0.05), 0.88) + np.random.default_rng(0).normal(0, 0.001, t.size)
    lr = np.where(t < 0.75, 0.1, 0.01)
    stops = {}
    for with_lr in (False, True):
        policy = MarginalGainPolicy(usd_per_point=20.0, planned_cost_usd=10.0, prior=None)
        stops[with_lr] = None
        for c, a, r in zip(10.0 * t, acc, lr):
            if policy.observe(float(c), float(a), lr=float(r) if with_lr else None).stop:
                stops[with_lr] = float(c)
                break
    assert stops[False] is not None and 5.0 <= stops[False] < 7.5, stops
    assert stops[True] is None or stops[True] >= 7.5, stops


def test_the_lora_corpus_resumes_only_from_the_first_runs_of_the_same_draws(tmp_path):
    """`make_lora_curves.py --resume` appends to a corpus whose runs are the first of the same seeded draws, in
    order; a file from other draws (another seed, an edited configuration) is refused rather than mixed in."""
    spec = importlib.util.spec_from_file_location("make_lora_curves", REPO / "benchmarks" / "make_lora_curves.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rng = np.random.default_rng(module.SEED)
    jobs = [(i, module.draw_config(rng), int(rng.integers(2**31))) for i in range(6)]
    out = tmp_path / "lora.jsonl"
    assert module.kept_runs(out, jobs) == 0  # nothing yet: a fresh corpus
    out.write_text("".join(json.dumps({"id": f"lora-{i:03d}", "config": c}) + "\n" for i, c, _ in jobs[:4]))
    assert module.kept_runs(out, jobs) == 4
    with pytest.raises(SystemExit, match="more than --runs 3"):
        module.kept_runs(out, jobs[:3])
    edited = [{"id": f"lora-{i:03d}", "config": {**c, "lr": 0.1} if i == 2 else c} for i, c, _ in jobs[:4]]
    out.write_text("".join(json.dumps(r) + "\n" for r in edited))
    with pytest.raises(SystemExit, match="lora-002 is not draw 2"):
        module.kept_runs(out, jobs)


@pytest.mark.parametrize(("corpus", "runs", "kinds"), [("digits.jsonl", 400, {"scratch", "scratch-hard", "ssl"}),
                                                       ("digits_late_step.jsonl", 80, {"late-step"}),
                                                       ("digits_pairs.jsonl", 120, {"pairs"}),
                                                       ("lora_sst2.jsonl", 128, {"lora"})])
def test_the_committed_corpora_replay_as_generic_runs_with_their_plan_and_learning_rates(corpus, runs, kinds):
    """The corpora made by make_curves.py / make_lora_curves.py load through the replay's own validation:
    costs rise to the plan, every point carries its learning rate, accuracies lie in [0, 1]."""
    rc = _benchmark_module()
    records = [json.loads(line) for line in (REPO / "benchmarks" / "curves" / corpus).read_text().splitlines()]
    assert len(records) == runs and {r["kind"] for r in records} == kinds
    for record in records:
        run = rc.run_from_generic(record)
        assert np.all(np.diff(run.costs_usd) > 0), run.id
        assert run.planned_cost_usd == pytest.approx(run.costs_usd[-1], rel=1e-3), run.id
        assert run.lrs is not None and np.all(np.isfinite(run.lrs)) and np.all(run.lrs >= 0), run.id
        finite = run.metrics[np.isfinite(run.metrics)]
        assert np.all((finite >= 0.0) & (finite <= 1.0)) and 0.0 < run.baseline < 1.0, run.id
        assert run.anneals == (record["config"]["schedule"] != "constant"), run.id
