"""A prior over how runs end, learned from past runs' learning curves.

A curve fit sees only the run so far. Past runs of the same kind know more: a from-scratch run
at 5% of its plan, its learning rate still warming up and its accuracy at chance, usually goes on
to learn a lot; a fine-tuned model at 85% accuracy with its learning rate half annealed gains a
point at most. :class:`CurvePrior` holds, for each stage of a run, the empirical distribution of
what the rest of the run brought, measured on recorded runs:

* ``gain``: (best metric of the whole run - best so far) / headroom (quantiles and mean),
* ``final``: (metric at the end of the run - best so far) / headroom,
* ``next``: (best metric by the time the spend has doubled, at most to the plan's end - best so far) /
  headroom: what the next stretch brought, the horizon a stopping decision is about (quantiles and mean),

where the headroom is what is left of a bounded metric's range (accuracy: ``1 - best so far``),
at least ``HEADROOM_FLOOR`` (5%) of the range.
The stage is a cell of four features a policy knows at every evaluation:

* the fraction of the planned cost spent (``PLAN_EDGES``),
* the learning rate's state: ``constant`` (no scheduler), ``unknown`` (not recorded), ``warming``
  (higher than at the previous evaluation: the warmup, the peak is still ahead), ``high`` (at
  least ``LR_HIGH`` of its peak so far: not annealed yet) or ``annealing``,
* the progress: how far the best so far has come from the baseline (the metric of a model that
  learned nothing, else the range's low end) to the range's high end (``PROGRESS_EDGES``),
* the momentum: what the best gained over the last half of the cost so far, as a fraction of the
  headroom (``MOMENTUM_EDGES``): a fine-tuned model and a from-scratch run can be equally far
  from the ceiling, one flat and one still climbing steeply.

Each run weighs the same (its evaluations share one unit of weight). Cells with fewer than
``MIN_RUNS`` runs fall back to coarser ones (without the learning-rate state, then without the
plan fraction, then the progress alone, then all). A run without a plan asks the cells of every plan
fraction at its learning-rate state first. Stored as a small JSON file; the package
ships two fitted on the tune halves of the replay's data sets (:data:`PACKAGED_PRIORS`: ``"default"``
and ``"from-scratch"``), and ``costaware prior fit`` fits a team's own from its ledgers or generic JSONL.

No Lightning import: the replay benchmark and the callback share it.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from costaware.validation import is_number

T = TypeVar("T")

__all__ = ["HEADROOM_FLOOR", "NO_PLAN", "CurvePrior", "PriorRun", "checked_jsonl", "left_out_because",
           "left_out_summary", "load_prior", "lr_state", "prior_cell", "run_from_record", "runs_from_jsonl",
           "runs_from_ledger", "stage"]

PRIOR_VERSION = 2  # 2: ``next`` (the gain over the next doubling of the spend)
PLAN_EDGES = (0.1, 0.25, 0.5, 0.75)
PROGRESS_EDGES = (0.1, 0.4, 0.7, 0.9)
MOMENTUM_EDGES = (0.05, 0.3, 1.0)
LR_STATES = ("constant", "unknown", "warming", "high", "annealing")
LR_HIGH = 0.7
LR_RISING = 1.01
MIN_RUNS = 12
QUANTILE_LEVELS = tuple(round(q, 2) for q in np.linspace(0.02, 0.98, 49))
#: The headroom used to scale a stage's outcomes is at least this fraction of the metric's range: near
#: the ceiling, evaluation noise (not the headroom) sets how far the final value may fall.
HEADROOM_FLOOR = 0.05
#: The plan-share bin of a run without a plan (none given, or past one): its lookup asks the cells of every share.
NO_PLAN = -1
#: A run that ended before this fraction of its planned cost is left out (stopped early).
_MIN_DONE = 0.9


@dataclass(frozen=True)
class PriorRun:
    """One recorded run, as the prior reads it.

    Attributes:
        costs_usd: Cumulative cost at each evaluation, in dollars.
        metrics: The metric at each evaluation (NaN where not finite).
        mode: ``"max"`` or ``"min"``.
        planned_cost_usd: The run's planned total cost, in dollars (the last cost if unknown).
        lrs: Learning rate at each evaluation, or ``None`` if not recorded.
        anneals: Whether the run had a learning-rate scheduler.
        baseline: The metric of a model that learned nothing, if known.
        metric_range: (low, high) of the metric; ``None``: (0, 1) if every value lies in it.
    """

    costs_usd: np.ndarray
    metrics: np.ndarray
    mode: str = "max"
    planned_cost_usd: float | None = None
    lrs: np.ndarray | None = None
    anneals: bool = True
    baseline: float | None = None
    metric_range: tuple[float, float] | None = None


def lr_state(lrs: Sequence[float] | np.ndarray | None, anneals: bool) -> str:
    """The learning rate's state at the last of ``lrs`` (see the module's docstring)."""
    if not anneals:
        return "constant"
    values = None if lrs is None else np.asarray(lrs, dtype=float)
    if values is None or values.size == 0 or not np.isfinite(values).all() or values.max() <= 0:
        return "unknown"
    if values.size > 1 and values[-1] > LR_RISING * values[-2]:
        return "warming"
    return "high" if values[-1] >= LR_HIGH * values.max() else "annealing"


def prior_cell(plan_fraction: float, state: str, progress: float, momentum: float) -> tuple[int, str, int, int]:
    """The cell of a stage: (plan-fraction bin, LR state, progress bin, momentum bin)."""
    return (int(np.searchsorted(PLAN_EDGES, plan_fraction, side="right")), state,
            int(np.searchsorted(PROGRESS_EDGES, progress, side="right")),
            int(np.searchsorted(MOMENTUM_EDGES, momentum, side="right")))


def stage(costs_usd: Sequence[float] | np.ndarray, points: Sequence[float] | np.ndarray,
          lo: float, hi: float, base: float, planned_cost_usd: float,
          lrs: Sequence[float] | np.ndarray | None, anneals: bool) -> tuple[tuple, float, float]:
    """The stage of a run after its last evaluation: (cell, best so far, headroom), in points.

    ``points``: the metric so far, higher is better (NaN where not finite), in the same units as
    ``lo``/``hi`` (the range) and ``base`` (the baseline, else ``lo``). The momentum is what the
    best gained over the last half of the cost so far, as a fraction of the headroom.
    """
    u = np.asarray(points, dtype=float)
    c = np.asarray(costs_usd, dtype=float)
    best = float(np.nanmax(u))
    headroom = max(hi - best, HEADROOM_FLOOR * (hi - lo))
    earlier = u[: int(np.searchsorted(c, 0.5 * c[-1], side="right"))]
    earlier = earlier[np.isfinite(earlier)]
    before = float(np.max(earlier)) if earlier.size else float(u[np.isfinite(u)][0])
    cell = prior_cell(float(c[-1]) / planned_cost_usd, lr_state(lrs, anneals),
                      (best - base) / max(hi - base, 1e-12), (best - before) / headroom)
    return cell, best, headroom


def _bounded(values: np.ndarray, mode: str, metric_range: tuple[float, float] | None) -> tuple[float, float] | None:
    if metric_range is not None:
        return metric_range
    finite = values[np.isfinite(values)]
    if mode == "max" and finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
        return (0.0, 1.0)
    return None


def left_out_because(run: PriorRun) -> str | None:
    """Why a prior cannot learn from ``run``, or None where it can."""
    values = np.asarray(run.metrics, dtype=float)
    if len(values) < 2:
        return "it has fewer than two evaluations"
    if not np.isfinite(values).any():
        return "no evaluation has a finite metric"
    if _bounded(values, run.mode, run.metric_range) is None:
        return ("its metric is not bounded (a loss; an error rate needs its range: \"metric_range\": [0, 1] in a "
                "JSONL record, MarginalGainStopping(policy_kwargs={'metric_range': (0, 1)}) in the fit)")
    planned = run.planned_cost_usd or float(run.costs_usd[-1])
    if float(run.costs_usd[-1]) < _MIN_DONE * planned:
        return f"it stopped before {_MIN_DONE:.0%} of its plan (what the rest of a plan brings is unknown)"
    return None


def stage_samples(run: PriorRun) -> list[tuple[tuple, float, float, float]]:
    """(cell, gain, final, next) at each evaluation of ``run`` but its last, as fractions of the headroom (see the
    module's docstring)."""
    if left_out_because(run) is not None:
        return []
    values = np.asarray(run.metrics, dtype=float)
    bounds = _bounded(values, run.mode, run.metric_range)
    assert bounds is not None, "left_out_because checked it"
    sign = 1.0 if run.mode == "max" else -1.0
    lo, hi = (bounds[0], bounds[1]) if sign > 0 else (-bounds[1], -bounds[0])
    u = sign * values
    base = lo if run.baseline is None else min(max(sign * run.baseline, lo), hi)
    planned = run.planned_cost_usd or float(run.costs_usd[-1])
    best_all = float(np.nanmax(u))
    final = u[-1] if np.isfinite(u[-1]) else lo
    costs = np.asarray(run.costs_usd, dtype=float)
    out = []
    for i in range(len(u) - 1):
        if not np.isfinite(u[: i + 1]).any() or planned <= 0:
            continue
        lrs = None if run.lrs is None else [float(v) for v in run.lrs[: i + 1]]
        cell, best, headroom = stage(run.costs_usd[: i + 1], u[: i + 1], lo, hi, base, planned, lrs, run.anneals)
        doubled = u[: int(np.searchsorted(costs, min(2.0 * costs[i], planned), side="right"))]
        best_next = max(float(np.nanmax(doubled)), best)  # the evaluations up to then, this one included
        out.append((cell, (best_all - best) / headroom, (final - best) / headroom, (best_next - best) / headroom))
    return out


def left_out_summary(reasons: Sequence[str]) -> str:
    """``reasons`` (one a run left out) counted: "2 runs: it stopped before 90% of its plan (...)"."""
    counts: dict[str, int] = {}
    for reason in reasons:
        counts[reason] = counts.get(reason, 0) + 1
    return "; ".join(f"{n} run{'s' if n > 1 else ''}: {reason}" for reason, n in counts.items()) or "no runs"


def _weighted_quantiles(values: np.ndarray, weights: np.ndarray) -> list[float]:
    order = np.argsort(values)
    v, w = values[order], weights[order]
    cum = (np.cumsum(w) - 0.5 * w) / w.sum()
    return [round(float(q), 5) for q in np.interp(QUANTILE_LEVELS, cum, v)]


def _keys(cell: tuple) -> list[str]:
    """Lookup keys of a cell, finest first. With a share of the plan, the LR state, then the plan share are dropped
    first; without a plan (share ``NO_PLAN``), the cells of every share at this LR state come first."""
    plan, state, progress, momentum = cell
    coarse = [f"*/*/{progress}/{momentum}", f"*/*/{progress}/*", "*/*/*/*"]
    if plan == NO_PLAN:
        return [f"*/{state}/{progress}/{momentum}", *coarse]
    return [f"{plan}/{state}/{progress}/{momentum}", f"{plan}/*/{progress}/{momentum}", *coarse]


def _fit_keys(cell: tuple) -> list[str]:
    """The cells a past run's stage counts in: those of its share of the plan, and those of a run without one."""
    _, state, progress, momentum = cell
    return [*_keys(cell), f"*/{state}/{progress}/{momentum}"]


class CurvePrior:
    """Quantiles of what the rest of a run brings, by stage (see the module's docstring).

    Example::

        prior = CurvePrior.fit(runs)          # PriorRun objects from past runs
        prior.save("prior.json")
        gain_q80 = prior.quantile("gain", cell, 0.8) * headroom
    """

    def __init__(self, cells: dict[str, dict], source: str = "") -> None:
        self.cells = cells
        self.source = source
        #: Whether a policy states its interval for the final metric from this prior (else from its curve fit).
        #: False for the packaged prior only: it pools fine-tuning, from-scratch and SSL runs, and the spread of
        #: that mixture at a stage is not one kind's (see ``costaware.curves._PRIOR_TAIL``).
        self.states_interval = True
        #: Why each run given to :meth:`fit` was left out (one reason a run; empty for a prior loaded from a file).
        self.left_out: list[str] = []

    @classmethod
    def fit(cls, runs: Iterable[PriorRun], source: str = "") -> CurvePrior:
        """Fits the quantile table on ``runs``; those it cannot learn from (:func:`left_out_because`) are skipped."""
        groups: dict[str, list] = {}
        n_runs = 0
        left_out: list[str] = []
        for run_index, run in enumerate(runs):
            samples = stage_samples(run)
            if not samples:
                left_out.append(left_out_because(run) or "no stage to learn from")
                continue
            n_runs += 1
            weight = 1.0 / len(samples)
            for cell, *outcomes in samples:
                for key in _fit_keys(cell):
                    groups.setdefault(key, []).append((run_index, weight, *outcomes))
        if not n_runs:
            raise ValueError("no run to fit a prior on (it needs a bounded metric, accuracy-like in [0, 1], at least "
                             f"two evaluations, and a run to at least {_MIN_DONE:.0%} of its plan): "
                             + left_out_summary(left_out))
        cells = {}
        for key, rows in groups.items():
            runs_in = len({row[0] for row in rows})
            if runs_in < MIN_RUNS and key != "*/*/*/*":
                continue
            arr = np.asarray([row[1:] for row in rows], dtype=float)  # weight, gain, final, next
            w = arr[:, 0]
            cells[key] = {"runs": runs_in, "gain_mean": round(float(np.average(arr[:, 1], weights=w)), 5),
                          "gain": _weighted_quantiles(arr[:, 1], w), "final": _weighted_quantiles(arr[:, 2], w),
                          "next_mean": round(float(np.average(arr[:, 3], weights=w)), 5),
                          "next": _weighted_quantiles(arr[:, 3], w)}
        prior = cls(cells, source or f"fitted on {n_runs} runs")
        prior.left_out = left_out
        return prior

    def lookup(self, cell: tuple) -> tuple[str, dict]:
        """The finest stored cell for ``cell``: (key, its quantiles)."""
        for key in _keys(cell):
            if key in self.cells:
                return key, self.cells[key]
        raise KeyError(cell)

    def quantile(self, what: str, cell: tuple, level: float) -> float:
        """The ``level`` quantile of ``what`` (``"gain"``, ``"final"`` or ``"next"``) in ``cell``, as a fraction of
        headroom."""
        return float(np.interp(level, QUANTILE_LEVELS, self.lookup(cell)[1][what]))

    def gain_mean(self, cell: tuple) -> float:
        """The mean gain by the end in ``cell``, as a fraction of headroom (a rare late start counts in full)."""
        return float(self.lookup(cell)[1]["gain_mean"])

    def next_mean(self, cell: tuple) -> float:
        """The mean gain over the next doubling of the spend in ``cell``, as a fraction of headroom."""
        return float(self.lookup(cell)[1]["next_mean"])

    def to_dict(self) -> dict[str, Any]:
        return {"version": PRIOR_VERSION, "source": self.source, **_settings(), "cells": self.cells}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CurvePrior:
        if not isinstance(data, dict) or "cells" not in data:
            raise ValueError("a curve prior must be a JSON object with 'cells' (as `costaware prior fit` writes)")
        version = data.get("version")
        if version != PRIOR_VERSION:
            raise ValueError(f"curve prior version {version!r}: this costaware reads version {PRIOR_VERSION} (refit it "
                             "from the same runs with `costaware prior fit`)")
        if any(data.get(key) != value for key, value in _settings().items()):
            raise ValueError("curve prior made with other cell edges or quantile levels: refit it with "
                             "`costaware prior fit`")
        if "*/*/*/*" not in data["cells"]:
            raise ValueError("curve prior has no '*/*/*/*' cell (the fallback for every stage)")
        return cls(data["cells"], str(data.get("source", "")))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), separators=(",", ":")) + "\n")


def _settings() -> dict[str, Any]:
    """How cells are cut, as stored in a prior file (a file cut otherwise is refused)."""
    return {"plan_edges": list(PLAN_EDGES), "progress_edges": list(PROGRESS_EDGES),
            "momentum_edges": list(MOMENTUM_EDGES), "lr_states": list(LR_STATES), "lr_high": LR_HIGH,
            "lr_rising": LR_RISING, "headroom_floor": HEADROOM_FLOOR, "quantile_levels": list(QUANTILE_LEVELS)}


#: The priors packaged with costaware, by the name ``prior=`` takes, and their files under ``costaware/data``
#: (both made by ``benchmarks/fit_default_prior.py`` from tune halves only). ``"default"`` pools fine-tuning
#: (DeBERTa-MNLI), from-scratch and SSL runs; ``"from-scratch"`` holds the from-scratch and SSL runs alone, whose
#: runs at chance start more often than a fine-tuning run at chance (which has mostly diverged).
PACKAGED_PRIORS = {"default": "curve_prior.json", "from-scratch": "curve_prior_from_scratch.json"}


@functools.lru_cache(maxsize=len(PACKAGED_PRIORS))
def _packaged_prior(name: str) -> CurvePrior:
    """A prior shipped in the package, read once per process (policies only read it).

    It states no interval for the final metric (``states_interval``): it pools several kinds of runs, whose spread
    at a stage is not one run's.
    """
    packaged = resources.files("costaware") / "data" / PACKAGED_PRIORS[name]
    prior = CurvePrior.from_dict(json.loads(packaged.read_text(encoding="utf-8")))
    prior.states_interval = False
    return prior


def load_prior(prior: Any) -> CurvePrior | None:
    """``None``, a packaged prior's name (:data:`PACKAGED_PRIORS`), a path to a JSON file, a dict, or a CurvePrior."""
    if prior is None or isinstance(prior, CurvePrior):
        return prior
    if isinstance(prior, dict):
        return CurvePrior.from_dict(prior)
    names = ", ".join(repr(name) for name in PACKAGED_PRIORS)
    if isinstance(prior, (str, Path)):
        if str(prior) in PACKAGED_PRIORS:
            return _packaged_prior(str(prior))
        path = Path(prior)
        if not path.is_file():
            raise ValueError(f"`prior` must be None, {names}, a CurvePrior, a dict or the path of a prior JSON "
                             f"file; no file at {str(path)!r}")
        try:
            return CurvePrior.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as err:
            raise ValueError(f"`prior`: {prior!s} is not JSON ({err})") from err
    raise ValueError(f"`prior` must be None, {names}, a CurvePrior, a dict or a path, got {prior!r}")


# ---------------------------------------------------------------------- reading past runs
def run_from_record(record: dict) -> PriorRun:
    """A generic-JSONL record (``benchmarks/replay_curves.py``'s format) as a PriorRun.

    Raises ValueError naming the run and what is wrong with it: a prior fitted on a corrupt record
    (costs that go down, a mode that is neither max nor min) would mislead every decision made with it.
    """
    name = f"run {record.get('id')!r}" if isinstance(record, dict) else "a record"
    if not isinstance(record, dict):
        raise ValueError(f"{name} is not a JSON object")
    points = record.get("points")
    if not isinstance(points, list) or not points:
        raise ValueError(f"{name}: 'points' must be a non-empty list of [cumulative_cost_usd, metric(, lr)]")
    mode = record.get("mode", "max")
    if mode not in ("max", "min"):
        raise ValueError(f"{name}: mode must be 'max' or 'min', got {mode!r}")
    try:
        costs = np.asarray([float(p[0]) for p in points], dtype=float)
        metrics = np.asarray([float("nan") if p[1] is None else float(p[1]) for p in points], dtype=float)
        has_lr = all(len(p) > 2 and p[2] is not None for p in points)
        lrs = np.asarray([float(p[2]) for p in points]) if has_lr else None
    except (TypeError, ValueError, IndexError) as err:
        raise ValueError(f"{name}: every point must be [cumulative_cost_usd, metric(, lr)] ({err})") from None
    if not np.all(np.isfinite(costs)) or np.any(costs < 0):
        raise ValueError(f"{name}: costs must be finite and not negative")
    drops = np.flatnonzero(np.diff(costs) < 0)
    if drops.size:
        i = int(drops[0]) + 1
        raise ValueError(f"{name}: cumulative costs must not decrease (point {i}: {costs[i]:g} after {costs[i - 1]:g})")
    planned, baseline = record.get("planned_cost_usd"), record.get("baseline")
    if planned is not None and not (is_number(planned) and math.isfinite(planned) and planned > 0):
        raise ValueError(f"{name}: planned_cost_usd must be a positive number, got {planned!r}")
    if baseline is not None and not (is_number(baseline) and math.isfinite(baseline)):
        raise ValueError(f"{name}: baseline must be a number, got {baseline!r}")
    rng = record.get("metric_range")
    if rng is not None and not (isinstance(rng, (list, tuple)) and len(rng) == 2 and all(map(is_number, rng))
                                and rng[0] < rng[1]):
        raise ValueError(f"{name}: metric_range must be [low, high] with low < high, got {rng!r}")
    return PriorRun(costs, metrics, mode, planned, lrs, bool(record.get("anneals", True)), baseline,
                    None if rng is None else (float(rng[0]), float(rng[1])))


def checked_jsonl(path: str | Path, check: Callable[[dict], T]) -> list[tuple[dict, T]]:
    """Each record of a JSONL file with what ``check`` makes of it; a line that is not JSON, or that ``check``
    refuses (ValueError), raises ValueError naming the line (in a file of hundreds of runs, how one finds it)."""
    out = []
    with open(path, encoding="utf-8-sig") as f:  # -sig: a file saved with a BOM (PowerShell, Excel)
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"line {number}: not JSON ({err.msg} at column {err.colno})") from None
            try:
                out.append((record, check(record)))
            except ValueError as err:
                raise ValueError(f"line {number}: {err}") from None
    return out


def runs_from_jsonl(path: str | Path) -> list[PriorRun]:
    """The runs of a generic-JSONL file; a bad line raises ValueError naming the line."""
    return [run for _, run in checked_jsonl(path, run_from_record)]


def runs_from_ledger(path: str | Path) -> list[PriorRun]:
    """The run in a costaware ledger: its ``marginal_gain_decision`` events (value, dollars, lr).

    The planned cost of a run that completed is what it spent (its end record's dollars); of any other, the latest
    ``usd + usd_to_predicted_final`` a decision recorded (the Trainer's steps at the pace so far), else none. Not the
    largest: the pace so far carries the start's fixed costs, and the largest estimate of two small CPU runs that
    completed was 32% and 50% over what they spent, so that `costaware prior fit` skipped them as stopped early.
    Mode, baseline, whether the LR anneals and a range given to the policy come from the ``marginal_gain_policy``
    event.
    """
    from costaware.ledger import LEDGER_FILENAME, read_ledger
    from costaware.records import MarginalGainDecisionEvent, MarginalGainPolicyEvent

    path = Path(path)
    if path.is_dir() and not (path / LEDGER_FILENAME).is_file() and (path / "costaware" / LEDGER_FILENAME).is_file():
        path = path / "costaware"  # the run's log dir (lightning_logs/version_N), as `costaware report` takes it
    contents = read_ledger(path, lenient=True)
    policy = next((e for e in contents.events if isinstance(e, MarginalGainPolicyEvent)), MarginalGainPolicyEvent())
    decisions = [e for e in contents.events if isinstance(e, MarginalGainDecisionEvent) and e.usd is not None]
    if len(decisions) < 2:
        return []
    costs = np.asarray([float(e.usd) for e in decisions if e.usd is not None])
    metrics = np.asarray([float("nan") if e.value is None else float(e.value) for e in decisions])
    lrs = [e.lr for e in decisions]
    plans = [e.usd + e.usd_to_predicted_final for e in decisions
             if e.usd is not None and e.usd_to_predicted_final is not None]
    end = contents.end
    spent = end.totals.usd if end is not None and end.how == "completed" and end.totals is not None else None
    planned = max(float(spent), float(costs[-1])) if spent is not None else (plans[-1] if plans else None)
    given = policy.metric_range
    metric_range = (float(given[0]), float(given[1])) if isinstance(given, list) and len(given) == 2 else None
    return [PriorRun(costs, metrics, policy.mode or "max", planned,
                     np.asarray(lrs, dtype=float) if all(v is not None for v in lrs) else None,
                     True if policy.anneals is None else bool(policy.anneals), policy.baseline, metric_range)]
