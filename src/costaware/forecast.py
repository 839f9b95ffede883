"""The arithmetic of budgets: batch costs, the stop reserve, stop decisions and forecasts.

A cost here is a ``dict`` from unit to amount over :data:`UNITS` (``usd``, ``kwh``,
``co2_kg``, ``gpu_hours``, ``flops``, ``elapsed_s``), the units a run's
:class:`~costaware.ledger.Totals` carries and a cap can limit. :class:`BudgetPlanner` is the
decision: it is fed what each training batch, each validation run and each checkpoint save cost,
and says after every batch whether to stop *now*, so that the next batch, the validation run and
checkpoint that a stop entails, and any validation already scheduled, all fit under every cap.

Why not the mean step cost: a stop decided on the mean overshoots whenever the last batch is a
long-sequence bucket or a slow step. The planner predicts the next batch with the *maximum* of
the recent batch costs (warm-up batches excluded), and the validation run and checkpoint with the
largest ones measured plus a 20% margin, so variable costs leave some of the budget unused
instead of overshooting. Forecasts, where an error in either direction is as bad, use means.

This module imports no Lightning: the ``BudgetCap`` callback and the replay benchmark
(``benchmarks/cap_precision.py``) run exactly the same decision code.

Example::

    planner = BudgetPlanner(check_caps({"max_usd": 5.0}))
    spent = zero()
    for usd in batch_costs_usd:                  # what each training batch cost
        batch = {**zero(), "usd": usd}
        spent = add(spent, batch)
        planner.observe_batch(batch)
        breach = planner.decide(spent, StopPlan(validation_on_stop=False))
        if breach is not None:
            print(f"stop: {breach.cap} would be crossed ({breach.predicted:.2f} > {breach.limit})")
            break
"""

from __future__ import annotations

import math
import re
from collections import deque
from dataclasses import asdict, dataclass, replace
from datetime import timedelta
from numbers import Real
from typing import Any, Mapping, Optional

from costaware.validation import check_amount, check_count

__all__ = [
    "CAP_UNITS",
    "RESERVE_MARGIN",
    "UNITS",
    "WARN_FRACTIONS",
    "Breach",
    "BudgetPlanner",
    "RecentCosts",
    "StopPlan",
    "add",
    "check_caps",
    "cost_of",
    "describe",
    "parse_duration_s",
    "scale",
    "subtract",
    "validation_after",
    "validations_between",
    "zero",
]

#: Units a cost is measured in, as named on :class:`~costaware.ledger.Totals`.
UNITS = ("usd", "kwh", "co2_kg", "gpu_hours", "flops", "elapsed_s")

#: ``BudgetCap`` argument -> the unit it caps.
CAP_UNITS = {
    "max_usd": "usd",
    "max_kwh": "kwh",
    "max_co2_kg": "co2_kg",
    "max_gpu_hours": "gpu_hours",
    "max_flops": "flops",
    "max_time": "elapsed_s",
}

# Short names accepted in the ``caps={...}`` dict form, besides the argument names.
_CAP_ALIASES = {**{unit: arg for arg, unit in CAP_UNITS.items()}, "time": "max_time", "co2": "max_co2_kg"}

#: Fractions of a cap at which a warning is given (once each).
WARN_FRACTIONS = (0.5, 0.8, 0.95)

#: Post-warm-up batches measured before a forecast is made.
FORECAST_MIN_BATCHES = 3

#: Validation runs and checkpoint saves are measured a few times only: the stop reserve takes the
#: largest measured plus this margin (covers validation runs up to ~15% apart).
RESERVE_MARGIN = 0.20

#: Before a validation run is measured, one validation batch is taken to cost this fraction of a
#: training batch for the reserve (an upper bound: no backward pass, no optimizer step) ...
VALIDATION_BATCH_RESERVE_FRACTION = 1.0
#: ... and this fraction for forecasts (forward only, but the same data loading).
VALIDATION_BATCH_FORECAST_FRACTION = 0.5

_STATE_VERSION = 1

#: At most this many batches in a row skip BudgetCap's decision (none near a cap): see ``safe_skips``.
MAX_SKIPPED_BATCHES = 7


# ---------------------------------------------------------------------------------------------
# Cost vectors
# ---------------------------------------------------------------------------------------------


def zero() -> dict:
    """A cost of nothing in every unit."""
    return dict.fromkeys(UNITS, 0.0)


def cost_of(totals: Any) -> dict:
    """The cost vector of a :class:`~costaware.ledger.Totals` (or any object with those fields)."""
    return {unit: float(getattr(totals, unit)) for unit in UNITS}


def add(*costs: Mapping[str, float]) -> dict:
    """The sum of cost vectors."""
    out = zero()
    for cost in costs:
        for unit in UNITS:
            out[unit] += cost.get(unit, 0.0)
    return out


def subtract(a: Mapping[str, float], b: Mapping[str, float], floor: Optional[float] = 0.0) -> dict:
    """``a - b`` per unit, clamped at ``floor`` (a meter's reading never makes a cost negative)."""
    out = {unit: a.get(unit, 0.0) - b.get(unit, 0.0) for unit in UNITS}
    if floor is not None:
        out = {unit: max(value, floor) for unit, value in out.items()}
    return out


def scale(cost: Mapping[str, float], factor: float) -> dict:
    """A cost vector times a number."""
    return {unit: cost.get(unit, 0.0) * factor for unit in UNITS}


# ---------------------------------------------------------------------------------------------
# Validating caps
# ---------------------------------------------------------------------------------------------


def parse_duration_s(value: Any, name: str = "max_time") -> float:
    """Seconds from a ``timedelta``, a number of seconds, ``"DD:HH:MM:SS"`` (like Lightning's
    ``Timer``, with hours 00-23 and minutes and seconds 00-59) or a dict of ``timedelta``
    arguments (``{"hours": 2}``).

    Raises:
        ValueError: the value does not parse; the message names ``name`` and the accepted forms.
    """
    forms = ("a datetime.timedelta, a number of seconds, a 'DD:HH:MM:SS' string (e.g. '00:12:00:00') "
             "or a dict of timedelta arguments (e.g. {'hours': 12})")
    text = value.strip() if isinstance(value, str) else ""
    match = re.fullmatch(r"(\d+):(\d\d):(\d\d):(\d\d)", text)
    if match and (int(match.group(2)) >= 24 or int(match.group(3)) >= 60 or int(match.group(4)) >= 60):
        raise ValueError(f"{name}={value!r} is not a 'DD:HH:MM:SS' duration: hours must be 00-23 and minutes "
                         f"and seconds 00-59 (e.g. '01:12:30:00' for a day, 12 hours and 30 minutes)")
    try:
        if isinstance(value, timedelta):
            seconds = value.total_seconds()
        elif isinstance(value, bool):
            raise ValueError
        elif isinstance(value, Real):
            seconds = float(value)
        elif match:
            days, hours, minutes, secs = (int(g) for g in match.groups())
            seconds = timedelta(days=days, hours=hours, minutes=minutes, seconds=secs).total_seconds()
        elif isinstance(value, str):
            seconds = float(text)  # "3600" from a command line
        elif isinstance(value, Mapping):
            seconds = timedelta(**dict(value)).total_seconds()
        else:
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name}={value!r} is not a duration: give {forms}") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{name} must be a positive duration, got {value!r} ({seconds} s)")
    return seconds


def check_caps(explicit: Mapping[str, Any], caps: Optional[Mapping[str, Any]] = None) -> dict:
    """Validate caps given as arguments (``{"max_usd": 5, "max_time": "00:01:00:00"}``) and in a
    ``caps`` dict, whose keys may also be the short unit names (``usd``, ``kwh``, ``co2_kg``,
    ``gpu_hours``, ``flops``, ``time``). ``None`` values mean "no cap".

    Returns:
        ``{argument name: limit}`` with ``max_time`` in seconds, in the order of :data:`CAP_UNITS`.

    Raises:
        ValueError: an unknown key, a cap given twice, no cap at all, or a limit that is not a
            finite number > 0; the message names the argument and the accepted values.
    """
    if caps is not None and not isinstance(caps, Mapping):
        raise ValueError(f"caps must be a dict such as {{'usd': 5, 'time': '00:12:00:00'}}, got {caps!r}")
    accepted = ", ".join([*CAP_UNITS, *(k for k in _CAP_ALIASES if k not in CAP_UNITS)])
    named: list = []
    for key, value in explicit.items():
        if key not in CAP_UNITS:
            raise ValueError(f"unknown cap {key!r}: accepted caps are {', '.join(CAP_UNITS)}")
        named.append((key, key, value))
    for key, value in (caps or {}).items():
        arg = key if key in CAP_UNITS else _CAP_ALIASES.get(key)
        if arg is None:
            raise ValueError(f"caps has an unknown key {key!r}: accepted keys are {accepted}")
        named.append((arg, f"caps[{key!r}]", value))
    limits: dict = {}
    for arg, name, value in named:
        if value is None:
            continue
        if arg in limits:
            raise ValueError(f"cap {arg} is given twice ({name} repeats it)")
        if arg == "max_time":
            limits[arg] = parse_duration_s(value, name)
            continue
        limits[arg] = check_amount(name, value, minimum=0, strict=True,
                                   why=" (a cap of nothing would stop before the first step)")
    if not limits:
        raise ValueError(f"no cap given: set at least one of {', '.join(CAP_UNITS)} (or caps={{...}})")
    return {arg: limits[arg] for arg in CAP_UNITS if arg in limits}


# ---------------------------------------------------------------------------------------------
# Lightning's validation schedule, as arithmetic
# ---------------------------------------------------------------------------------------------


def _validations_up_to(batch: int, batches_per_epoch: float, val_check_batch: Optional[float],
                       check_val_every_n_epoch: Optional[int]) -> int:
    """Validation runs after training batches 1..``batch`` (1-based, counted over the run)."""
    if batch <= 0 or not val_check_batch or not math.isfinite(val_check_batch):
        return 0
    vcb = int(val_check_batch)
    if check_val_every_n_epoch is None:
        return batch // vcb  # every val_check_batch batches, across epochs
    if not batches_per_epoch or not math.isfinite(batches_per_epoch):
        return 0
    nb = int(batches_per_epoch)
    k = int(check_val_every_n_epoch)
    epochs, rest = divmod(batch, nb)
    per_epoch = nb // vcb
    partial = rest // vcb if (epochs + 1) % k == 0 else 0
    return (epochs // k) * per_epoch + partial


def validations_between(first_batch: int, last_batch: int, batches_per_epoch: float,
                        val_check_batch: Optional[float],
                        check_val_every_n_epoch: Optional[int]) -> int:
    """How many validation runs Lightning's schedule puts after batches ``first_batch + 1`` to
    ``last_batch`` (1-based counts over the run).

    Mirrors ``_TrainingEpochLoop._should_check_val_fx``: with ``check_val_every_n_epoch=None``
    every ``val_check_batch`` batches of the run; otherwise every ``val_check_batch`` batches of
    every ``check_val_every_n_epoch``-th epoch. A schedule that cannot be counted (an iterable
    dataset, a time-based ``val_check_interval``) counts 0.
    """
    if last_batch <= first_batch:
        return 0
    return (_validations_up_to(last_batch, batches_per_epoch, val_check_batch, check_val_every_n_epoch)
            - _validations_up_to(first_batch, batches_per_epoch, val_check_batch, check_val_every_n_epoch))


def validation_after(batch: int, batches_per_epoch: float, val_check_batch: float,
                     check_val_every_n_epoch: Optional[int]) -> bool:
    """Whether Lightning's schedule validates right after training batch ``batch`` (1-based)."""
    return validations_between(batch - 1, batch, batches_per_epoch, val_check_batch, check_val_every_n_epoch) > 0


# ---------------------------------------------------------------------------------------------
# Measured costs
# ---------------------------------------------------------------------------------------------


class RecentCosts:
    """The last ``window`` costs of one kind, with their per-unit maximum and mean.

    The maximum is kept with a monotonic queue per unit and the mean with running sums, so adding
    a cost is O(1) amortised: cheap enough for every training step.
    """

    def __init__(self, window: int) -> None:
        check_count("window", window, minimum=1)
        self.window = window
        self._clear()

    def _clear(self) -> None:
        self._added = 0  # costs ever added: the index of the next one
        self._values: deque = deque()
        self._sums = zero()
        self._max_queues: dict = {unit: deque() for unit in UNITS}  # (index, value), values decreasing

    def __len__(self) -> int:
        return len(self._values)

    def add(self, cost: Mapping[str, float]) -> None:
        cost = {unit: float(cost.get(unit, 0.0)) for unit in UNITS}
        index = self._added
        self._added += 1
        self._values.append(cost)
        for unit in UNITS:
            self._sums[unit] += cost[unit]
            queue = self._max_queues[unit]
            while queue and queue[-1][1] <= cost[unit]:
                queue.pop()
            queue.append((index, cost[unit]))
        if len(self._values) > self.window:
            old = self._values.popleft()
            for unit in UNITS:
                self._sums[unit] -= old[unit]
                queue = self._max_queues[unit]
                if queue and queue[0][0] <= index - self.window:
                    queue.popleft()

    def max(self) -> Optional[dict]:
        if not self._values:
            return None
        return {unit: self._max_queues[unit][0][1] for unit in UNITS}

    def mean(self) -> Optional[dict]:
        if not self._values:
            return None
        n = len(self._values)
        return {unit: max(self._sums[unit], 0.0) / n for unit in UNITS}

    def state_dict(self) -> dict:
        return {"values": list(self._values)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._clear()
        for value in list(state.get("values", []))[-self.window:]:
            self.add(value)


# ---------------------------------------------------------------------------------------------
# Decisions
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StopPlan:
    """What happens besides training if the run stops after this batch, or goes on.

    Attributes:
        validation_now: Lightning's schedule validates right after this batch anyway.
        validation_on_stop: a stop now runs a validation (Lightning validates when
            ``should_stop`` is set in a validation epoch).
        saves_per_validation: checkpoint saves that follow a scheduled validation
            (``ModelCheckpoint``, one more with ``save_last``).
        saves_on_stop: checkpoint saves a stop entails (the stop checkpoint and the saves that
            follow the stop's validation).
        saves_now: checkpoint saves due right after this batch whatever is decided
            (``ModelCheckpoint(every_n_train_steps=...)``).
        saves_next: checkpoint saves due right after the next batch.
    """

    validation_now: bool = False
    validation_on_stop: bool = True
    saves_per_validation: int = 0
    saves_on_stop: int = 1
    saves_now: int = 0
    saves_next: int = 0


@dataclass(frozen=True)
class Breach:
    """A cap that going on would cross.

    Attributes:
        cap: the argument (``"max_usd"``).
        unit: the unit it caps (``"usd"``).
        limit: the cap, in ``unit`` (``max_time`` in seconds).
        value: what the run has spent so far, in ``unit``.
        predicted: what the run would have spent after one more batch and a stop (predictive), or
            after a stop now (reactive).
        next_batch: the predicted cost of the next batch.
        reserve: what a stop costs (validation run and checkpoint saves).
        predictive: whether the decision looked one batch ahead.
    """

    cap: str
    unit: str
    limit: float
    value: float
    predicted: float
    next_batch: float
    reserve: float
    predictive: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


class BudgetPlanner:
    """Decides when to stop so that no cap is crossed, and forecasts the planned run.

    Args:
        limits: ``{cap argument: limit}`` as returned by :func:`check_caps`.
        predictive: look one batch ahead (stop *before* the batch that would cross a cap); if
            False, stop after the batch at which spend plus the stop reserve reached a cap (at most
            one batch over).
        warmup_batches: batches at the start of every session (fit or resume) left out of the
            batch statistics: they pay for compilation, caches and data-loader start-up.
        window: how many recent batches the next-batch maximum and the mean are taken over.

    Attributes:
        validation_batches: batches in one validation run, for the prior before one is measured.
        checkpoint_prior_s: seconds one checkpoint save is expected to take before one is measured.
    """

    def __init__(self, limits: Mapping[str, float], predictive: bool = True, warmup_batches: int = 2,
                 window: int = 1000) -> None:
        self.limits = dict(limits)
        self.predictive = predictive
        self.warmup_batches = warmup_batches
        self.batches = RecentCosts(window)
        self.warmup = RecentCosts(max(warmup_batches, 1))
        self.validations = RecentCosts(20)
        self.checkpoints = RecentCosts(20)
        self.validation_batches: Optional[float] = None
        self.checkpoint_prior_s = 0.0
        self.sanity_batch: Optional[dict] = None  # one validation batch from the sanity check: the largest
        self.sanity_batch_mean: Optional[dict] = None  # ... and the mean, start-up left out
        self.sanity_startup = zero()  # what starting a validation run costs, from the sanity check
        self.warned: dict = {}  # cap -> {"limit": float, "fractions": [..]}
        self._session_batches = 0

    # --- measurements ------------------------------------------------------------------------

    def start_session(self) -> None:
        """A new fit (or a resume) begins: its first batches are warm-up again."""
        self._session_batches = 0
        self.warmup = RecentCosts(max(self.warmup_batches, 1))

    def observe_batch(self, cost: Mapping[str, float]) -> None:
        """The cost of one training batch, validation and checkpoint saves left out."""
        self._session_batches += 1
        if self._session_batches <= self.warmup_batches:
            self.warmup.add(cost)
        else:
            self.batches.add(cost)

    def observe_validation(self, cost: Mapping[str, float]) -> None:
        """The cost of one validation run (sanity checks excluded)."""
        self.validations.add(cost)

    def observe_sanity_check(self, batch_costs: list) -> None:
        """The costs of the sanity check's batches, one by one: a first measure of validation until
        a whole validation run is measured. The first batch also pays for starting the validation
        (its data loader's workers, a first forward): what it costs above the others is taken as a
        start-up cost that every validation run pays once."""
        costs = [{**zero(), **dict(c), "flops": 0.0} for c in batch_costs]  # training FLOPs only are counted
        if not costs:
            return
        rest = costs[1:] or costs
        self.sanity_batch = {unit: max(c[unit] for c in rest) for unit in UNITS}
        self.sanity_batch_mean = {unit: sum(c[unit] for c in rest) / len(rest) for unit in UNITS}
        self.sanity_startup = (subtract(costs[0], self.sanity_batch_mean) if len(costs) > 1 else zero())

    def observe_checkpoint(self, cost: Mapping[str, float]) -> None:
        """The cost of one checkpoint save."""
        self.checkpoints.add(cost)

    # --- estimates ---------------------------------------------------------------------------

    def next_batch(self) -> dict:
        """The next batch's cost, erring high: the largest recent post-warm-up batch, else the
        largest warm-up batch (an over-estimate), else nothing known yet."""
        return self.batches.max() or self.warmup.max() or zero()

    def mean_batch(self) -> Optional[dict]:
        """The mean post-warm-up batch cost, once :data:`FORECAST_MIN_BATCHES` are measured."""
        if len(self.batches) < FORECAST_MIN_BATCHES:
            return None
        return self.batches.mean()

    def _per_second(self, cost: Optional[dict]) -> dict:
        """Cost per second of holding the machines, from a batch cost (no FLOPs while idle)."""
        if not cost or cost["elapsed_s"] <= 0:
            return zero()
        rate = scale(cost, 1.0 / cost["elapsed_s"])
        rate["flops"] = 0.0
        return rate

    def validation_cost(self, conservative: bool = True) -> dict:
        """One validation run: the largest measured (and no less than ``validation_batches`` of
        the sanity check's batches), or for forecasts the mean measured. Before one is measured:
        the sanity check's start-up plus ``validation_batches`` batches at its cost per batch (the
        largest, or the mean); without a sanity check, ``validation_batches`` training batches at a
        fraction of their cost."""
        measured = self.validations.max() if conservative else self.validations.mean()
        n = self.validation_batches or 0.0
        if measured is not None:
            if conservative and self.sanity_batch is not None and n:
                # Few runs are measured: never reserve less than the sanity check's batches predict
                # (start-up left out, so a compiled first batch does not inflate every reserve).
                floor = scale(self.sanity_batch, n)
                measured = {unit: max(measured[unit], floor[unit] if unit != "flops" else 0.0) for unit in UNITS}
            return measured
        if self.sanity_batch is not None:
            per_batch = self.sanity_batch if conservative else (self.sanity_batch_mean or self.sanity_batch)
            prior = add(self.sanity_startup, scale(per_batch, n)) if n else zero()
        else:
            batch = self.next_batch() if conservative else (self.mean_batch() or self.next_batch())
            fraction = VALIDATION_BATCH_RESERVE_FRACTION if conservative else VALIDATION_BATCH_FORECAST_FRACTION
            prior = scale(batch, n * fraction)
        prior["flops"] = 0.0  # training FLOPs only are counted
        return prior

    def checkpoint_cost(self, conservative: bool = True) -> dict:
        """One checkpoint save: the largest (or mean) measured, else ``checkpoint_prior_s``
        seconds at the training cost rate."""
        measured = self.checkpoints.max() if conservative else self.checkpoints.mean()
        if measured is not None:
            return measured
        return scale(self._per_second(self.mean_batch() or self.next_batch()), self.checkpoint_prior_s)

    def _estimates(self) -> tuple:
        """The next batch, one validation run and one checkpoint save, erring high: validation
        runs and saves are measured a few times only, so they get a margin."""
        margin = 1.0 + RESERVE_MARGIN
        return self.next_batch(), scale(self.validation_cost(), margin), scale(self.checkpoint_cost(), margin)

    def _amounts(self, unit: str, plan: StopPlan, estimates: tuple) -> tuple:
        """``(ahead, reserve)`` in one unit: what going on as ``predictive`` assumes still costs at
        most, and what a stop costs."""
        nxt, val, ckpt = estimates[0][unit], estimates[1][unit], estimates[2][unit]
        reserve = ckpt * plan.saves_on_stop + (val if plan.validation_on_stop else 0.0)
        # A validation due now counts besides the stop's even when reactive: going on runs it, and
        # the stop after the next batch runs another (counting it once lets a reactive stop
        # overshoot by a whole validation instead of at most the last batch).
        scheduled = (val + ckpt * plan.saves_per_validation) if plan.validation_now else 0.0
        ahead = ckpt * plan.saves_now + scheduled + reserve
        if self.predictive:
            ahead += nxt + ckpt * plan.saves_next
        return ahead, reserve

    def stop_cost(self, plan: StopPlan) -> dict:
        """What a stop now costs: its validation run (if any) and checkpoint saves."""
        estimates = self._estimates()
        return {unit: self._amounts(unit, plan, estimates)[1] for unit in UNITS}

    def ahead(self, plan: StopPlan) -> dict:
        """What is still to be paid, at most, if the run goes on as ``predictive`` assumes.

        Predictive: what is due after this batch anyway (a scheduled validation and its saves,
        step-scheduled checkpoint saves), the next batch and the saves due after it, then a stop.
        Reactive: what is due after this batch, and a stop (after the next batch, which is the
        at most one batch a reactive stop may overshoot by).
        """
        estimates = self._estimates()
        return {unit: self._amounts(unit, plan, estimates)[0] for unit in UNITS}

    # --- decisions ---------------------------------------------------------------------------

    def decide(self, spent: Mapping[str, float], plan: StopPlan) -> Optional[Breach]:
        """Whether to stop after this batch: the cap that going on would cross, or None.

        Predictive: stop if spent + (what is due anyway) + next batch + stop reserve > cap, so
        that the run, its final validation and its checkpoint end within every cap. Reactive:
        stop once spent + (what is due anyway) + stop reserve >= cap.
        """
        estimates = self._estimates()
        worst: Optional[Breach] = None
        for cap, limit in self.limits.items():
            unit = CAP_UNITS[cap]
            ahead, reserve = self._amounts(unit, plan, estimates)
            predicted = spent[unit] + ahead
            crossed = predicted > limit if self.predictive else predicted >= limit
            if crossed and (worst is None or predicted / limit > worst.predicted / worst.limit):
                worst = Breach(cap, unit, limit, spent[unit], predicted, estimates[0][unit], reserve, self.predictive)
        return worst

    def closest(self, spent: Mapping[str, float], plan: StopPlan) -> Breach:
        """The cap nearest to being crossed (for a stop another rank decided)."""
        estimates = self._estimates()
        best: Optional[Breach] = None
        for cap, limit in self.limits.items():
            unit = CAP_UNITS[cap]
            ahead, reserve = self._amounts(unit, plan, estimates)
            breach = Breach(cap, unit, limit, spent[unit], spent[unit] + ahead, estimates[0][unit], reserve,
                            self.predictive)
            if best is None or breach.predicted / limit > best.predicted / best.limit:
                best = breach
        assert best is not None, "a planner has at least one cap (check_caps)"
        return best

    def headroom_batches(self, spent: Mapping[str, float], plan: StopPlan, batches_per_validation: float,
                         saves_per_batch: float = 0.0, at_mean: bool = False) -> float:
        """How many more batches fit under every cap before a stop must be decided, with
        scheduled validations (and their saves) spread over the batches between them, and
        ``saves_per_batch`` step-scheduled checkpoint saves per batch. ``inf`` if none is limiting.

        ``at_mean``: where the stop will fall (a forecast), the batches, validations and saves to come at their mean
        cost; the stop's own reserve stays the decision's. Without it, at the largest (the decision's safe bound):
        on a CPU run of 6 ms steps, "BudgetCap will stop it at about step 32" came true at step 256 (the script
        re-run, warning at mean costs: "about step 210", for a stop at 310)."""
        estimates = self._estimates()
        nxt, val, ckpt = estimates
        if at_mean:
            nxt, val, ckpt = (self.mean_batch() or nxt, self.validation_cost(conservative=False),
                              self.checkpoint_cost(conservative=False))
        spread = batches_per_validation and math.isfinite(batches_per_validation) and batches_per_validation > 0
        reactive = replace(plan, saves_next=0)
        room = math.inf
        for cap, limit in self.limits.items():
            unit = CAP_UNITS[cap]
            ahead = self._amounts(unit, reactive, estimates)[0] - (nxt[unit] if self.predictive else 0.0)
            per_batch = nxt[unit] + ckpt[unit] * max(saves_per_batch, 0.0)
            if spread:
                per_batch += (val[unit] + ckpt[unit] * plan.saves_per_validation) / batches_per_validation
            left = limit - spent[unit] - ahead
            if left <= 0:
                return 0.0
            if per_batch > 0:
                room = min(room, left / per_batch)
        return room

    def safe_skips(self, spent: Mapping[str, float], plan: StopPlan, most: int) -> int:
        """How many of the next batches may skip :meth:`decide` (at most ``most``), with no cap at risk.

        The headroom in batches if a validation and its checkpoint saves, plus a step save,
        followed *every* batch (far more than any schedule runs): while half of it is left, no
        batch can bring a cap within reach, so the decision is taken again after at most ``most``
        batches, and at every batch once near a cap. The skipped batches' costs are observed at the
        next checked batch (their mean, once per batch); none is skipped before
        ``FORECAST_MIN_BATCHES`` post-warm-up batches are measured. The same half-room rule holds
        for the next :data:`WARN_FRACTIONS` share of each cap not warned yet, so that its warning
        comes at the batch that reaches it, not up to ``most`` batches later.
        """
        if self.mean_batch() is None or any(self.next_batch()[CAP_UNITS[cap]] <= 0 for cap in self.limits):
            return 0  # too few batches measured past warm-up, or a capped unit not measured yet (FLOPs)
        per_validation = plan.saves_per_validation
        step_saves = max(plan.saves_now, plan.saves_next, 1)
        worst = replace(plan, validation_now=True, saves_now=per_validation + step_saves, saves_next=step_saves)
        room = min(self.headroom_batches(spent, worst, 1.0, float(step_saves)), self._batches_to_next_warning(spent))
        return int(max(0.0, min(room / 2.0 - 1.0, float(most))))

    def _batches_to_next_warning(self, spent: Mapping[str, float]) -> float:
        """Batches (at the next batch's estimate) until a cap's next share not warned yet is spent; ``inf`` if none."""
        nxt = self.next_batch()
        room = math.inf
        for cap, limit in self.limits.items():
            unit = CAP_UNITS[cap]
            ahead = [f * limit - spent[unit] for f in self._unwarned_fractions(cap)]
            if ahead and nxt[unit] > 0:
                room = min(room, max(min(ahead), 0.0) / nxt[unit])
        return room

    def _unwarned_fractions(self, cap: str) -> list[float]:
        """The :data:`WARN_FRACTIONS` shares of ``cap`` not warned yet."""
        warned = self.warned.get(cap, {}).get("fractions", [])
        return [f for f in WARN_FRACTIONS if f not in warned]

    # --- forecasts and warnings ----------------------------------------------------------------

    def forecast(self, spent: Mapping[str, float], remaining_batches: float, remaining_validations: float = 0.0,
                 remaining_saves: float = 0.0) -> Optional[dict]:
        """What the planned run will have cost at its end, in every unit, or None before enough
        post-warm-up batches are measured: spent + remaining batches x mean batch + remaining
        validations x mean validation + remaining saves x mean save."""
        mean = self.mean_batch()
        if mean is None or not math.isfinite(remaining_batches):
            return None
        return add(spent, scale(mean, max(remaining_batches, 0.0)),
                   scale(self.validation_cost(conservative=False), max(remaining_validations, 0.0)),
                   scale(self.checkpoint_cost(conservative=False), max(remaining_saves, 0.0)))

    def new_warnings(self, spent: Mapping[str, float]) -> list:
        """``(cap, fraction)`` for every :data:`WARN_FRACTIONS` threshold newly reached."""
        out = []
        for cap, limit in self.limits.items():
            seen = self.warned.setdefault(cap, {"limit": limit, "fractions": []})
            used = spent[CAP_UNITS[cap]] / limit
            for fraction in self._unwarned_fractions(cap):
                if used >= fraction:
                    seen["fractions"].append(fraction)
                    out.append((cap, fraction))
        return out

    # --- resume --------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "version": _STATE_VERSION,
            "limits": dict(self.limits),
            "batches": self.batches.state_dict(),
            "validations": self.validations.state_dict(),
            "checkpoints": self.checkpoints.state_dict(),
            "validation_batches": self.validation_batches,
            "sanity_batch": self.sanity_batch,
            "sanity_batch_mean": self.sanity_batch_mean,
            "sanity_startup": self.sanity_startup,
            "warned": {cap: {"limit": w["limit"], "fractions": list(w["fractions"])} for cap, w in self.warned.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the measured costs of a checkpointed run. Warnings already given are kept
        for caps whose limit is unchanged; a changed cap warns again at its own fractions.

        Raises:
            ValueError: the state was written by a newer costaware (its ``version`` is unknown).
        """
        version = state.get("version", _STATE_VERSION)
        if isinstance(version, bool) or not isinstance(version, int) or version > _STATE_VERSION:
            raise ValueError(f"budget planner state version {version!r} is newer than this costaware reads "
                             f"({_STATE_VERSION}); upgrade costaware")
        self.batches.load_state_dict(state.get("batches", {}))
        self.validations.load_state_dict(state.get("validations", {}))
        self.checkpoints.load_state_dict(state.get("checkpoints", {}))
        if state.get("validation_batches") is not None:
            self.validation_batches = state["validation_batches"]
        if state.get("sanity_batch") is not None:
            self.sanity_batch = dict(state["sanity_batch"])
            self.sanity_batch_mean = dict(state.get("sanity_batch_mean") or state["sanity_batch"])
            self.sanity_startup = dict(state.get("sanity_startup") or zero())
        self.warned = {cap: {"limit": w["limit"], "fractions": list(w["fractions"])}
                       for cap, w in state.get("warned", {}).items()
                       if cap in self.limits and w.get("limit") == self.limits[cap]}


def describe(cap: str, amount: float) -> str:
    """An amount in a cap's unit, for messages: ``$4.98``, ``1.2 kWh``, ``00:59:58``."""
    unit = CAP_UNITS[cap]
    if unit == "usd":
        return f"${amount:.4g}"
    if unit == "elapsed_s":
        return f"{amount:.0f} s ({timedelta(seconds=round(amount))})"
    names = {"kwh": "kWh", "co2_kg": "kg CO2", "gpu_hours": "GPU-h", "flops": "FLOPs"}
    return f"{amount:.4g} {names[unit]}"

