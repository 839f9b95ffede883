"""Marginal-gain stopping: is the next dollar of training still worth its accuracy?

A run's validation metric is fitted against its cumulative cost (in dollars) with a
small ensemble of learning-curve families (power laws from a straight line to strongly
saturating, and exponential saturation). The fit predicts how much the *kept* result
(the best checkpoint so far) would improve if the run spent more, with an epistemic
upper bound. The user prices one point of the metric (``usd_per_point``); the policy
stops when even the optimistic gain is worth less than it costs.

Units used throughout:

* ``cost_usd``: cumulative dollars spent by the run when the metric was measured.
* ``points``: the metric times ``points_per_unit`` (default 100), so accuracy 0.01 is
  one point, and a validation loss of 0.01 is one point too. ``usd_per_point`` is what
  one such point is worth to the user, in dollars.

This module is pure Python + numpy: it imports no Lightning, so the replay benchmark
(``benchmarks/replay_curves.py``) and the ``MarginalGainStopping`` callback run exactly
the same decision code.

Example::

    policy = MarginalGainPolicy(mode="max", usd_per_point=0.5)
    for cost_usd, val_acc in evaluations:
        decision = policy.observe(cost_usd, val_acc)
        if decision.stop:
            print(decision.reason)
            break
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from scipy.special import ndtr

from costaware.curve_prior import NO_PLAN, load_prior, lr_state, stage
from costaware.lr_schedule import LrArea, check_schedule
from costaware.validation import check_amount, check_count, is_number

__all__ = [
    "DEFAULT_USD_PER_POINT",
    "Decision",
    "GainEstimate",
    "MarginalGainPolicy",
]

#: Default price of one point of the metric, in dollars: near the operating price the
#: DeBERTa-MNLI replay chose on its tuning half ($0.55 at 400 examples/s on a $2/GPU-hour
#: GPU; see benchmarks/replay_curves.py). Only a starting point: set your own price.
DEFAULT_USD_PER_POINT = 0.5

_MODES = ("max", "min")
_STATE_VERSION = 2

# Curve families, each ``u = a + b * g(x)`` with ``x = cost / cost_now`` and g(1) = 0,
# so that ``a`` is the fitted value now and ``b * g(x)`` the gain at cost ``x * cost_now``.
# Box-Cox power law: g = (1 - x**-alpha) / alpha. alpha > 0 saturates (y = a - b c^-alpha),
# alpha = 0 is log-linear, alpha = -1 is a straight line (a still-rising run).
_POWER_ALPHAS = np.array([-1.0, -0.5, 0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0])
# Exponential saturation: g = (1 - exp(-k (x - 1))) / k  (y = a - b exp(-k c)).
_EXP_RATES = np.array([1.0, 2.0, 3.0, 5.0, 8.0, 12.0, 20.0])
# Slow-start shapes, sigmoidal in log cost (Domhan et al. 2015): log-logistic, the MMF family's
# shape, g ~ 1 / (1 + (x/m)^-s), and Weibull/Janoschek, g ~ 1 - exp(-(x/m)^s), with their
# midpoint m (relative to the cost now) and steepness s. Midpoints lie inside the fit window, where
# the data can show them: a rise that has not begun fits any size (a flat run would look like one
# about to take off), and what past runs say about that is the prior's job (curve_prior.py).
_SIGMOID_MIDS = np.array([0.6, 0.8, 1.0])
_SIGMOID_SLOPES = np.array([2.0, 5.0])
_SIG_M = np.repeat(_SIGMOID_MIDS, len(_SIGMOID_SLOPES))
_SIG_S = np.tile(_SIGMOID_SLOPES, len(_SIGMOID_MIDS))
_FAMILIES = (("power",) * len(_POWER_ALPHAS) + ("exp",) * len(_EXP_RATES)
             + ("loglogistic",) * len(_SIG_M) + ("weibull",) * len(_SIG_M))
# Prior mass of each family in the ensemble (split evenly among its grid points).
_FAMILY_PRIOR = {"power": 0.4, "exp": 0.4, "loglogistic": 0.1, "weibull": 0.1}
# Where a non-saturating component has no asymptote, "final" means this many times the
# cost spent so far.
_NO_PLAN_HORIZON = 10.0
# A collapse is this many consecutive evaluations far below the best (one is a glitch).
_COLLAPSE_EVALS = 3
# ... and more than this many noise SDs (of the evaluations before them) below it.
_COLLAPSE_NOISE_SDS = 4.0
# With a baseline, a fall back to chance is a collapse after this many evaluations: within _AT_CHANCE_SHARE of the
# way from the baseline to a best at least collapse_points above it. (After one, a from-scratch run at a high
# learning rate came back: 36 points up on the digits corpus; after two, none of the replay's 1,688 runs with a
# baseline did, and 114 had collapsed.)
_CHANCE_EVALS = 2
_AT_CHANCE_SHARE = 0.1
# Without a planned cost, look ahead at most this fraction of the cost spent so far.
_LOOKAHEAD_FRACTION = 1.0
# Robust pass: points this many robust SDs *worse* than the fit are glitches.
_GLITCH_SDS = 4.0
# The prior's interval for the final metric uses tails this fraction of the nominal (1 - c) / 2: a
# cell pools runs of several kinds, whose spread within the cell understates one run's own (on the
# replay's tune halves, 0.75 puts the pooled coverage of the stated 80% interval at 25% of each run
# at 81%; 1.0 gives 74%). With a team's own prior (fitted on one set's tune half), the test halves'
# coverage at 25% lies in 72-89% on all seven bounded sets of the replay. The shipped prior, which
# pools fine-tuning, from-scratch and SSL runs, states no interval (``CurvePrior.states_interval``):
# its coverage at 25% left 70-90% on 5 of 14 bounded halves, 4 of them of the sets never used for tuning
# (digits-pairs 92/100%, digits-late-step 51%, lora-sst2 69.6%), where the curve fit's leaves it on 2 (digits-pairs
# tune 66%, lora-sst2 test 91%); at 50%, on 7 against 2. The decisions do not depend on the stated interval.
_PRIOR_TAIL = 0.75
# Where the stage's own cell holds too few past runs and the prior falls back to a coarser one (the
# learning-rate state or the plan fraction dropped), the cell pools runs of other kinds still more:
# its tails are this fraction again (on the replay's tune halves, 0.5 brings the coverage at 25% of
# every data set into 70-90%; without it, from-scratch runs with a constant LR, pooled with
# fine-tuning runs, were covered 64% of the time).
_FALLBACK_TAIL = 0.5
# A run at chance waits for a slow start one step at a time, each up to this many times the cost so far: a
# doubling strategy, the usual answer to a wait whose end is unknown.
_AT_CHANCE_WAIT_GROWTH = 2.0
# The evaluation noise that prices the next evaluations pools the fit window's residuals with the whole run's
# scatter, weighted as this many evaluations. The whole run's scatter used as a floor (as it still is for the
# final metric's interval) overstates the noise once early evaluations at a high learning rate have scattered
# more, and with it what the next evaluation may add to the best: on DeBERTa's tune half the stated gain was
# 1.52x / 2.27x what the runs then made in the third / last quarter of a run, pooled 1.35x / 1.85x (no higher in
# the second half of the runs on any replayed set; replay_curves.py prints it). Regret fell at 85 of the 89
# (set, half, price) cells it changed. With pooling from the first evaluation, 2 had a lower regret than 4 at
# every price of that half; 0 (the window's residuals alone) trusted fits through three or four points that
# happened to lie on a curve (NAS-Bench-NLP at $10/point: runs stopped at their 4th-5th evaluation, one losing 127
# points).
_HISTORY_NOISE_EVALS = 2.0
# A window of fewer evaluations than this cannot measure its own scatter (a curve through three or four points
# may fit them by chance): there the whole run's scatter stays the floor. Pooled from the first evaluation, a
# single glitch 46 points down stopped a run at $100/point, and a straight rise worth twice its cost was stopped
# at its fifth evaluation.
_POOLED_MIN_EVALS = 8
# Where past runs are asked (a prior, a bounded metric), the rate a decision compares with the price is a
# weighted geometric mean of the fit's (its gain over the horizon most worth its cost) and the past runs' at this
# stage (the confidence quantile or the mean, where larger, of what the next doubling of the spend brought them).
# The fit alone overstates what the next stretch buys (its median gain in a run's last quarter, against what the run
# then made, in the committed replay: DeBERTa 1.2-1.5x, digits 1.2-4.7x, LoRA-SST2 7-11x), and past runs at the same
# stage know as much. Rank correlation (Spearman) with the rate the next doubling of the spend then made, DeBERTa at
# 25-50% of a run (replay_curves.py prints it): tune 0.690 for the fit's rate, 0.800 for past runs', 0.754 for the
# weighted mean; test 0.724, 0.764, 0.772; the weighted rate ranks above the fit's on all 14 bounded halves. The
# weight is inverse-variance on the log rate: the fit's spread is ln(its gain's confidence quantile / its median),
# the past runs' this figure; past runs never weigh more than the run's own fit (at most _PRIOR_RATE_MAX_WEIGHT).
# A fit that knows its gain (a clean straight rise, quantile 1.02x the median) keeps it: with a fixed weight of a
# half, 20 of 30 such rises worth 1.5x their cost were stopped. Against the fit alone (replay, both halves): regret
# lower at 66 of the 87 cells it changed, higher at 21 by at most 14% (LoRA-SST2 and digits-ssl at $3-$10);
# LoRA-SST2 (never used for tuning) below the best patience at 8 of 10 cells, 3 with the fit alone.
_PRIOR_RATE_SPREAD = math.log(2.0)
_PRIOR_RATE_MAX_WEIGHT = 0.5
# ... but not before the run has come this far from its baseline to the ceiling: near chance, the shipped prior pools
# fine-tuning runs that diverged (which stay there) with from-scratch ones that start late. Asked there, it stopped a
# 100-class run at 7% top-1 that went on to gain 18.9 points (digits-pairs, $10/point).
_PRIOR_RATE_MIN_PROGRESS = 0.1
# What the last evaluations say beyond the fitted curve: a run's deviation from it persists (a curve rising faster
# or flattening sooner than the fit says, and weights that move little between evaluations once the learning rate
# anneals). On the replay's tune halves, the next evaluation kept 0.2-0.4 of the last one's deviation on DeBERTa,
# 0.35-0.7 on digits SSL runs and all of it from scratch; so each draw of the curve is shifted, at every horizon,
# by this share of the mean deviation of the last _CARRY_EVALS evaluations (at most _CARRY_MAX_SDS noise SDs). A
# single dip is mostly noise that the next evaluation takes back, hence three (carrying the last one alone,
# NAS-Bench-NLP runs one evaluation into a dip stopped, and recovered 5 points at the next). In the replay, regret
# fell at 75 of the 82 (set, half, price) cells it changed, at all 10 of DeBERTa's by 1-12%, and rose at 7 by at
# most 13% (digits-ssl tune, $3). A share of 0.3 / 0.7 lowered the tune halves' regret by 2.7 / 5.3% (geometric
# mean), 0.5 by 4.0%: 0.5 is the middle of the persistence measured, not the best fit to the tune halves. At a
# constant learning rate, dips mean-revert: on NAS-Bench-NLP (constant rate, no plan) carrying them raised regret
# by up to 40% at $10/point (a run below its curve for three evaluations stopped, then recovered), so a run that
# trains at a constant rate as far as the policy knows carries nothing.
_RESIDUAL_CARRY = 0.5
_CARRY_EVALS = 3
_CARRY_MAX_SDS = 2.0
# Points of the fitted curve kept in an estimate (and the ledger) for plots.
_CURVE_POINTS = 24


@dataclass(frozen=True)
class GainEstimate:
    """What the next increment of cost is expected to buy.

    Attributes:
        gain_points: Median (over the curve-fit uncertainty) of the expected improvement
            of the best-so-far metric over the increment, in points (``points_per_unit``
            metric units; accuracy 0.01 = 1). Never above ``gain_points_upper``.
        gain_points_upper: The ``confidence`` quantile of that gain over the curve-fit
            uncertainty (epistemic), in points: [0, this] is a ``confidence`` interval.
        increment_usd: Cost of the increment judged, in dollars: the next evaluation
            interval (or ``increment_fraction`` of the cost so far), or the longer
            look-ahead horizon that was most worth its cost.
        gain_per_usd: The rate the policy compares with ``min_gain_per_usd``, in points per dollar:
            ``gain_points_upper / increment_usd`` (the horizon most worth its cost), or where past runs
            at this stage were asked, its weighted geometric mean with ``past_gain_points_upper /
            past_increment_usd`` (the weight on the past runs, at most 0.5, grows with the spread of the
            fit's gain: ``_PRIOR_RATE_SPREAD``).
        past_gain_points_upper: What past runs at this stage gained over the next doubling of their
            spend (the ``confidence`` quantile or the mean, where larger), in points; ``None`` where
            they were not asked (no prior, an unbounded metric, a run still near chance).
        past_increment_usd: That doubling's cost for this run, in dollars (at most to the plan's end, if any).
        predicted_final: Predicted metric (in the metric's own units, within its range)
            at the planned end if a plan was given, else at the fitted asymptote (or at 10x
            the cost so far for curves that do not saturate): the median of its
            predictive distribution, so it lies in the interval below.
        predicted_final_low: Low end of the central ``confidence`` interval of the final
            metric (worse end; in the metric's units).
        predicted_final_high: High end of that interval (better end).
        interval_from: Where that interval comes from: ``"the curve fit"`` (curve
            uncertainty plus evaluation noise) or the prior's past runs at this stage.
        usd_to_predicted_final: Dollars from now to the planned end, or ``None`` without a plan.
        curve: Curve families in the ensemble that priced the gain, with their posterior weights.
        curve_usd: Costs (dollars) at which the fitted curve is sampled, from the start of
            the fit window to the farthest horizon judged (or the planned end), for plots.
        curve_metric: The mean metric at those costs of the fit behind the predicted final (against
            dollars), in the metric's own units.
    """

    gain_points: float
    gain_points_upper: float
    increment_usd: float
    gain_per_usd: float
    predicted_final: float
    usd_to_predicted_final: float | None
    curve: str
    predicted_final_low: float = math.nan
    predicted_final_high: float = math.nan
    interval_from: str = "the curve fit"
    curve_usd: tuple = ()
    curve_metric: tuple = ()
    past_gain_points_upper: float | None = None
    past_increment_usd: float | None = None


@dataclass(frozen=True)
class _PriorView:
    """What the prior says at this stage, in points (higher is better)."""

    cell: str
    gain_upper: float
    final_low: float
    final_median: float
    final_high: float
    next_gain_upper: float  # over the next doubling of the spend (at most to the plan's end, if any): next_usd
    next_usd: float | None  # None where past runs are not asked (too near chance): the fit's rate alone
    planless: bool = False  # no plan (or past it): only the next doubling's rate applies, not the gains by the end


@dataclass(frozen=True)
class Decision:
    """One verdict of the policy.

    Attributes:
        stop: ``True`` when the next increment is not worth its cost (or the run diverged).
        reason: Human-readable explanation with the figures behind it.
        estimate: The gain estimate behind the verdict; ``None`` when no curve was fitted
            (too few points, non-finite metric, collapse).
    """

    stop: bool
    reason: str
    estimate: GainEstimate | None


class MarginalGainPolicy:
    """Decides, one evaluation at a time, whether training is still worth its cost.

    At each evaluation the policy fits the metric (in points, higher is better) against
    cumulative cost with an ensemble of curve families (Box-Cox power laws, from a
    straight line through log-linear to saturating ``a - b c^-alpha``, and exponential
    saturation ``a - b exp(-k c)``) weighted by their likelihood, on the most recent
    part of the run. It then predicts the expected improvement of the *best* value seen
    so far (the checkpoint you would keep) if the run spends its next increment, taking
    evaluation noise into account (a noisy run may still beat its best; a run below its
    best must first climb back): the scatter about the curve where it is fitted, steadied by
    the whole run's (early evaluations at a high learning rate scatter more). A run that has sat
    above or below its fitted curve for its last three evaluations is expected to stay there in part
    (half of it, within two noise SDs; the stated final metric too), unless it trains at a constant
    learning rate, where a dip mean-reverts. It looks at the next increment and at doubling
    horizons up to the planned end (or, without a plan, up to the cost spent so far again), since
    learning-rate annealing and recoveries from a dip pay off over several evaluations.
    With ``confidence`` c, it stops when, for every horizon, the c-quantile of that gain
    (over the fit's uncertainty) is worth less than the horizon costs::

        gain_points_upper * usd_per_point < increment_usd

    A quantile, not the mean: early in a run the fit leans towards saturating shapes, so its mean
    gain runs low on a run still rising steadily, and re-judged at every evaluation it stops such
    a run sooner or later (a straight rise worth 1.5x its cost, 27 times in 30 noise draws).

    A non-finite metric (NaN/inf: the run diverged) stops at once, even before
    ``min_points``; so does a collapse (three consecutive evaluations more than
    ``collapse_points`` below the best, and more than four times the run's evaluation noise before them: a noisy
    run, or a metric on another scale, dips by more; a single glitch is ignored, also by the fit). With a
    ``baseline``, two consecutive evaluations back at chance (within a tenth of the way from the baseline to a best
    at least ``collapse_points`` above it) are a collapse too: a diverged classifier predicting one class.

    A run whose best is still within ``start_fraction`` of its first evaluation
    (relative to that value, or for a bounded metric to its distance from the worse end: an
    error rate of 0.99 is 0.01 from its worst, as an accuracy of 0.01 is) has not started
    learning, and a fit cannot tell that plateau from convergence (runs often break out of
    it late). Such a run is worth waiting for as long as the wait costs less than the value
    of that improvement: the policy does not stop it on the fit while its cost so far is below
    ``start_fraction * |first metric - worse end (0 for a loss)| * points_per_unit * usd_per_point``. Once it has
    started, its learning curve begins at the last evaluation before the start: the fit
    ignores the plateau, and ``min_points`` counts from there.

    A ``baseline`` (the metric of a model that learned nothing, such as the majority
    class's share for accuracy) tells a run at chance level from a plateau: a run whose
    first evaluation is no better than the baseline starts once it is ``start_fraction``
    better than the baseline, and if it has not when that priced wait is over, it stops
    as not learning (typically a run that diverged before its first evaluation: its
    jumps between class shares would otherwise look like noise that may still yield a
    lucky best). Where no past runs can say whether it will start (no prior, no plan), that
    wait is at least the annealing wait below (up to ``anneal_points`` worth without a plan):
    a slow start takes longer than the value of its start threshold. A run that starts above
    the baseline is judged as without one.

    A run with a planned cost usually anneals its learning rate towards it, and annealing
    pays late: early on, the fit sees a noisy plateau at a high learning rate and calls it
    converged. With a plan, the policy does not stop on the fit before ``anneal_fraction``
    of the planned cost, as long as that wait costs less than ``anneal_points`` points are
    worth: it trusts the fit once the cost so far reaches
    ``min(anneal_fraction * planned_cost_usd, anneal_points * usd_per_point)``; with learning rates
    given to :meth:`observe`, a run whose rate is still warming up or at its peak waits up to the
    second figure whatever part of the plan it has spent (a step schedule may drop late). Without a
    plan, where the schedule stands is unknown: the wait is the second figure. A run that does not
    anneal (``anneals=False``: a constant learning rate) has nothing to wait for.

    With the schedule's learning rates ahead (``lr_schedule``) and a plan, the curve is fitted against the area
    under the learning rate (the sum of rate x dollars), not against dollars: progress goes with the distance the
    optimizer may travel, so the last stretch of a schedule that anneals to zero, where the weights barely move,
    is priced as the little it adds, and a peak still ahead as the much it may. The stated final metric, and the
    gain over the whole rest of the plan, stay fitted against dollars: the area misses the gain annealing brings by
    itself, which the end of a run shows.

    A curve fit cannot see a steep rise that has not begun (a from-scratch or self-supervised
    run at its warm-up or high-learning-rate plateau). With a ``prior`` (past runs), a bounded
    metric and a plan, the policy also asks what past runs at the same stage -- fraction of
    the plan spent, learning rate still near its peak or annealing (from the ``lr`` given to
    :meth:`observe`), how far from the baseline to the ceiling the run has come -- gained by
    their end: while the ``confidence`` quantile of that gain (or its mean, where larger: a
    rare late start counts) is worth more than the rest of the plan costs, it does not stop
    (neither on the fit nor as not learning). A run still at its baseline is not stopped as not
    learning while its learning rate is warming up or at its peak (or, without learning rates,
    before ``anneal_fraction`` of the plan) as long as that gain is worth more than the wait costs:
    a slow start shows once the schedule anneals, and waiting to see it commits to that wait only,
    not to the whole plan, judged one doubling of the spend at a time. Without a plan (none given, or
    the run past it), what past runs gained by their end is about an end this run does not have: a run
    at its baseline past the blind wait waits one doubling of its spend at a time while what past runs
    at chance gained over their next doubling is worth more than that doubling costs. The stated
    ``confidence`` interval of the final metric then comes from those past runs too when they are your
    own (a prior from ``costaware prior fit``); the shipped prior pools runs of several kinds, whose
    spread at a stage is not one run's, and leaves the interval to the fit. Once the run has come a
    tenth of the way from its baseline to the ceiling, past runs also price the next stretch: the rate
    compared with the price is the geometric mean of the fit's and of what the next doubling of the
    spend brought past runs at this stage, weighted towards theirs (at most half) as far as the fit is
    unsure of its gain (its ``confidence`` quantile far above its median); the fit alone overstates
    what the next stretch buys. That holds without a plan too (none given, or the run past it): from past
    runs at the same progress and momentum, at any share of their plan.

    Args:
        mode: ``"max"`` if higher is better (accuracy), ``"min"`` if lower is better
            (loss); for ``"min"`` the gain is the decrease.
        usd_per_point: What one point of the metric is worth to you, in dollars. A point
            is ``1 / points_per_unit`` metric units (accuracy 0.01 by default). Give this
            or ``min_gain_per_usd``, not both; if neither, ``DEFAULT_USD_PER_POINT``.
        min_gain_per_usd: Equivalent knob: the least gain, in points per dollar, worth
            paying for (``1 / usd_per_point``).
        confidence: In (0, 1). Quantile of the gain estimate that must fall below the
            cost; higher is more cautious (stops later).
        min_points: Never stop (except on NaN/collapse) before this many evaluations.
        points_per_unit: Points per unit of the metric. 100 makes accuracy points
            percentage points.
        increment_fraction: The next increment is the larger of the typical evaluation
            interval and this fraction of the cost spent so far. 0 = next evaluation.
        fit_fraction: The curve is fitted on the evaluations made during the last
            ``fit_fraction`` of the cost spent (at least ``min_points`` of them); early
            warm-up behaviour says little about the end of a run.
        planned_cost_usd: Total cost planned for the run, if known (e.g. from
            ``max_steps``); caps the increment and anchors ``predicted_final``. Past it (a
            plan estimated too low), the policy judges as if there were no plan.
        collapse_points: Drop below the best, in points, that counts as a collapse when
            seen three times in a row (twice, back at the ``baseline``); ``None`` disables collapse detection.
        start_fraction: Relative improvement over the first evaluation (over its distance from
            the worse end of a bounded metric) below which a run has not started learning (see
            above); ``None`` disables the wait.
        baseline: The metric of a model that has learned nothing, in the metric's own
            units (see above); ``None`` (default): none known.
        anneal_fraction: With a plan, the fraction of the planned cost before which the
            fit alone does not stop the run (see above); ``None`` disables the wait.
        anneal_points: The most the annealing wait may cost, in points (times
            ``usd_per_point`` in dollars): cheap points make the wait short.
        anneals: Whether the learning rate anneals towards the planned end; ``False``
            turns the annealing wait off. ``MarginalGainStopping`` sets it from the
            Trainer: ``True`` when the fit has a learning-rate scheduler.
        metric_range: The metric's (low, high) range: predictions and intervals never leave
            it. ``"auto"`` (default): [0, 1] for ``mode="max"`` while every value seen lies in
            it (accuracy), [0, inf) for ``mode="min"`` while every value is >= 0 (a loss);
            ``None``: unbounded.
        prior: What past runs say about how a run goes on (see above): ``"default"`` (the
            prior shipped with costaware, fitted on recorded fine-tuning, from-scratch and
            self-supervised runs), ``"from-scratch"`` (the shipped from-scratch and
            self-supervised runs alone: a run at chance is more often a slow start there than a
            diverged fine-tuning run), the path of a JSON file from ``costaware prior fit``, a
            :class:`~costaware.curve_prior.CurvePrior`, or ``None`` (the fit alone). Used
            when the metric is bounded on both sides and the run has a plan.
        lr_schedule: The learning rates the run's schedule sets, as ``[(fraction of the planned cost, lr), ...]``
            (``MarginalGainStopping`` reads them off the Trainer's scheduler): with a plan, the curve is fitted
            against the area under the learning rate instead of cost (see above). ``None``: against cost.
        n_samples: Monte-Carlo draws from the fitted ensemble for the gain distribution.
        seed: Seed of those draws; the same points always give the same decision.

    Raises:
        ValueError: On an invalid argument, naming it and the accepted values.

    Example::

        policy = MarginalGainPolicy(mode="min", usd_per_point=2.0)
        decision = policy.observe(cost_usd=1.25, metric=3.2)
    """

    def __init__(
        self,
        mode: str = "max",
        usd_per_point: float | None = None,
        min_gain_per_usd: float | None = None,
        confidence: float = 0.8,
        min_points: int = 3,
        points_per_unit: float = 100.0,
        increment_fraction: float = 0.0,
        fit_fraction: float = 0.5,
        planned_cost_usd: float | None = None,
        collapse_points: float | None = 20.0,
        start_fraction: float | None = 0.01,
        baseline: float | None = None,
        anneal_fraction: float | None = 0.5,
        anneal_points: float = 1.0,
        anneals: bool = True,
        metric_range: Any = "auto",
        prior: Any = "default",
        lr_schedule: Any = None,
        n_samples: int = 256,
        seed: int = 0,
    ) -> None:
        if mode not in _MODES:
            raise ValueError(f"`mode` must be one of {_MODES}, got {mode!r}")
        if usd_per_point is not None and min_gain_per_usd is not None:
            raise ValueError("give `usd_per_point` or `min_gain_per_usd`, not both")
        if min_gain_per_usd is not None:
            self.min_gain_per_usd = check_amount("min_gain_per_usd", min_gain_per_usd, minimum=0, strict=True)
        else:
            price = DEFAULT_USD_PER_POINT if usd_per_point is None else usd_per_point
            self.min_gain_per_usd = 1.0 / check_amount("usd_per_point", price, minimum=0, strict=True)
        # At least 0.5: the stated gain is the median, which must lie inside the stated interval.
        confidence = check_amount("confidence", confidence, minimum=0.5, maximum=1, strict_maximum=True)
        check_count("min_points", min_points, minimum=3)
        increment_fraction = check_amount("increment_fraction", increment_fraction, minimum=0, maximum=10)
        fit_fraction = check_amount("fit_fraction", fit_fraction, minimum=0, strict=True, maximum=1)
        anneal_fraction = check_amount("anneal_fraction", anneal_fraction, minimum=0, strict=True, allow_none=True,
                                       maximum=1)
        if not isinstance(anneals, bool):
            raise ValueError(f"`anneals` must be True or False, got {anneals!r}")
        if baseline is not None and not (is_number(baseline) and math.isfinite(baseline)):
            raise ValueError(f"`baseline` must be a finite number or None, got {baseline!r}")
        if baseline is not None and start_fraction is None:
            raise ValueError("`baseline` needs `start_fraction` (how much better than it a run must be to have "
                             "started); got start_fraction=None")
        check_count("n_samples", n_samples, minimum=16)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"`seed` must be an int, got {seed!r}")
        self.mode = mode
        self.usd_per_point = 1.0 / self.min_gain_per_usd
        self.confidence = float(confidence)
        self.min_points = min_points
        self.points_per_unit = check_amount("points_per_unit", points_per_unit, minimum=0, strict=True)
        self.increment_fraction = float(increment_fraction)
        self.fit_fraction = float(fit_fraction)
        self.planned_cost_usd = check_amount("planned_cost_usd", planned_cost_usd, minimum=0, strict=True,
                                             allow_none=True)
        self.collapse_points = check_amount("collapse_points", collapse_points, minimum=0, strict=True, allow_none=True)
        self.start_fraction = check_amount("start_fraction", start_fraction, minimum=0, strict=True, allow_none=True)
        self.baseline = None if baseline is None else float(baseline)
        self.anneal_fraction = anneal_fraction
        self.anneal_points = check_amount("anneal_points", anneal_points, minimum=0, strict=True)
        self.anneals = anneals
        self.metric_range = _check_range(metric_range)
        self.prior = load_prior(prior)
        self.lr_schedule = check_schedule(lr_schedule)
        self.n_samples = n_samples
        self.seed = seed
        self._sign = 1.0 if mode == "max" else -1.0
        self._costs_usd: list[float] = []
        self._metrics: list[float] = []
        self._lrs: list[float] = []  # NaN where not given

    # ------------------------------------------------------------------ public API
    def observe(
        self, cost_usd: float, metric: float, planned_cost_usd: float | None = None, anneals: bool | None = None,
        lr: float | None = None, lr_schedule: Any = None,
    ) -> Decision:
        """Records one evaluation and decides whether to stop.

        Args:
            cost_usd: Cumulative cost of the run when ``metric`` was measured, in
                dollars; must be finite and not below the previous one.
            metric: The monitored value (e.g. ``val_acc``); NaN/inf means the run diverged.
            planned_cost_usd: Updated total planned cost, if it became known or changed
                (overrides the constructor's value from now on).
            anneals: Updated ``anneals`` (overrides the constructor's value from now on).
            lr: The learning rate when ``metric`` was measured (the first parameter group's),
                if known: tells a run still at its peak learning rate from one that annealed.
            lr_schedule: Updated ``lr_schedule`` (overrides the constructor's value from now on).

        Returns:
            The decision; ``decision.estimate`` carries the figures.

        Raises:
            ValueError: If ``cost_usd`` is not finite, negative, or goes backwards.
        """
        cost_usd = float(cost_usd)
        if not math.isfinite(cost_usd) or cost_usd < 0:
            raise ValueError(f"`cost_usd` must be a finite number >= 0, got {cost_usd!r}")
        if self._costs_usd and cost_usd < self._costs_usd[-1]:
            raise ValueError(
                f"`cost_usd` must not decrease: got {cost_usd!r} after {self._costs_usd[-1]!r}"
            )
        if planned_cost_usd is not None:
            self.planned_cost_usd = check_amount("planned_cost_usd", planned_cost_usd, minimum=0, strict=True)
        if anneals is not None:
            if not isinstance(anneals, bool):
                raise ValueError(f"`anneals` must be True or False, got {anneals!r}")
            self.anneals = anneals
        if lr_schedule is not None:
            self.lr_schedule = check_schedule(lr_schedule)
        if lr is not None and not (is_number(lr) and lr >= 0):
            raise ValueError(f"`lr` must be a number >= 0 or None, got {lr!r}")
        metric = float(metric)
        self._costs_usd.append(cost_usd)
        self._metrics.append(metric)
        self._lrs.append(float("nan") if lr is None else float(lr))
        return self._decide()

    @property
    def num_points(self) -> int:
        """Number of evaluations observed so far."""
        return len(self._metrics)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: the points seen and the planned cost."""
        return {
            "version": _STATE_VERSION,
            "costs_usd": list(self._costs_usd),
            "metrics": list(self._metrics),
            "lrs": list(self._lrs),
            "planned_cost_usd": self.planned_cost_usd,
            "lr_schedule": None if self.lr_schedule is None else np.column_stack(self.lr_schedule).tolist(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores the points saved by :meth:`state_dict` (settings stay as constructed)."""
        version = state_dict.get("version", _STATE_VERSION)
        if not isinstance(version, int) or version > _STATE_VERSION:
            raise ValueError(f"policy state version {version!r} is newer than this costaware reads "
                             f"({_STATE_VERSION}); upgrade costaware")
        costs = [float(c) for c in state_dict["costs_usd"]]
        metrics = [float(m) for m in state_dict["metrics"]]
        if len(costs) != len(metrics):
            raise ValueError("`state_dict` has different numbers of costs and metrics")
        lrs = [float(v) for v in state_dict.get("lrs", [float("nan")] * len(costs))]  # version 1 had none
        if len(lrs) != len(costs):
            raise ValueError("`state_dict` has different numbers of costs and learning rates")
        self._costs_usd = costs
        self._metrics = metrics
        self._lrs = lrs
        if state_dict.get("planned_cost_usd") is not None:
            self.planned_cost_usd = float(state_dict["planned_cost_usd"])
        if state_dict.get("lr_schedule") is not None:  # (older states have none)
            self.lr_schedule = check_schedule(state_dict["lr_schedule"], "state_dict['lr_schedule']")

    # ------------------------------------------------------------------ decision
    def _decide(self) -> Decision:
        n = len(self._metrics)
        last = self._metrics[-1]
        if not math.isfinite(last):
            return Decision(True, f"metric is {last} at ${self._costs_usd[-1]:.4g}: the run diverged", None)
        costs = np.asarray(self._costs_usd, dtype=float)
        points = self._sign * self.points_per_unit * np.asarray(self._metrics, dtype=float)
        finite = np.isfinite(points)
        best = float(np.max(points[finite]))
        collapsed = self._collapse(costs, points, finite, best)
        if collapsed is not None:
            return Decision(True, collapsed, None)
        if n < self.min_points:
            return Decision(False, f"{n} of {self.min_points} evaluations needed before deciding", None)
        costs, points = costs[finite], points[finite]
        view = self._prior_view()
        prior_go = self._prior_says_go(view)
        if self.start_fraction is not None:
            reference, what, at_baseline = points[0], "the first evaluation", False
            if self.baseline is not None:
                baseline_points = self._sign * self.points_per_unit * self.baseline
                if baseline_points >= reference:
                    reference, what, at_baseline = baseline_points, f"the baseline {self.baseline:g}", True
            # Relative to the distance from the metric's worse end, where its range has one (an accuracy's 0, an
            # error rate's 1: the two mirror each other), else to the value itself (a loss).
            worst = self._range_points()[0]
            start_points = self.start_fraction * abs(reference - (worst if math.isfinite(worst) else 0.0))
            started = np.flatnonzero(points - reference >= start_points)
            wait_usd = start_points * self.usd_per_point
            # No past runs to say whether a run at chance will start (without a plan they cannot say by when).
            blind = at_baseline and (view is None or view.planless)
            if blind:
                wait_usd = max(wait_usd, self._blind_wait_at_chance_usd())
            if started.size == 0 and costs[-1] < wait_usd:
                return Decision(
                    False,
                    f"not started learning: {best - reference:.2f} points better than {what} "
                    f"(< {start_points:.3g}); waiting up to ${wait_usd:.4g} for it to start"
                    + (" (with no past runs to say whether it will start: the annealing wait)" if blind else ""),
                    None,
                )
            if started.size == 0 and at_baseline and prior_go is None:
                chance_go = self._prior_says_wait_at_chance(view)
                if chance_go is not None:
                    return Decision(False, chance_go, None)
                declined = ""
                if view is not None and view.planless and self.anneal_fraction is not None:
                    waits, figures = self._planless_doubling(view)
                    declined = "" if waits else f"; {figures}"  # it would pay, but its learning rate has annealed
                return Decision(
                    True,
                    f"not learning: the best, {self._to_metric(best):.6g}, is not "
                    f"{start_points:.3g} points better than {what} after ${costs[-1]:.4g} (waited up to "
                    f"${wait_usd:.4g}){declined}",
                    None,
                )
            if started.size:
                # The learning curve begins at the last evaluation before the start: the
                # plateau before it says nothing about how the run converges.
                origin = max(int(started[0]) - 1, 0)
                costs, points = costs[origin:], points[origin:]
                if len(points) < self.min_points:
                    return Decision(
                        False,
                        f"started learning at ${costs[1]:.4g}: {len(points)} of {self.min_points} "
                        "evaluations needed before deciding",
                        None,
                    )
        paid = costs > 0  # an evaluation before any spend has no place on a cost axis (log scale)
        costs, points = costs[paid], points[paid]
        if len(points) < self.min_points:
            return Decision(False, f"{len(points)} of {self.min_points} evaluations after the first spend "
                            "needed before deciding", None)
        remaining_usd = None
        if self.planned_cost_usd is not None and self.planned_cost_usd > costs[-1]:
            remaining_usd = self.planned_cost_usd - costs[-1]
        # Past a plan that was estimated too low, the policy judges as if there were no plan.
        estimate = self._estimate(costs, points, best, remaining_usd)
        if estimate is None:
            return Decision(False, "cost has not grown enough to fit a curve", None)
        if view is not None and not view.planless and self.prior is not None and self.prior.states_interval:
            ends = sorted((self._to_metric(view.final_low), self._to_metric(view.final_high)), key=self._key)
            estimate = replace(estimate, predicted_final=self._to_metric(view.final_median),
                               predicted_final_low=ends[0], predicted_final_high=ends[1],
                               interval_from=f"past runs ({view.cell})")
        if view is not None and view.next_usd is not None:
            estimate = self._with_past_rate(estimate, view)
        worth_usd = estimate.gain_points_upper * self.usd_per_point
        pct = f"{self.confidence:.0%}"
        figures = (
            f"next ${estimate.increment_usd:.4g} buys {estimate.gain_points:.3f} points (median; {pct} interval 0 to "
            f"{estimate.gain_points_upper:.3f}), worth up to ${worth_usd:.4g} at ${self.usd_per_point:.4g}/point; "
        )
        if estimate.past_increment_usd is not None:
            figures += (
                f"past runs at this stage gained up to {estimate.past_gain_points_upper:.3f} points over the next "
                f"${estimate.past_increment_usd:.4g} ({pct} quantile or mean): together {estimate.gain_per_usd:.4g} "
                f"points/$ (geometric mean, {_past_weight(estimate):.2f} on past runs), {self.min_gain_per_usd:.4g} "
                "needed; "
            )
        # In numbers' order (a loss's worse end is its larger number): the interval reads as a person writes one.
        ends = sorted((estimate.predicted_final_low, estimate.predicted_final_high))
        figures += (
            f"predicted final {estimate.predicted_final:.4g} ({pct} interval {ends[0]:.4g} to {ends[1]:.4g}, from "
            f"{estimate.interval_from})"
        )
        if estimate.gain_per_usd < self.min_gain_per_usd:
            wait_usd = self._anneal_wait_usd()
            if costs[-1] < wait_usd:
                to_what = ("to an end not planned" if self.planned_cost_usd is None
                           else f"to the planned ${self.planned_cost_usd:.4g}")
                return Decision(False, f"waiting for the annealing {to_what} until ${wait_usd:.4g} before trusting the "
                                f"fit ({figures})", estimate)
            if prior_go is not None:
                return Decision(False, f"{prior_go}; the fit alone would stop ({figures})", estimate)
            return Decision(True, f"not worth it: {figures}", estimate)
        return Decision(False, f"worth it: {figures}", estimate)

    def _collapse(self, costs: np.ndarray, points: np.ndarray, finite: np.ndarray, best: float) -> str | None:
        """Why the run collapsed, or None: its last three evaluations far below the best, or (with a baseline) its
        last two back at chance after it learned (a diverged model predicting one class)."""
        if self.collapse_points is None:
            return None
        m = _CHANCE_EVALS
        if self.baseline is not None and len(points) >= m and np.all(finite[-m:]):
            base = self._sign * self.points_per_unit * self.baseline
            if best - base >= self.collapse_points and np.all(points[-m:] <= base + _AT_CHANCE_SHARE * (best - base)):
                return (f"collapse: last {m} evaluations back at chance (within {_AT_CHANCE_SHARE:.0%} of the way "
                        f"from the baseline {self.baseline:g} to the best {self._to_metric(best):.4g})")
        k = _COLLAPSE_EVALS
        if len(points) < k or not np.all(finite[-k:]):
            return None
        drop = best - points[-k:]
        if np.any(drop <= self.collapse_points):
            return None
        # Far below the best for this run: a noisy run (an SSL probe early on) or a metric on another scale (a
        # percentage with points_per_unit=100) dips by more than collapse_points without collapsing.
        before = finite.copy()
        before[-k:] = False  # the scatter before the fall: the fall itself is not noise
        threshold = max(self.collapse_points, _COLLAPSE_NOISE_SDS * _local_noise_points(costs[before], points[before]))
        if np.any(drop <= threshold):
            return None
        return f"collapse: last {k} evaluations {drop.min():.2f}+ points below the best (threshold {threshold:.4g})"

    # ------------------------------------------------------------------ range and prior
    def _key(self, metric: float) -> float:
        """Sort key that orders metric values from worse to better."""
        return self._sign * metric

    def _to_metric(self, points: float) -> float:
        return self._sign * points / self.points_per_unit + 0.0  # + 0.0: a loss of 0 reads "0", not "-0"

    def _range_points(self) -> tuple[float, float]:
        """The metric's range in points, higher is better: (-inf, inf) when unbounded.

        ``metric_range="auto"``: accuracy-like (``mode="max"``, every value so far in [0, 1])
        is bounded by [0, 1]; a loss (``mode="min"``, every value >= 0) by 0 below.
        """
        bounds = self.metric_range
        if bounds == "auto":
            values = np.asarray(self._metrics, dtype=float)
            finite = values[np.isfinite(values)]
            bounds = None
            if finite.size and self.mode == "max" and finite.min() >= 0.0 and finite.max() <= 1.0:
                bounds = (0.0, 1.0)
            elif finite.size and self.mode == "min" and finite.min() >= 0.0:
                bounds = (0.0, math.inf)
        if bounds is None:
            return (-math.inf, math.inf)
        lo, hi = (self.points_per_unit * b for b in bounds)
        return (lo, hi) if self.mode == "max" else (-hi, -lo)

    def _lr_history(self) -> np.ndarray | None:
        """The learning rates given with every evaluation so far, or None where any is missing (unknown)."""
        lrs = np.asarray(self._lrs, dtype=float)
        return None if np.isnan(lrs).any() else lrs

    def _prior_view(self) -> _PriorView | None:
        """What past runs at this stage went on to gain, when the prior applies (a bounded metric).

        Without a plan (or past one), the stage has no share of the plan spent: the prior's cells that pool every
        share, and only the rate of the next doubling of the spend is asked (``_PriorView.planless``): what past
        runs gained by their end, or where they ended, is about an end this run does not have.
        """
        lo, hi = self._range_points()
        plan = self.planned_cost_usd
        cost_now = self._costs_usd[-1]
        if plan is not None and cost_now >= plan:
            plan = None  # past a plan estimated too low: judged as without one
        if self.prior is None or not (math.isfinite(lo) and math.isfinite(hi)):
            return None
        base = lo if self.baseline is None else min(max(self._sign * self.points_per_unit * self.baseline, lo), hi)
        points = self._sign * self.points_per_unit * np.asarray(self._metrics, dtype=float)
        cell, best, headroom = stage(self._costs_usd, np.where(np.isfinite(points), points, np.nan), lo, hi, base,
                                     cost_now if plan is None else plan, self._lr_history(), self.anneals)
        if plan is None:
            # Without a plan, a stage has no share of it spent: the lookup asks the cells of every share, at this
            # learning-rate state first. Replayed without plans or learning rates, past runs' rate from the cells of
            # every share lowered the regret at 69 of the 86 cells it changed (17 higher, 10 of them on
            # digits-pairs, by up to 29%; DeBERTa lower at all 10, LoRA-SST2 at 7 of 10); replayed without plans
            # but with learning rates, asking at the state first lowered it at 53 of 82 (29 higher, up to 37%).
            cell = (NO_PLAN, *cell[1:])
        key, _ = self.prior.lookup(cell)
        c = self.confidence
        tail = _PRIOR_TAIL * (_FALLBACK_TAIL if "*" in key else 1.0) * (1.0 - c) / 2.0
        final = [min(max(best + headroom * self.prior.quantile("final", cell, q), lo), hi)
                 for q in (tail, 0.5, 1.0 - tail)]
        # The gain worth waiting for: its `confidence` quantile, or its mean where that is larger
        # (most runs at chance stay there, but the few that start late gain tens of points).
        gain_fraction = max(self.prior.quantile("gain", cell, c), self.prior.gain_mean(cell))
        gain = min(max(headroom * gain_fraction, 0.0), hi - best)
        next_fraction = max(self.prior.quantile("next", cell, c), self.prior.next_mean(cell))
        next_gain = min(max(headroom * next_fraction, 0.0), hi - best)
        progress = (best - base) / max(hi - base, 1e-12)
        ahead_usd = cost_now if plan is None else min(cost_now, plan - cost_now)
        next_usd = ahead_usd if progress >= _PRIOR_RATE_MIN_PROGRESS and cost_now > 0 else None
        where = "no plan" if plan is None else f"{cost_now / plan:.0%} of the plan"
        return _PriorView(f"{where}, LR {cell[1]}, cell {key}", gain, final[0], final[1], final[2], next_gain,
                          next_usd, planless=plan is None)

    def _with_past_rate(self, estimate: GainEstimate, view: _PriorView) -> GainEstimate:
        """The estimate with its rate the weighted geometric mean of the fit's and past runs' at this stage (see
        ``_PRIOR_RATE_SPREAD``); each is floored at a thousandth of the rate a point's price asks, so that a zero on
        either side still leaves the other a say."""
        next_usd = view.next_usd
        assert next_usd is not None, "past runs are asked only where the view prices the next stretch"
        floor = 1e-3 * self.min_gain_per_usd
        fit_rate = max(estimate.gain_points_upper / estimate.increment_usd, floor)
        past_rate = max(view.next_gain_upper / next_usd, floor)
        w = _past_weight(estimate)
        return replace(estimate, gain_per_usd=math.exp((1.0 - w) * math.log(fit_rate) + w * math.log(past_rate)),
                       past_gain_points_upper=view.next_gain_upper, past_increment_usd=next_usd)

    def _prior_says_go(self, view: _PriorView | None) -> str | None:
        """Why to go on, when past runs at this stage gained more by their end than the rest of the plan costs."""
        if view is None or view.planless:
            return None
        assert self.planned_cost_usd is not None, "a prior view needs a plan"
        left_usd = self.planned_cost_usd - self._costs_usd[-1]
        worth_usd = view.gain_upper * self.usd_per_point
        if worth_usd <= left_usd:
            return None
        return (f"past runs at this stage ({view.cell}) gained up to {view.gain_upper:.3g} points by their end "
                f"({self.confidence:.0%} quantile or mean), worth ${worth_usd:.4g}, more than the ${left_usd:.4g} "
                "left of the plan")

    def _prior_says_wait_at_chance(self, view: _PriorView | None) -> str | None:
        """Why a run still at chance is not judged yet: its schedule has not annealed, and past runs at this stage
        gained more than waiting until it does costs.

        A slow start (from scratch, self-supervised) sits at chance while the learning rate warms up or stays at
        its peak, then rises. Waiting needs no commitment to the whole plan, only to the point where a start would
        show: ``anneal_fraction`` of the plan (or, with the learning rate still at its peak past it, halfway from
        there to the plan's end: a fixed point, so that a schedule that never anneals does not wait to the end).
        The wait is priced with the prior's gain against the cost of that wait alone, and taken one doubling of the
        spend at a time (at most to that point): a start is often near, and a wait that would not pay in one piece
        may still pay by halves. (On held-out runs whose rate drops only at 80% of the plan, judging the whole wait
        at once stopped one run at chance at 12% of its plan: it started at the next evaluation and lost 83 points.)
        Without a plan, past runs' next doubling prices it (:meth:`_planless_doubling`).
        """
        if view is None or self.anneal_fraction is None:
            return None
        state = lr_state(self._lr_history(), self.anneals)
        if state == "annealing":
            return None
        if view.planless:
            waits, figures = self._planless_doubling(view)
            return f"at chance, no plan, learning rate {state}: {figures}" if waits else None
        assert self.planned_cost_usd is not None, "a prior view with a share of the plan needs a plan"
        plan, cost_now = self.planned_cost_usd, self._costs_usd[-1]
        horizon_usd = self.anneal_fraction * plan
        if cost_now >= horizon_usd:
            horizon_usd += 0.5 * (plan - horizon_usd)
            if state not in ("warming", "high") or cost_now >= horizon_usd:
                return None
        horizon_usd = min(horizon_usd, _AT_CHANCE_WAIT_GROWTH * cost_now)
        wait_usd = horizon_usd - cost_now
        worth_usd = view.gain_upper * self.usd_per_point
        if worth_usd <= wait_usd:
            return None
        return (f"at chance, learning rate {state}: past runs at this stage ({view.cell}) gained up to "
                f"{view.gain_upper:.3g} points by their end, worth ${worth_usd:.4g}, more than the ${wait_usd:.4g} "
                f"of waiting until ${horizon_usd:.4g} for a slow start")

    def _planless_doubling(self, view: _PriorView) -> tuple[bool, str]:
        """Whether what past runs at chance gained over their next doubling is worth more than doubling this run's
        spend costs, and the figures that say so (for the reason either way).

        Without a plan, past runs' gains by their end are about an end this run does not have; the next doubling
        is the stretch a stop gives up, and the wait is taken one doubling at a time, as with a plan. (On the digits
        sets replayed without their plans, the blind wait alone, ``anneal_points`` worth, stopped runs at chance
        that went on to learn: at $10/point on digits-pairs' tune half, three stopped at $10.7-11.9 would have
        gained 16-37 points.)
        """
        cost_now = self._costs_usd[-1]
        worth_usd = view.next_gain_upper * self.usd_per_point
        waits = cost_now > 0 and worth_usd > cost_now
        return waits, (f"past runs at this stage ({view.cell}) gained up to {view.next_gain_upper:.3g} points as "
                       f"their spend doubled, worth ${worth_usd:.4g}, {'more' if waits else 'no more'} than the "
                       f"${cost_now:.4g} of doubling it")

    def _blind_wait_at_chance_usd(self) -> float:
        """Cost up to which a run at its baseline waits to start when no past runs can be asked (no prior, no plan,
        or a metric without bounds): the annealing wait, or without a plan, up to ``anneal_points`` worth.

        The start threshold alone (``start_fraction`` of the baseline: a tenth of a point for accuracy at 10%) prices
        a wait far shorter than a slow start takes: on the digits corpus replayed without its plans, runs that
        would have learned 30-80 points were stopped at their third or fourth evaluation.
        """
        if self.planned_cost_usd is None:  # whether or not it anneals
            return self.anneal_points * self.usd_per_point
        return self._anneal_wait_usd()

    def _anneal_wait_usd(self) -> float:
        """Cost before which the fit alone does not stop a run (0 for one that does not anneal).

        Without a plan, where the schedule stands is unknown (it may anneal at any time, or a slow start may be
        ahead): up to ``anneal_points`` worth. With learning rates given, a run whose rate is still warming up or at
        its peak has not annealed, whatever fraction of the plan it has spent (a step schedule may drop late): the
        wait lasts while it costs less than ``anneal_points`` are worth, not only up to ``anneal_fraction`` of the
        plan.
        """
        if self.anneal_fraction is None or not self.anneals:
            return 0.0
        cap_usd = self.anneal_points * self.usd_per_point
        if self.planned_cost_usd is None:  # the schedule ahead is unknown: as long as the wait costs at most that
            return cap_usd
        if lr_state(self._lr_history(), self.anneals) in ("warming", "high"):
            return min(self.planned_cost_usd, cap_usd)
        return min(self.anneal_fraction * self.planned_cost_usd, cap_usd)

    def _carried_deviation(self, x: np.ndarray, u: np.ndarray, draws: _Draws, noise_points: float) -> np.ndarray:
        """Per draw, the share of the last evaluations' deviation from that curve that the next ones keep, in points.

        Zero for a run that trains at a constant learning rate as far as the policy knows (``anneals=False``, or no
        learning rates and no plan): there a dip below the curve is noise that mean-reverts.
        """
        state = lr_state(self._lr_history(), self.anneals)
        if state == "constant" or (state == "unknown" and self.planned_cost_usd is None):
            return np.zeros(draws.level.shape)
        m = min(_CARRY_EVALS, len(u))
        deviation = (u[-m:, None] - draws.value_at(x[-m:])).mean(axis=0)
        bound = _CARRY_MAX_SDS * noise_points
        return _RESIDUAL_CARRY * np.clip(deviation, -bound, bound)

    def _estimate(
        self, costs: np.ndarray, points: np.ndarray, best: float, remaining_usd: float | None
    ) -> GainEstimate | None:
        cost_now = costs[-1]
        if cost_now <= 0:
            return None
        # Fit window: the last `fit_fraction` of the spend, at least `min_points` points.
        start = min(int(np.searchsorted(costs, (1.0 - self.fit_fraction) * cost_now)), len(costs) - self.min_points)
        # The curve's axis: cost, or with the schedule ahead known, the area under the learning rate.
        area = LrArea.of(self._costs_usd, self._lrs, self.lr_schedule, self.planned_cost_usd)
        axis_now = cost_now if area is None else float(area.at(cost_now))

        def axis(c: float | np.ndarray) -> np.ndarray:  # cost -> the curve's x (1 now)
            return np.asarray(c, dtype=float) / cost_now if area is None else area.at(c) / axis_now

        x = axis(costs[max(start, 0):])
        u = points[max(start, 0):]
        if x[0] >= 1.0 - 1e-9:
            return None
        steps = np.diff(costs)
        steps = steps[steps > 0]
        interval_usd = float(np.median(steps[-3:])) if steps.size else cost_now
        increment_usd = max(interval_usd, self.increment_fraction * cost_now)
        if remaining_usd is not None:
            increment_usd = min(increment_usd, remaining_usd)
        # Horizons: the next increment, then doubling, up to the planned end (or, without
        # a plan, _LOOKAHEAD_FRACTION of the cost so far). Gains from annealing and from
        # climbing out of a dip show up over a longer horizon than one evaluation.
        if remaining_usd is not None:
            max_usd = remaining_usd
        else:
            max_usd = max(increment_usd, _LOOKAHEAD_FRACTION * cost_now)
        horizon_list = [increment_usd]
        while horizon_list[-1] * 2.0 < max_usd:
            horizon_list.append(horizon_list[-1] * 2.0)
        if max_usd > horizon_list[-1]:
            horizon_list.append(max_usd)
        horizons_usd = np.asarray(horizon_list)
        # Two noise estimates, one per question. What the next evaluations bring: the scatter about the curve in
        # the fit window, pooled with the whole history's (a floor while the window is too short to measure its
        # own). The final metric, an extrapolation the ensemble is too sure of: the whole history's as a floor.
        history_noise = _local_noise_points(costs, points)
        fit = _fit_ensemble(x, u, history_noise, history_weight_evals=_HISTORY_NOISE_EVALS)
        rng = np.random.default_rng(self.seed + len(costs))
        draws = fit.sample(rng, self.n_samples)
        lo, hi = self._range_points()
        carried = self._carried_deviation(x, u, draws, fit.noise_points)
        # The final metric: the curve at the planned end (or its asymptote) plus evaluation noise, fitted with the
        # whole history's scatter as a floor, and against cost: against the learning-rate area, the gain that
        # annealing brings by itself is missed (at 25% of the tune halves' digits runs, the stated 80% interval
        # then held the final metric 58-81% of the time, the runs ending better). So the gain over the whole rest of
        # the plan comes from this curve too; the area prices the nearer horizons. A window too short to pool on
        # the cost axis: the gain's fit had the floor already, and its draws carry the same deviation.
        final_fit, final_draws, final_carried = fit, draws, carried
        if fit.pooled or area is not None:
            x_cost = costs[max(start, 0):] / cost_now
            final_fit = _fit_ensemble(x_cost, u, history_noise)
            rng = np.random.default_rng(self.seed + len(costs))  # seeded as the gain's: the same interval either way
            final_draws = final_fit.sample(rng, self.n_samples)
            final_carried = self._carried_deviation(x_cost, u, final_draws, final_fit.noise_points)
        x_final = 1.0 + remaining_usd / cost_now if remaining_usd is not None else None
        # Expected improvement of the kept (best) value, over evaluation noise, per draw.
        # With the area as the axis, the last horizon (the planned end) is priced on the curve against dollars.
        end_on_cost = area is not None and x_final is not None
        x_h = axis(cost_now + (horizons_usd[:-1] if end_on_cost else horizons_usd))
        means = draws.value_at(x_h) + carried  # (horizons, samples)
        if end_on_cost:
            means = np.vstack([means, final_draws.value_at(np.array([x_final])) + final_carried])
        means = np.clip(means, lo, hi)  # a bounded metric stays in range
        gains = _expected_improvement(means, fit.noise_points, best)  # the same evaluation noise at every horizon
        gain_median = np.median(gains, axis=1)
        gain_upper_all = np.quantile(gains, self.confidence, axis=1)
        h = int(np.argmax(gain_upper_all / horizons_usd))
        increment_usd = float(horizons_usd[h])
        gain_points = float(gain_median[h])
        gain_upper = float(gain_upper_all[h])
        final_mean = final_draws.value_at(x_final) if x_final is not None else final_draws.asymptote()
        final_mean = final_mean + final_carried  # the deviation carried, as in the gain
        final = np.clip(final_mean + final_fit.noise_points * rng.standard_normal(final_mean.shape), lo, hi)
        c = self.confidence
        final_low, final_points, final_high = np.quantile(final, [(1.0 - c) / 2.0, 0.5, (1.0 + c) / 2.0])
        # The fitted curve, for plots: the ensemble mean from the fit window to the horizon, the fit behind the
        # predicted final (against dollars), so that the plotted curve ends where the stated final metric is.
        curve_usd = np.linspace(float(costs[max(start, 0)]), cost_now + float(horizons_usd[-1]), _CURVE_POINTS)
        curve_points = np.clip(final_draws.value_at(curve_usd / cost_now), lo, hi).mean(axis=1)
        ends = sorted((self._to_metric(float(final_low)), self._to_metric(float(final_high))), key=self._key)
        return GainEstimate(
            predicted_final_low=ends[0],
            predicted_final_high=ends[1],
            curve_usd=tuple(float(c) for c in curve_usd),
            curve_metric=tuple(float(v) for v in self._sign * curve_points / self.points_per_unit),
            gain_points=gain_points,
            gain_points_upper=gain_upper,
            increment_usd=increment_usd,
            gain_per_usd=gain_upper / increment_usd,
            predicted_final=self._to_metric(float(final_points)),
            usd_to_predicted_final=remaining_usd,
            curve=fit.describe(),
        )


def _past_weight(estimate: GainEstimate) -> float:
    """The weight on past runs' rate (see ``_PRIOR_RATE_SPREAD``): inverse-variance on the log rate, at most
    ``_PRIOR_RATE_MAX_WEIGHT``; the fit's spread is ln(its gain's confidence quantile / its median)."""
    fit_spread = math.log(max(estimate.gain_points_upper, 1e-12) / max(estimate.gain_points, 1e-12))
    return min(_PRIOR_RATE_MAX_WEIGHT, fit_spread**2 / (fit_spread**2 + _PRIOR_RATE_SPREAD**2))


def _check_range(metric_range: Any) -> Any:
    """``"auto"``, ``None`` or a (low, high) pair with low < high (either may be infinite)."""
    if metric_range is None or (isinstance(metric_range, str) and metric_range == "auto"):
        return metric_range
    try:
        lo, hi = (float(v) for v in metric_range)
    except (TypeError, ValueError):
        lo = hi = math.nan
    if not (lo < hi) or math.isnan(lo) or math.isnan(hi):
        raise ValueError(f"`metric_range` must be 'auto', None or (low, high) with low < high, got {metric_range!r}")
    return (lo, hi)


# ---------------------------------------------------------------------- fitting
def _basis(x: np.ndarray) -> np.ndarray:
    """Basis values g_k(x), shape (n_components, len(x)), all zero at x = 1."""
    x = np.asarray(x, dtype=float)
    logx = np.log(x)
    a = _POWER_ALPHAS[:, None]
    safe_a = np.where(a == 0.0, 1.0, a)
    power = np.where(a == 0.0, logx, -np.expm1(-safe_a * logx) / safe_a)
    k = _EXP_RATES[:, None]
    expo = -np.expm1(np.clip(-k * (x - 1.0), -700.0, 50.0)) / k
    return np.vstack([power, expo, _loglogistic(x) - _loglogistic(np.ones(1)), _weibull(x) - _weibull(np.ones(1))])


def _loglogistic(x: np.ndarray) -> np.ndarray:
    """1 / (1 + (x/m)^-s) for each (m, s) of the grid: shape (grid, len(x))."""
    z = np.clip(-_SIG_S[:, None] * (np.log(x)[None, :] - np.log(_SIG_M)[:, None]), -50.0, 50.0)
    return 1.0 / (1.0 + np.exp(z))


def _weibull(x: np.ndarray) -> np.ndarray:
    """1 - exp(-(x/m)^s) for each (m, s) of the grid: shape (grid, len(x))."""
    z = np.clip(_SIG_S[:, None] * (np.log(x)[None, :] - np.log(_SIG_M)[:, None]), -50.0, 50.0)
    return -np.expm1(-np.exp(z))


def _basis_limit() -> np.ndarray:
    """g_k at infinite cost for saturating components, at 10x cost for the others."""
    far = _basis(np.array([_NO_PLAN_HORIZON]))[:, 0]
    limit = far.copy()
    sat = _POWER_ALPHAS > 0
    limit[: len(_POWER_ALPHAS)][sat] = 1.0 / _POWER_ALPHAS[sat]
    n_pe = len(_POWER_ALPHAS) + len(_EXP_RATES)
    limit[len(_POWER_ALPHAS):n_pe] = 1.0 / _EXP_RATES
    one = np.ones(1)
    limit[n_pe:n_pe + len(_SIG_M)] = 1.0 - _loglogistic(one)[:, 0]
    limit[n_pe + len(_SIG_M):] = 1.0 - _weibull(one)[:, 0]
    return limit


_BASIS_LIMIT = _basis_limit()
_LOG_FAMILY_PRIOR = np.log(np.array([_FAMILY_PRIOR[f] / _FAMILIES.count(f) for f in _FAMILIES]))


def _expected_improvement(mean: np.ndarray, sd: float, best: float) -> np.ndarray:
    """E[max(0, Y - best)] for Y ~ N(mean, sd^2): what the kept checkpoint gains."""
    z = (mean - best) / sd
    return sd * (z * ndtr(z) + np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi))


@dataclass
class _Draws:
    """Samples of curve parameters: value(x) = level + slope * (g_comp(x) - g_mean)."""

    comp: np.ndarray
    level: np.ndarray
    slope: np.ndarray
    g_mean: np.ndarray

    def value_at(self, x: float | np.ndarray) -> np.ndarray:
        """Values at cost ratio(s) x: shape (samples,) for a scalar, (len(x), samples) else."""
        xs = np.atleast_1d(np.asarray(x, dtype=float))
        g = _basis(xs).T  # (len(x), components)
        out = self.level + self.slope * (g[:, self.comp] - self.g_mean[self.comp])
        return out[0] if np.ndim(x) == 0 else out

    def asymptote(self) -> np.ndarray:
        return self.level + self.slope * (_BASIS_LIMIT[self.comp] - self.g_mean[self.comp])


@dataclass
class _EnsembleFit:
    """Least-squares fits of every grid component with their posterior weights."""

    weights: np.ndarray
    g_mean: np.ndarray
    u_mean: float
    slope: np.ndarray
    slope_sd: np.ndarray
    level_sd: float
    noise_points: float
    noise_dof: float
    pooled: bool  # the noise pools the window's scatter with the history's (else the history's is a floor)

    def sample(self, rng: np.random.Generator, n: int) -> _Draws:
        comp = rng.choice(self.weights.size, size=n, p=self.weights)
        z = rng.standard_normal((2, n))
        # The noise SD is itself estimated from few points: draw it (scaled inverse
        # chi-square), which makes the parameters Student-t -- cautious early in a run.
        scale = np.sqrt(self.noise_dof / rng.chisquare(self.noise_dof, size=n))
        level = self.u_mean + self.level_sd * scale * z[0]
        slope = self.slope[comp] + self.slope_sd[comp] * scale * z[1]
        return _Draws(comp=comp, level=level, slope=slope, g_mean=self.g_mean)

    def describe(self) -> str:
        mass = {f: 0.0 for f in dict.fromkeys(_FAMILIES)}
        for fam, w in zip(_FAMILIES, self.weights):
            mass[fam] += float(w)
        top = int(np.argmax(self.weights))
        n_pe = len(_POWER_ALPHAS) + len(_EXP_RATES)
        if top < len(_POWER_ALPHAS):
            param = f"alpha={_POWER_ALPHAS[top]:g}"
        elif top < n_pe:
            param = f"k={_EXP_RATES[top - len(_POWER_ALPHAS)]:g}"
        else:
            j = (top - n_pe) % len(_SIG_M)
            param = f"midpoint={_SIG_M[j]:g}x, steepness={_SIG_S[j]:g}"
        parts = ", ".join(f"{f} {m:.2f}" for f, m in mass.items())
        return f"ensemble({parts}; top {_FAMILIES[top]} {param})"


def _local_noise_points(costs: np.ndarray, points: np.ndarray) -> float:
    """Robust evaluation-noise SD from each point's deviation from its neighbours' chord.

    Uses the whole history, so it is stable when the fit window has few points; any
    curvature left in the chord only makes it larger (more cautious).
    """
    if len(points) < 3:
        return 0.0
    c0, c1, c2 = costs[:-2], costs[1:-1], costs[2:]
    span = c2 - c0
    ok = span > 0
    if not np.any(ok):
        return 0.0
    t = np.where(ok, (c1 - c0) / np.where(ok, span, 1.0), 0.5)
    chord = points[:-2] * (1.0 - t) + points[2:] * t
    dev = (points[1:-1] - chord)[ok]
    inflation = np.sqrt(1.0 + (1.0 - t[ok]) ** 2 + t[ok] ** 2)
    return float(1.4826 * np.median(np.abs(dev) / inflation))


def _fit_ensemble(
    x: np.ndarray, u: np.ndarray, history_noise_points: float = 0.0, history_weight_evals: float | None = None,
) -> _EnsembleFit:
    """Fits u = a + b g_k(x) for every component k, robustly, and weights them.

    Each component is linear in (a, b), so its fit is closed-form; one robust pass drops
    points with residuals beyond 4 robust SDs of the best fit (single glitches). The noise
    SD pools the residuals with ``history_noise_points`` as ``history_weight_evals`` more
    evaluations would; with ``None``, that figure is a floor instead.
    """
    g = _basis(x)
    w = np.ones_like(u)
    for attempt in range(2):
        sw = w.sum()
        g_mean = (g * w).sum(axis=1) / sw
        u_mean = float((u * w).sum() / sw)
        gc = g - g_mean[:, None]
        uc = u - u_mean
        sgg = (gc * gc * w).sum(axis=1)
        sgu = (gc * uc * w).sum(axis=1)
        suu = float((uc * uc * w).sum())
        ok = sgg > 1e-12 * max(1.0, float(np.max(sgg)))
        slope = np.where(ok, sgu / np.where(ok, sgg, 1.0), 0.0)
        sse = np.maximum(suu - slope * sgu, 0.0)
        sse = np.where(ok, sse, np.inf)
        k_best = int(np.argmin(sse))
        resid = uc - slope[k_best] * gc[k_best]
        if attempt == 1:
            break
        active = w > 0
        mad = float(np.median(np.abs(resid[active] - np.median(resid[active]))))
        scale = 1.4826 * mad
        if scale <= 0:
            break
        new_w = (resid >= -_GLITCH_SDS * scale - 1e-12).astype(float)  # improvements are kept
        if new_w.sum() < 3 or np.array_equal(new_w, w):
            break
        w = new_w
    n_eff = float(w.sum())
    dof = max(n_eff - 3.0, 1.0)
    sse_min = float(sse[k_best])
    scale_u = max(float(np.max(np.abs(u))), 1.0)
    pooled = history_weight_evals is not None and n_eff >= _POOLED_MIN_EVALS
    if pooled and history_weight_evals is not None:  # pooled, as that many more evaluations
        noise_var = (sse_min + history_weight_evals * history_noise_points**2) / (dof + history_weight_evals)
    else:  # the history's scatter as a floor
        noise_var = max(sse_min / dof, history_noise_points**2)
    noise_var = max(noise_var, (1e-6 * scale_u) ** 2)
    loglik = -0.5 * (sse - sse_min) / noise_var
    logpost = np.where(np.isfinite(loglik), loglik, -np.inf) + _LOG_FAMILY_PRIOR
    post = np.exp(logpost - np.max(logpost))
    post /= post.sum()
    slope_sd = np.sqrt(noise_var / np.where(ok, sgg, np.inf))
    return _EnsembleFit(
        weights=post,
        g_mean=g_mean,
        u_mean=u_mean,
        slope=slope,
        slope_sd=slope_sd,
        level_sd=math.sqrt(noise_var / n_eff),
        noise_points=math.sqrt(noise_var),
        # The draw's degrees of freedom: n - 2, chosen on the replay's tune half (rather than
        # n - 3, the variance estimate's own).
        noise_dof=max(n_eff - 2.0, 1.0),
        pooled=pooled,
    )
