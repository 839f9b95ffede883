"""The learning rates a run's schedule will set until its planned end, and the learning-rate area.

Why: a curve fitted against cost cannot see that a linear or cosine schedule ends near a learning rate
of zero, where the weights, and with them the metric, barely move; nor that a run at its peak rate has its
quiet, annealed stretch still ahead. Progress goes with the area under the learning rate (the sum of
rate x cost: the distance the optimizer may travel), so the marginal-gain policy prices the next stretches
of training on a curve fitted against that area when it knows the schedule ahead. Torch schedules are
deterministic functions of the step, so :func:`probe_schedule` reads them off a copy of the Trainer's
scheduler without touching the real one.

This module needs no Lightning and no torch: the probe only calls what a scheduler exposes.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any, Optional, Sequence

import numpy as np

__all__ = ["LrArea", "check_schedule", "probe_schedule"]

# A probe steps a copy of the scheduler to the planned end: a few microseconds a step, so at most this many
# steps (a second or so, once a run); a longer schedule is not probed (the policy fits against cost).
_MAX_PROBE_STEPS = 200_000
# Points of the probed schedule kept (the policy interpolates linearly between them).
_SCHEDULE_POINTS = 128
# The learning rate counted as at least this share of the schedule's peak: the area keeps growing, so the
# cost of a horizon always maps to a later point of the curve (a schedule that ends at exactly zero).
_AREA_FLOOR = 1e-3


def check_schedule(schedule: Any, name: str = "lr_schedule") -> Optional[tuple[np.ndarray, np.ndarray]]:
    """``None``, or (fractions of the planned cost, learning rates) from pairs ``[(fraction, lr), ...]``.

    Fractions must be finite, >= 0 and increasing; learning rates finite and >= 0.

    Raises:
        ValueError: Naming ``name`` and what is wrong with it.
    """
    if schedule is None:
        return None
    try:
        pairs = np.asarray(schedule, dtype=float)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"`{name}` must be a list of (fraction of the planned cost, learning rate) pairs: {exc}") \
            from None
    if pairs.ndim != 2 or pairs.shape[1] != 2 or pairs.shape[0] < 2:
        raise ValueError(f"`{name}` must be a list of at least two (fraction of the planned cost, learning rate) "
                         f"pairs, got shape {pairs.shape}")
    fractions, lrs = pairs[:, 0], pairs[:, 1]
    if not (np.all(np.isfinite(pairs)) and np.all(fractions >= 0) and np.all(lrs >= 0)):
        raise ValueError(f"`{name}`: fractions and learning rates must be finite numbers >= 0")
    if np.any(np.diff(fractions) <= 0):
        raise ValueError(f"`{name}`: the fractions of the planned cost must increase")
    return fractions, lrs


class LrArea:
    """Cumulative learning-rate area, sum of lr x dollars, at any cost: trapezoids between known rates.

    Args:
        costs_usd: Costs at which the rate is known (the run's evaluations, the schedule ahead), increasing.
        lrs: The rates there.
    """

    def __init__(self, costs_usd: np.ndarray, lrs: np.ndarray) -> None:
        floor = _AREA_FLOOR * float(np.max(lrs))
        self._costs = np.concatenate([[0.0], costs_usd])
        rates = np.maximum(np.concatenate([[lrs[0]], lrs]), floor)
        self._rates = rates
        self._area = np.concatenate([[0.0], np.cumsum(np.diff(self._costs) * 0.5 * (rates[1:] + rates[:-1]))])

    @classmethod
    def of(cls, past_costs_usd: Sequence[float], past_lrs: Sequence[float],
           schedule: Optional[tuple[np.ndarray, np.ndarray]], planned_cost_usd: Optional[float]) -> Optional[LrArea]:
        """The area from the rates seen at evaluations and the schedule ahead; ``None`` when it says nothing
        more than cost does (no schedule or plan, or a constant rate)."""
        if schedule is None or planned_cost_usd is None or planned_cost_usd <= 0:
            return None
        costs = np.asarray(past_costs_usd, dtype=float)
        lrs = np.asarray(past_lrs, dtype=float)
        seen = np.isfinite(lrs)
        ahead_costs = schedule[0] * planned_cost_usd
        now = float(costs[-1]) if costs.size else 0.0
        ahead = ahead_costs > now
        knots_costs = np.concatenate([costs[seen], ahead_costs[ahead]])
        knots_lrs = np.concatenate([lrs[seen], schedule[1][ahead]])
        if not seen.any():  # no rates given at evaluations: the schedule's own, for the past too
            knots_costs, knots_lrs = ahead_costs, schedule[1]
        order = np.argsort(knots_costs, kind="stable")
        knots_costs, knots_lrs = knots_costs[order], knots_lrs[order]
        keep = np.concatenate([[True], np.diff(knots_costs) > 0])
        knots_costs, knots_lrs = knots_costs[keep], knots_lrs[keep]
        peak = float(np.max(knots_lrs)) if knots_lrs.size else 0.0
        if knots_costs.size < 2 or not peak > 0 or float(np.min(knots_lrs)) == peak:
            return None
        return cls(knots_costs, knots_lrs)

    def at(self, costs_usd: float | np.ndarray) -> np.ndarray:
        """The area at the given cost(s): the rate runs linearly between known ones; past the last, it goes on."""
        c = np.asarray(costs_usd, dtype=float)
        k = np.clip(np.searchsorted(self._costs, c, side="right") - 1, 0, len(self._costs) - 1)
        d = c - self._costs[k]
        nxt = np.minimum(k + 1, len(self._costs) - 1)
        width = self._costs[nxt] - self._costs[k]
        slope = np.where(width > 0, (self._rates[nxt] - self._rates[k]) / np.where(width > 0, width, 1.0), 0.0)
        return self._area[k] + self._rates[k] * d + 0.5 * slope * d * d


def probe_schedule(trainer: Any, planned_steps: float) -> Optional[list[tuple[float, float]]]:
    """The learning rates the Trainer's first scheduler will set from now to ``planned_steps`` optimizer steps,
    as (fraction of the planned steps, lr) pairs; ``None`` when it cannot be known ahead.

    Steps a copy of the scheduler (sharing the model's and the optimizer state's tensors, so nothing large is
    copied) and reads the first parameter group's rate; the real scheduler and optimizer are not touched.
    ``None`` for no scheduler, a ``ReduceLROnPlateau`` (it follows the metric), a schedule stepped per epoch
    without a planned number of epochs, one longer than ``_MAX_PROBE_STEPS``, or any error (monitoring never
    breaks training).
    """
    try:
        configs = trainer.lr_scheduler_configs
        if not configs or not planned_steps or not math.isfinite(planned_steps):
            return None
        config = configs[0]
        scheduler = config.scheduler
        if getattr(config, "reduce_on_plateau", False) or not callable(getattr(scheduler, "step", None)):
            return None
        step_now = int(trainer.global_step)
        every = max(int(getattr(config, "frequency", 1) or 1), 1)
        if config.interval == "step":
            steps_per_tick = float(every)
        else:  # per epoch
            epochs = getattr(trainer, "max_epochs", None)
            if not epochs or epochs <= 0:
                return None
            steps_per_tick = every * planned_steps / epochs
        ticks = math.ceil((planned_steps - step_now) / steps_per_tick)
        if ticks < 1 or ticks > _MAX_PROBE_STEPS:
            return None
        shadow = _shadow_copy(scheduler)
        rates = [float(shadow.optimizer.param_groups[0]["lr"])]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the copy's optimizer never steps: torch warns about the order
            for _ in range(ticks):
                try:
                    shadow.step()
                except Exception:  # noqa: BLE001 - a schedule shorter than the plan (OneCycleLR): known so far
                    break
                rates.append(float(shadow.optimizer.param_groups[0]["lr"]))
    except Exception:  # noqa: BLE001 - an unusual scheduler: judged against cost, as without a schedule
        return None
    steps = step_now + steps_per_tick * np.arange(len(rates))
    keep = np.unique(np.linspace(0, len(rates) - 1, min(len(rates), _SCHEDULE_POINTS)).round().astype(int))
    pairs: list[tuple[float, float]] = []
    for i in keep:
        fraction = float(min(steps[i], planned_steps) / planned_steps)
        if not pairs or fraction > pairs[-1][0]:
            pairs.append((fraction, rates[i]))
    if len(pairs) < 2 or not all(math.isfinite(lr) and lr >= 0 for _, lr in pairs):
        return None
    return pairs


def _shadow_copy(scheduler: Any) -> Any:
    """A deep copy of the scheduler whose optimizer shares the parameters and their state (no tensor copied)."""
    optimizer = scheduler.optimizer
    memo: dict[int, Any] = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            memo[id(param)] = param
    for state in optimizer.state.values():
        for value in state.values():
            memo[id(value)] = value
    return copy.deepcopy(scheduler, memo)
