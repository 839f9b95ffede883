"""Replay recorded learning curves through the marginal-gain stopping policy.

Each run's (cumulative cost, validation metric) points are fed one at a time to
``costaware.curves.MarginalGainPolicy.observe`` -- the exact code the
``MarginalGainStopping`` callback calls -- and the run is scored at the first ``stop``:

* points lost: the run's best metric minus the best metric seen up to the stop (the
  best checkpoint so far is kept), in points (``points_per_unit`` = 100: accuracy 0.01
  or loss 0.01 is one point);
* cost saved: the fraction of the run's total cost not spent (averaged over runs, as the issue's
  target); "$ saved": the share of all the runs' dollars not spent (what a team's bill shows: an
  expensive run saved counts for more);
* regret at a price of ``usd_per_point``: ``usd_per_point * points_lost + usd_spent``
  minus the least such value any stopping point of that run could achieve (the oracle).

Baselines: Lightning-style ``EarlyStopping(patience=p, min_delta=0)`` (stop after ``p``
evaluations without improvement), an oracle that may lose X points per run (stops at
the earliest evaluation within X of the run's best), and one that may lose 0.3 points on
average over a half's runs, put where they save most (the bound for the loss target), and the
one the regret is measured against at the operating price (each run stopped where its regret is
least: what pricing points exactly would do with foresight).

Every data set is split in two fixed halves by a hash of the run id: the policy's
defaults and its operating price are chosen on the ``tune`` half; figures on the
``test`` half were never used to choose anything.

Data: ``--data DIR`` (default: ``../shared/data`` next to the repository) holding
``curves/deberta-mnli/deberta-base_tuning.results.jsonl`` and
``curves/nasbench-nlp-wikitext2/logs.zip``; both are converted to the generic JSONL
format, one run a line::

    {"id": "...", "mode": "max"|"min", "points": [[cumulative_cost_usd, metric(, lr)], ...],
     "planned_cost_usd": 12.5,        # optional, total planned cost
     "baseline": 0.354,               # optional, the metric of a model that learned nothing
     "anneals": true,                 # optional (default true): false for a constant learning rate
     "metric_range": [0, 1],          # optional: the metric's bounds (default: [0, 1] for mode "max" with
                                      # every value in it, else unbounded; an error rate needs it)
     "points_per_unit": 100}          # optional (default 100, accuracy 0.01 = 1 point): 1 for a percentage

The repository's own corpora, made on this machine, are replayed too when present:
``benchmarks/curves/digits.jsonl`` (``make_curves.py``: from scratch and SSL, three data sets),
and, never used to tune anything, ``digits_late_step.jsonl`` and ``digits_pairs.jsonl``
(``make_curves.py --late-step`` / ``--pairs``) and ``lora_sst2.jsonl`` (``make_lora_curves.py``:
LoRA fine-tuning); ``--no-corpus`` leaves them out.

Per data set with a bounded metric, a last line replays the test half with a team's own prior,
fitted on the tune half alone (what ``costaware prior fit`` does with a team's past runs).

``--generic FILE`` replays such a file instead (``--write-generic DIR`` writes the
converted shared data sets in that format).

Usage::

    python benchmarks/replay_curves.py [--json results.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import zipfile
import zlib
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO / "src") not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(_REPO / "src"))

from costaware.curve_prior import CurvePrior, PriorRun, checked_jsonl, load_prior, run_from_record  # noqa: E402
from costaware.curves import Decision, MarginalGainPolicy  # noqa: E402
from costaware.validation import is_number  # noqa: E402

DEFAULT_DATA = _REPO.parent / "shared" / "data"
POINTS_PER_UNIT = 100.0
PATIENCES = (1, 2, 3, 5, 10)
TARGET_LOSS_POINTS = 0.30
TARGET_SAVED = 0.40
CORPUS = _REPO / "benchmarks" / "curves" / "digits.jsonl"  # made here by benchmarks/make_curves.py
# LoRA fine-tuning on SST-2, made here by benchmarks/make_lora_curves.py; never used to tune anything.
LORA_CORPUS = _REPO / "benchmarks" / "curves" / "lora_sst2.jsonl"
# From-scratch and SSL runs whose learning rate drops only at 80% of the plan (make_curves.py --late-step): a
# high-LR plateau past half the plan, where the policy must read the learning rate. Never used to tune anything.
LATE_STEP_CORPUS = _REPO / "benchmarks" / "curves" / "digits_late_step.jsonl"
# From-scratch runs on a 100-class task (make_curves.py --pairs): top-1 crawls near chance (1%) before it rises, the
# slow start of the issue's image classifiers. Held out as the two sets above.
PAIRS_CORPUS = _REPO / "benchmarks" / "curves" / "digits_pairs.jsonl"
# A run with a baseline learns when its best beats the baseline by this many points (10 accuracy points for the
# corpora; ``--learns-above`` for a generic file). A run without a baseline learns when it has a finite metric.
LEARNS_ABOVE_POINTS = 10.0

# Dollars for the DeBERTa runs, which record steps, not time: examples seen ->
# GPU-seconds at an assumed throughput -> dollars at an assumed GPU price.
DEBERTA_EXAMPLES_PER_GPU_SECOND = 400.0  # DeBERTa-base, MNLI, seq 128, mixed precision, A100-class
USD_PER_GPU_HOUR = 2.0
DEBERTA_LEARNS_ABOVE = 0.5  # "runs that learn": best accuracy above chance (~0.35)
# The policy's `baseline` for MNLI: predicting the majority class of the matched validation set
# (entailment, 3,479 of 9,815 sentence pairs) scores this accuracy without learning anything.
MNLI_MATCHED_MAJORITY_ACC = 3479 / 9815
# The same on the mismatched validation set (entailment, 3,463 of 9,832: the share the recorded runs that
# collapse onto one class score there, 2,685 evaluations).
MNLI_MISMATCHED_MAJORITY_ACC = 3463 / 9832
MNLI_MAJORITY_ACC = {"matched": MNLI_MATCHED_MAJORITY_ACC, "mismatched": MNLI_MISMATCHED_MAJORITY_ACC}

# Prices of one point tried for the regret comparison, per data set ($/point).
REGRET_PRICES = {
    "deberta-mnli": (0.03, 0.1, 0.3, 1.0, 3.0),
    "nasbench-nlp": (0.1, 0.3, 1.0, 3.0, 10.0),
    "digits": (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0),  # up to the operating prices the digits sets choose
    "lora-sst2": (0.03, 0.1, 0.3, 1.0, 3.0),  # runs of about a dollar, as DeBERTa's
}
# Prices swept on the tune half to find the operating point for the loss target.
# A coarse grid (0.1, 1 and 10 are shared with the regret prices, whose replays are
# cached), then SWEEP_REFINE log-bisection steps between the two grid prices that bracket
# the loss target: the operating price to within ~3% in a few minutes on two cores.
SWEEP_PRICES = tuple(float(p) for p in np.round(np.geomspace(0.1, 10.0, 7), 3))
# From scratch up to $1000/point: digits-pairs' runs (about $20 each) lose nothing to patience 10 on tune, and below
# $100/point the policy still stopped one of them 1.5 points short; a grid ending there chose its top.
SWEEP_PRICES_SCRATCH = tuple(float(p) for p in np.round(np.geomspace(0.01, 1000.0, 11), 4))
SWEEP_REFINE = 5
GENERIC_PRICES = (0.1, 1.0, 10.0)  # $/point tried on a --generic file unless --prices says otherwise


# ---------------------------------------------------------------------- data
@dataclass(frozen=True)
class Run:
    """One recorded run: costs in dollars, the raw metric, and its direction."""

    id: str
    mode: str
    costs_usd: np.ndarray
    metrics: np.ndarray
    planned_cost_usd: float | None = None
    baseline: float | None = None
    lrs: np.ndarray | None = None
    anneals: bool = True
    metric_range: tuple[float, float] | None = None  # a generic record's; None: the policy infers it ("auto")
    points_per_unit: float = POINTS_PER_UNIT  # a generic record's: 1 for a metric in percent

    @property
    def points(self) -> np.ndarray:
        """Metric in points, higher is better; NaN where the metric was not finite."""
        sign = 1.0 if self.mode == "max" else -1.0
        p = sign * self.points_per_unit * self.metrics
        return np.where(np.isfinite(p), p, np.nan)

    @property
    def has_finite(self) -> bool:
        return bool(np.isfinite(self.metrics).any())


def run_learns(run: Run, above_points: float = LEARNS_ABOVE_POINTS) -> bool:
    """Whether a run learned: its best beats its baseline (the metric of a model that learned nothing) by
    ``above_points``, in either direction of the metric; without a baseline, whether it has a finite metric.

    Runs that do not learn are scored apart (how fast each rule gives up on them), not in the loss/regret tables.
    """
    if not run.has_finite:
        return False
    if run.baseline is None:
        return True
    sign = 1.0 if run.mode == "max" else -1.0
    return bool(np.nanmax(run.points) > sign * run.points_per_unit * run.baseline + above_points)


def run_from_generic(record: dict) -> Run:
    """Builds a :class:`Run` from one generic-JSONL record, validated as ``costaware prior fit`` validates it
    (``costaware.curve_prior.run_from_record``: costs that go down, a bad mode, no points are refused)."""
    run = run_from_record(record)
    ppu = record.get("points_per_unit", POINTS_PER_UNIT)
    if not (is_number(ppu) and math.isfinite(ppu) and ppu > 0):
        raise ValueError(f"run {record.get('id')!r}: points_per_unit must be a positive number, got {ppu!r}")
    return Run(str(record["id"]), run.mode, run.costs_usd, run.metrics, run.planned_cost_usd, run.baseline, run.lrs,
               run.anneals, run.metric_range, float(ppu))


def read_generic(path: Path) -> list[dict]:
    """The records of a generic JSONL file, each checked by :func:`run_from_generic`; a bad line raises ValueError
    naming it."""
    return [record for record, _ in checked_jsonl(path, run_from_generic)]


def _finite_values(record: dict) -> list[float]:
    return [p[1] for p in record.get("points") or [] if isinstance(p, list) and len(p) > 1 and is_number(p[1])
            and math.isfinite(p[1])]


def looks_like_percentages(records: list[dict]) -> int:
    """How many records look like a percentage read as a fraction: mode max, no ``points_per_unit`` or
    ``metric_range`` given, finite values above 1 and none above 100."""
    count = 0
    for r in records:
        if r.get("mode", "max") != "max" or "points_per_unit" in r or r.get("metric_range") is not None:
            continue
        values = _finite_values(r)
        count += bool(values) and max(values) > 1.0 and max(values) <= 100.0 and min(values) >= 0.0
    return count


def looks_like_error_rates(records: list[dict]) -> int:
    """How many records may be error rates read as a loss: mode min, no ``metric_range`` given, every finite value
    in [0, 1]. ("auto" bounds such a metric by 0 below only, and asks no prior; a loss below 1 looks the same.)"""
    count = 0
    for r in records:
        if r.get("mode", "max") != "min" or r.get("metric_range") is not None:
            continue
        values = _finite_values(r)
        count += bool(values) and min(values) >= 0.0 and max(values) <= 1.0
    return count


def deberta_records(path: Path, usd_per_example: float, validation: str = "matched") -> list[dict]:
    """DeBERTa-MNLI tuning runs -> generic records (cost = step x batch size x $/example), their accuracy on the
    ``matched`` validation set (or on the ``mismatched`` one: the same runs, a set nothing was tuned on)."""
    records = []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            usd_per_step = r["train_batch_size"] * usd_per_example
            points = [[step * usd_per_step, acc, linear_warmup_lr(step, r)]
                      for step, acc in r["learning_curves"][validation]]
            records.append(
                {
                    "id": f"deberta-{r['iteration']}",
                    "mode": "max",
                    "points": points,
                    "planned_cost_usd": r["total_model_steps"] * usd_per_step,
                    "baseline": MNLI_MAJORITY_ACC[validation],
                }
            )
    return records


def linear_warmup_lr(step: int, r: dict) -> float:
    """The learning rate of Hugging Face's linear schedule with warmup (the runs' schedule) at ``step``."""
    peak, warmup, total = r["learning_rate"], r["warmup_steps"], r["total_model_steps"]
    if step < warmup:
        return float(f"{peak * step / max(warmup, 1):.4g}")
    return float(f"{peak * max(0.0, (total - step) / max(total - warmup, 1)):.4g}")


def nasbench_records(path: Path, usd_per_gpu_hour: float) -> list[dict]:
    """NAS-Bench-NLP logs -> generic records (cost = cumulative wall time x $/GPU-hour).

    Runs whose loss became NaN keep their NaN points (written as ``null``): the replay
    must handle them. Their planned cost is unknown (they end early), so no run gets one
    (constant-LR training has no annealing end to plan for).
    """
    records = []
    with zipfile.ZipFile(path) as z:
        for name in sorted(z.namelist()):
            if not name.endswith(".json"):
                continue
            d = json.loads(z.read(name))
            wall_s = np.cumsum(np.asarray(d["wall_times"], dtype=float))
            losses = [None if v is None or not math.isfinite(v) else float(v) for v in d["val_losses"]]
            n = min(len(wall_s), len(losses))
            points = [[float(wall_s[i]) * usd_per_gpu_hour / 3600.0, losses[i]] for i in range(n)]
            records.append({"id": f"nasbench-{Path(name).stem}", "mode": "min", "points": points})
    return records


def degraded(record: dict, every: int = 1, no_plan: bool = False, keep_lr: bool = False,
             noise_points: float = 0.0) -> dict:
    """A generic record with only every ``every``-th evaluation kept (and the last), and without its planned cost
    (and its learning rates, unless ``keep_lr``) when ``no_plan``, and with Gaussian noise of ``noise_points`` SD
    added to every evaluation (seeded by the run's id; kept within a bounded metric's range): how the policy fares
    on records sparser, barer or noisier (a smaller validation set) than ours."""
    points = record["points"]
    if every > 1:
        points = points[every - 1::every] + ([points[-1]] if len(points) % every else [])
    if no_plan and not keep_lr:
        points = [p[:2] for p in points]
    if noise_points > 0:
        points = noisy(record, points, noise_points)
    out = {k: v for k, v in record.items() if not (no_plan and k == "planned_cost_usd")}
    out["points"] = points
    return out


def noisy(record: dict, points: list, noise_points: float) -> list:
    """``points`` with N(0, ``noise_points``) points added to each finite metric, as one run's own draw."""
    rng = np.random.default_rng(zlib.crc32(str(record["id"]).encode()))
    sd = noise_points / float(record.get("points_per_unit", POINTS_PER_UNIT))
    values = [p[1] for p in points if isinstance(p[1], (int, float)) and math.isfinite(p[1])]
    bounds = record.get("metric_range")
    if bounds is None and record.get("mode", "max") == "max" and values and 0.0 <= min(values) <= max(values) <= 1.0:
        bounds = [0.0, 1.0]  # an accuracy, as the policy reads it
    out = []
    for p in points:
        value = p[1]
        if isinstance(value, (int, float)) and math.isfinite(value):
            value = float(value) + float(rng.normal(0.0, sd))
            if bounds is not None:
                value = min(max(value, float(bounds[0])), float(bounds[1]))
        out.append([p[0], value, *p[2:]])
    return out


def half_of(run_id: str) -> str:
    """Fixed split by a hash of the id: 'tune' (choose settings) or 'test' (report)."""
    return "tune" if zlib.crc32(run_id.encode()) % 2 == 0 else "test"


# ---------------------------------------------------------------------- stopping rules
def policy_for(run: Run, policy_kwargs: dict, planned_cost_usd: float | None) -> MarginalGainPolicy:
    """A fresh policy for the run, as the callback would set it up (the given settings win)."""
    kwargs = dict(policy_kwargs)
    kwargs.setdefault("mode", run.mode)
    kwargs.setdefault("points_per_unit", run.points_per_unit)
    if planned_cost_usd is not None:
        kwargs.setdefault("planned_cost_usd", planned_cost_usd)
    if run.baseline is not None:
        kwargs.setdefault("baseline", run.baseline)
    kwargs.setdefault("anneals", run.anneals)
    if run.metric_range is not None:
        kwargs.setdefault("metric_range", run.metric_range)
    if planned_cost_usd is not None:
        kwargs.setdefault("lr_schedule", lr_schedule_of(run, planned_cost_usd))
    return MarginalGainPolicy(**kwargs)


def lr_schedule_of(run: Run, planned_cost_usd: float) -> list[tuple[float, float]] | None:
    """The run's learning rates as the schedule the callback reads off the Trainer's scheduler: (fraction of the
    plan, lr) at every evaluation (schedules are functions of the step, known ahead); ``None`` without rates."""
    if run.lrs is None or planned_cost_usd <= 0:
        return None
    pairs: list[tuple[float, float]] = []
    for cost, lr in zip(run.costs_usd, run.lrs):
        if not pairs or cost / planned_cost_usd > pairs[-1][0]:
            pairs.append((float(cost / planned_cost_usd), float(lr)))
    return pairs if len(pairs) >= 2 else None


def observe(policy: MarginalGainPolicy, run: Run, i: int) -> Decision:
    """Feeds the run's ``i``-th evaluation to the policy."""
    return policy.observe(run.costs_usd[i], run.metrics[i], lr=None if run.lrs is None else float(run.lrs[i]))


def policy_stop_index(run: Run, policy_kwargs: dict, use_plan: bool = True) -> tuple[int, str]:
    """Feeds the run to a fresh policy one point at a time; returns (stop index, reason)."""
    policy = policy_for(run, policy_kwargs, run.planned_cost_usd if use_plan else None)
    for i in range(len(run.metrics)):
        decision = observe(policy, run, i)
        if decision.stop:
            return i, decision.reason
    return len(run.metrics) - 1, "ran to the end"


def patience_stop_index(run: Run, patience: int) -> int:
    """Lightning EarlyStopping(patience, min_delta=0, check_finite=True) replayed."""
    best = -math.inf
    wait = 0
    for i, p in enumerate(run.points):
        if not np.isfinite(p):
            return i  # check_finite stops on NaN/inf
        if p > best:
            best, wait = p, 0
        else:
            wait += 1
            if wait >= patience:
                return i
    return len(run.points) - 1


def oracle_stop_index(run: Run, allowed_points: float) -> int:
    """Earliest evaluation whose value is within ``allowed_points`` of the run's best."""
    p = run.points
    best = np.nanmax(p)
    return int(np.argmax(np.nan_to_num(p, nan=-np.inf) >= best - allowed_points - 1e-9))


def priced_oracle_stop_index(run: Run, usd_per_point: float) -> int:
    """The stop with the least regret at ``usd_per_point`` (points lost priced, plus dollars spent), with
    foresight: what the policy's regret is measured against, and what a policy that prices points exactly so would
    do if it knew each run's future."""
    return int(np.argmin(usd_per_point * points_lost_at(run) + run.costs_usd))


def mean_loss_oracle_stop_indices(runs: list[Run], mean_points: float) -> list[int]:
    """Stopping points, chosen with the whole runs in view, that save the most cost on average while losing at
    most ``mean_points`` on average: about the most any rule can save under a mean-loss target (the Lagrange
    solution is exact on the convex hull of what the stopping points can reach).

    Unlike :func:`oracle_stop_index` (the same loss allowed on every run), the loss may go where it saves most.
    Found by Lagrange: each run stops where ``lam * points_lost - fraction_saved`` is least; the mean loss falls
    as ``lam`` grows, and the least ``lam`` (bisected in log) whose mean loss is within the target saves most.
    """
    lost = [np.nan_to_num(points_lost_at(r), nan=np.inf) for r in runs]
    saved = [1.0 - r.costs_usd / r.costs_usd[-1] if r.costs_usd[-1] > 0 else np.zeros(len(r.costs_usd))
             for r in runs]

    def stops(log_lam: float) -> tuple[bool, list[int]]:
        idx = [int(np.argmin(math.exp(log_lam) * run_lost - run_saved)) for run_lost, run_saved in zip(lost, saved)]
        return bool(np.mean([run_lost[i] for run_lost, i in zip(lost, idx)]) <= mean_points + 1e-9), idx

    lo, hi = math.log(1e-6), math.log(1e6)  # points per unit of cost saved: 1e6 loses nothing anywhere
    ok, idx = stops(lo)
    if ok:
        return idx
    best = stops(hi)[1]
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        ok, idx = stops(mid)
        if ok:
            hi, best = mid, idx
        else:
            lo = mid
    return best


# ---------------------------------------------------------------------- scoring
def points_lost_at(run: Run) -> np.ndarray:
    """Points lost if stopped at each index (best kept so far vs best of the run)."""
    p = np.nan_to_num(run.points, nan=-np.inf)
    return np.nanmax(run.points) - np.maximum.accumulate(p)


def score(run: Run, index: int) -> tuple[float, float]:
    """(points lost, fraction of cost saved) when the run stops at ``index``."""
    lost = float(points_lost_at(run)[index])
    total = run.costs_usd[-1]
    saved = float(1.0 - run.costs_usd[index] / total) if total > 0 else 0.0
    return lost, saved


def excess_regret_usd(run: Run, index: int, usd_per_point: float) -> float:
    """Value lost against the best stopping point of this run, in dollars."""
    total = usd_per_point * points_lost_at(run) + run.costs_usd
    return float(total[index] - total.min())  # the minimum: at priced_oracle_stop_index


# ---------------------------------------------------------------------- replay
def _chunk_job(args: tuple) -> list:
    per_run, runs, extra = args
    return [per_run(r, *extra) for r in runs]


def for_each_run(per_run: Callable, runs: list[Run], extra: tuple, workers: int) -> list:
    """``per_run(run, *extra)`` for every run, in parallel over ``workers`` processes, in the runs' order."""
    if workers <= 1 or len(runs) < 32:
        return _chunk_job((per_run, runs, extra))
    n_chunks = workers * 4
    with ProcessPoolExecutor(workers) as pool:
        parts = list(pool.map(_chunk_job, [(per_run, runs[i::n_chunks], extra) for i in range(n_chunks)]))
    out: list = [None] * len(runs)
    for i, part in enumerate(parts):
        for j, res in enumerate(part):
            out[i + j * n_chunks] = res
    return out


def replay_policy(runs: list[Run], kwargs: dict, workers: int, use_plan: bool = True) -> list[tuple[int, str]]:
    """Stop indices of the policy on every run, in parallel over ``workers`` processes."""
    return for_each_run(policy_stop_index, runs, (kwargs, use_plan), workers)


def summarize(runs: list[Run], indices: list[int]) -> dict:
    lost, saved = zip(*(score(r, i) for r, i in zip(runs, indices))) if runs else ((), ())
    return {
        "runs": len(runs),
        "points_lost_mean": float(np.mean(lost)) if runs else float("nan"),
        "points_lost_p90": float(np.percentile(lost, 90)) if runs else float("nan"),
        "cost_saved_mean": float(np.mean(saved)) if runs else float("nan"),
        "dollars_saved_share": dollars_saved_share(runs, indices),
    }


def dollars_saved_share(runs: list[Run], indices: list[int]) -> float:
    """The share of all the runs' dollars not spent when each stops at its index."""
    total = sum(float(r.costs_usd[-1]) for r in runs)
    spent = sum(float(r.costs_usd[i]) for r, i in zip(runs, indices))
    return 1.0 - spent / total if total > 0 else float("nan")


def mean_regret(runs: list[Run], indices: list[int], usd_per_point: float) -> float:
    return float(np.mean([excess_regret_usd(r, i, usd_per_point) for r, i in zip(runs, indices)]))


def standard_error(values: list[float]) -> float:
    """Standard error of the mean of ``values`` (0 for fewer than two)."""
    return float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0


def paired_regret_difference(runs: list[Run], a: list[int], b: list[int], usd_per_point: float) -> tuple[float, float]:
    """Mean and standard error of rule a's regret minus rule b's, run by run (same runs)."""
    diff = [excess_regret_usd(r, i, usd_per_point) - excess_regret_usd(r, j, usd_per_point)
            for r, i, j in zip(runs, a, b)]
    return float(np.mean(diff)), standard_error(diff)


# ---------------------------------------------------------------------- calibration and speed
COVERAGE_AT = (0.10, 0.25, 0.50)  # fractions of each run's cost at which the stated interval is checked


def interval_checks(run: Run, policy_kwargs: dict) -> list[tuple[bool, float, float] | None]:
    """At 10/25/50% of the run's cost: (the run's final metric inside the stated interval?, low, high).

    The policy is fed every point up to there (it is not allowed to stop); its last estimate
    states a ``confidence`` interval for the metric at the planned end. A run without a plan is
    told its real end as the plan here, so the interval is about the same final value. ``None``
    where the policy had no estimate yet (too few points).
    """
    policy = policy_for(run, policy_kwargs, run.planned_cost_usd or float(run.costs_usd[-1]))
    final = float(run.metrics[-1])
    out: list = []
    estimate = None
    total = float(run.costs_usd[-1])
    for at in COVERAGE_AT:
        for i in range(policy.num_points, len(run.metrics) - 1):
            if run.costs_usd[i] > at * total:
                break
            d = observe(policy, run, i)
            estimate = d.estimate if d.estimate is not None else estimate
        if estimate is None or not math.isfinite(final):
            out.append(None)
        else:
            lo, hi = estimate.predicted_final_low, estimate.predicted_final_high
            out.append((bool(min(lo, hi) - 1e-9 <= final <= max(lo, hi) + 1e-9), lo, hi))
    return out


def ended_better(run: Run, check: tuple[bool, float, float]) -> bool:
    """Whether the run's final metric lies beyond the better end of a stated interval (a miss of a pessimistic fit)."""
    sign = 1.0 if run.mode == "max" else -1.0
    return sign * float(run.metrics[-1]) > max(sign * check[1], sign * check[2]) + 1e-9


def coverage(runs: list[Run], kwargs: dict, workers: int) -> list[list]:
    """interval_checks for every run, in parallel."""
    return for_each_run(interval_checks, runs, (kwargs,), workers)


GAIN_PARTS = (0.25, 0.5, 0.75, 1.0)  # the stated gain is checked by quarter of each run's cost


def gain_checks(run: Run, policy_kwargs: dict) -> list[tuple[float, ...]]:
    """Every gain the policy states over the run, fed every point (it is not allowed to stop): (fraction of the
    run's cost, the stated median gain of the kept best over the stated increment, the gain the run then made by
    the end of that increment), in points. Increments that reach past the run's end are left out.

    Where past runs priced the next stretch, three more: the fit's rate, past runs' rate and the rate the policy
    used (points/$), and a fourth, the rate the run then made over that stretch (the next doubling of the spend);
    NaN where past runs were not asked.
    """
    policy = policy_for(run, policy_kwargs, run.planned_cost_usd)
    points = np.nan_to_num(run.points, nan=-np.inf)
    best = np.maximum.accumulate(points)
    total = float(run.costs_usd[-1])

    def best_at(usd: float) -> int:
        return int(np.searchsorted(run.costs_usd, usd * (1.0 + 1e-9), side="right")) - 1

    out = []
    for i in range(len(run.metrics)):
        estimate = observe(policy, run, i).estimate
        if estimate is None or not math.isfinite(best[i]):
            continue
        until = float(run.costs_usd[i]) + estimate.increment_usd
        if until > total * (1.0 + 1e-9):
            continue
        rates = (float("nan"),) * 4
        past_usd = estimate.past_increment_usd
        if past_usd is not None and estimate.past_gain_points_upper is not None:
            k = best_at(min(float(run.costs_usd[i]) + past_usd, total))
            made_rate = float(best[k] - best[i]) / past_usd
            rates = (estimate.gain_points_upper / estimate.increment_usd,
                     estimate.past_gain_points_upper / past_usd, estimate.gain_per_usd, made_rate)
        out.append((float(run.costs_usd[i]) / total, estimate.gain_points, float(best[best_at(until)] - best[i]),
                    *rates))
    return out


def decision_time_ms(n_points: int = 1000, repeats: int = 20) -> float:
    """Median time of one decision with ``n_points`` evaluations already seen (a saturating run with a plan)."""
    rng = np.random.default_rng(0)
    costs = np.linspace(0.01, 10.0, n_points + repeats)
    acc = 0.9 - 0.3 * costs ** -0.5 / 10 + rng.normal(0, 0.002, costs.size)
    lrs = 1e-3 * (1 - costs / 20.0)
    policy = MarginalGainPolicy(usd_per_point=1e6, planned_cost_usd=20.0)  # never stops: every decision is full
    for c, a, lr in zip(costs[:n_points], acc[:n_points], lrs[:n_points]):
        policy.observe(c, a, lr=lr)
    times = []
    for c, a, lr in zip(costs[n_points:], acc[n_points:], lrs[n_points:]):
        t0 = time.perf_counter()
        policy.observe(c, a, lr=lr)
        times.append(time.perf_counter() - t0)
    return 1000.0 * float(np.median(times))


def team_prior(runs: list[Run]) -> CurvePrior | None:
    """A prior fitted on ``runs`` alone, as ``costaware prior fit`` would on a team's past runs of one kind.

    ``None`` where none of them has a bounded metric (a loss).
    """
    past = [PriorRun(r.costs_usd, r.metrics, r.mode, r.planned_cost_usd, r.lrs, r.anneals, r.baseline, r.metric_range)
            for r in runs]
    try:
        return CurvePrior.fit(past, source=f"{len(past)} runs of the tune half")
    except ValueError:
        return None


# ---------------------------------------------------------------------- report
def evaluate_dataset(name: str, runs: list[Run], policy_kwargs: dict, prices: tuple, workers: int,
                     learns: callable, out: list[str], from_scratch: bool = False) -> dict:
    """Runs every comparison on one data set, both halves; appends printed lines to ``out``.

    ``from_scratch``: the operating price's loss target is EarlyStopping(patience=10)'s mean
    loss on the tune half (the issue's target for from-scratch/SSL sets), not TARGET_LOSS_POINTS.
    """
    def say(line: str = "") -> None:
        print(line, flush=True)
        out.append(line)

    scored = [r for r in runs if r.has_finite]
    halves = {h: [r for r in scored if half_of(r.id) == h] for h in ("tune", "test")}
    learners = {h: [r for r in rs if learns(r)] for h, rs in halves.items()}
    say(f"== {name}: {len(runs)} runs ({len(runs) - len(scored)} without any finite metric); "
        f"runs that learn: tune {len(learners['tune'])}, test {len(learners['test'])} "
        f"(all halves: {sum(map(len, learners.values()))})")
    result: dict = {"runs": len(runs), "learners": {h: len(v) for h, v in learners.items()}, "halves": {}}
    cache: dict = {}

    def policy_on(h: str, price: float) -> list[tuple[int, str]]:
        """The policy's (stop index, reason) on every learner of half ``h`` at ``price`` (cached)."""
        if (h, price) not in cache:
            cache[h, price] = replay_policy(learners[h], {**policy_kwargs, "usd_per_point": price}, workers)
        return cache[h, price]

    # 1. Operating price for the loss target, chosen on the tune half only.
    t0 = time.time()
    sweep = []
    target = TARGET_LOSS_POINTS
    if from_scratch:
        target = summarize(learners["tune"], [patience_stop_index(r, 10) for r in learners["tune"]])["points_lost_mean"]
    grid = SWEEP_PRICES_SCRATCH if from_scratch else SWEEP_PRICES

    def try_price(price: float) -> bool:
        """Whether the tune half's mean loss is within the target with one standard error to spare."""
        indices = [i for i, _ in policy_on("tune", price)]
        s = summarize(learners["tune"], indices)
        se = standard_error([score(r, i)[0] for r, i in zip(learners["tune"], indices)])
        sweep.append((price, s["points_lost_mean"], s["cost_saved_mean"], se))
        return s["points_lost_mean"] + se <= target

    passing = [p for p in grid if try_price(p)]
    op_price = min(passing) if passing else max(grid)
    failing = [p for p in grid if p < op_price]
    if passing and failing:  # the loss falls with the price: bisect (in log) below op_price
        lo = max(failing)
        for _ in range(SWEEP_REFINE):
            mid = float(f"{math.sqrt(lo * op_price):.3g}")
            if try_price(mid):
                op_price = mid
            else:
                lo = mid
    sweep.sort()
    say(f"tune-half sweep of usd_per_point ({time.time() - t0:.0f}s): "
        + ", ".join(f"${p:g}: {lost:.2f}+-{se:.2f}pt/{saved:.0%}" for p, lost, saved, se in sweep))
    what = "patience 10's mean loss on tune, " if from_scratch else ""
    say(f"operating price (chosen on tune: the lowest whose mean loss + 1 standard error <= {what}{target:.3g} "
        f"points): ${op_price:g}/point")
    result["sweep_tune"] = [{"usd_per_point": p, "points_lost_mean": lost, "cost_saved_mean": s, "points_lost_se": se}
                            for p, lost, s, se in sweep]
    result["operating_usd_per_point"] = op_price

    # 2. Loss / savings table on both halves.
    say()
    say(f"{'half':5} {'rule':34} {'runs':>5} {'pts lost':>9} {'p90 lost':>9} {'saved':>7} {'$ saved':>8}")
    for h in ("tune", "test"):
        rs = learners[h]
        rows = {}
        for p in PATIENCES:
            rows[f"EarlyStopping(patience={p})"] = summarize(rs, [patience_stop_index(r, p) for r in rs])
        for x in (0.35, 0.7):
            rows[f"oracle(allowed {x} points/run)"] = summarize(rs, [oracle_stop_index(r, x) for r in rs])
        rows[f"oracle(mean loss <= {TARGET_LOSS_POINTS:g} points)"] = summarize(
            rs, mean_loss_oracle_stop_indices(rs, TARGET_LOSS_POINTS))
        rows[f"oracle(least regret, ${op_price:g}/pt)"] = summarize(
            rs, [priced_oracle_stop_index(r, op_price) for r in rs])
        pol = policy_on(h, op_price)
        rows[f"MarginalGainPolicy(${op_price:g}/point)"] = summarize(rs, [i for i, _ in pol])
        if any(r.lrs is not None for r in rs):  # what reading the learning rate is worth: the same runs without
            blind = replay_policy([replace(r, lrs=None) for r in rs], {**policy_kwargs, "usd_per_point": op_price},
                                  workers)
            rows["policy, learning rates withheld"] = summarize(rs, [i for i, _ in blind])
        for label, s in rows.items():
            say(f"{h:5} {label:34} {s['runs']:5d} {s['points_lost_mean']:9.3f} {s['points_lost_p90']:9.3f} "
                f"{s['cost_saved_mean']:7.1%} {s['dollars_saved_share']:8.1%}")
        pol_s = rows[f"MarginalGainPolicy(${op_price:g}/point)"]
        pol_scores = [score(r, i) for r, (i, _) in zip(rs, pol)]
        pol_s["points_lost_se"] = standard_error([lost for lost, _ in pol_scores])
        pol_s["cost_saved_se"] = standard_error([saved for _, saved in pol_scores])
        result["halves"][h] = {"table": rows}
        result["halves"][h]["target_met"] = bool(
            pol_s["points_lost_mean"] <= TARGET_LOSS_POINTS and pol_s["cost_saved_mean"] >= TARGET_SAVED
        )
        p10 = rows["EarlyStopping(patience=10)"]["points_lost_mean"]
        result["halves"][h]["lost_at_most_patience10"] = bool(pol_s["points_lost_mean"] <= p10)
        say(f"{h:5} points lost at the operating price <= EarlyStopping(patience=10)'s ({p10:.3f}): "
            f"{'MET' if pol_s['points_lost_mean'] <= p10 else 'NOT met'} ({pol_s['points_lost_mean']:.3f})")
        say(f"{h:5} target (<= {TARGET_LOSS_POINTS} points lost and >= {TARGET_SAVED:.0%} saved): "
            f"{'MET' if result['halves'][h]['target_met'] else 'NOT met'} (policy: "
            f"{pol_s['points_lost_mean']:.3f} +- {pol_s['points_lost_se']:.3f} points lost, "
            f"{pol_s['cost_saved_mean']:.1%} +- {pol_s['cost_saved_se']:.1%} saved; +- one standard error; "
            f"{pol_s['dollars_saved_share']:.1%} of all the runs' dollars)")

    # 3. Regret against the oracle at each price, policy priced at that price.
    say()
    say(f"excess regret vs per-run oracle, $ per run (regret = usd_per_point * points_lost + usd_spent; "
        f"difference: policy minus best patience, run by run); mean run cost: "
        f"tune ${np.mean([r.costs_usd[-1] for r in learners['tune']]):.3f}, "
        f"test ${np.mean([r.costs_usd[-1] for r in learners['test']]):.3f}")
    say(f"{'half':5} {'$/point':>8} {'policy':>9} {'best patience':>14} {'p':>3} {'difference +- SE':>17} "
        f"{'policy lost':>12} {'saved':>7} {'better?':>8}")
    for h in ("tune", "test"):
        rs = learners[h]
        pat_idx = {p: [patience_stop_index(r, p) for r in rs] for p in PATIENCES}
        result["halves"][h]["regret"] = []
        for price in prices:
            pol = [i for i, _ in policy_on(h, price)]
            reg_pol = mean_regret(rs, pol, price)
            reg_pat = {p: mean_regret(rs, idx, price) for p, idx in pat_idx.items()}
            best_p = min(reg_pat, key=reg_pat.get)
            s = summarize(rs, pol)
            better = reg_pol < reg_pat[best_p]
            diff, diff_se = paired_regret_difference(rs, pol, pat_idx[best_p], price)
            say(f"{h:5} {price:8g} {reg_pol:9.4f} {reg_pat[best_p]:14.4f} {best_p:3d} "
                f"{f'{diff:+.4f} +- {diff_se:.4f}':>17} "
                f"{s['points_lost_mean']:12.3f} {s['cost_saved_mean']:7.1%} {'yes' if better else 'NO':>8}")
            result["halves"][h]["regret"].append({
                "usd_per_point": price, "policy_excess_regret_usd": reg_pol,
                "best_patience": best_p, "best_patience_excess_regret_usd": reg_pat[best_p],
                "difference_usd": diff, "difference_se_usd": diff_se,
                "patience_excess_regret_usd": {str(p): v for p, v in reg_pat.items()},
                "policy_points_lost_mean": s["points_lost_mean"], "policy_cost_saved_mean": s["cost_saved_mean"],
                "policy_better": bool(better),
            })
        result["halves"][h]["regret_better_at_every_price"] = all(
            row["policy_better"] for row in result["halves"][h]["regret"])
    for h in ("tune", "test"):
        say(f"{h:5} target (lower regret than the best patience at every price): "
            f"{'MET' if result['halves'][h]['regret_better_at_every_price'] else 'NOT met'}")

    # 4. Runs that do not learn / diverge: how fast does each rule give up on them?
    bad = [r for r in runs if not r.has_finite or not learns(r)]
    if bad:
        pol = replay_policy(bad, {**policy_kwargs, "usd_per_point": op_price}, workers)
        evals = [i + 1 for i, _ in pol]
        saved = [1.0 - r.costs_usd[i] / r.costs_usd[-1] if r.costs_usd[-1] > 0 else 0.0
                 for r, (i, _) in zip(bad, pol)]
        spent = [r.costs_usd[i] for r, (i, _) in zip(bad, pol)]
        p3_idx = [patience_stop_index(r, 3) for r in bad]
        p3 = [i + 1 for i in p3_idx]
        p3_spent = [r.costs_usd[i] for r, i in zip(bad, p3_idx)]
        say()
        say(f"runs that do not learn or diverge (both halves): {len(bad)}; policy (${op_price:g}/point) stops "
            f"after {np.mean(evals):.1f} evaluations on average (median {np.median(evals):.0f}, "
            f"max {max(evals)}), saving {np.mean(saved):.0%} of their cost, ${np.mean(spent):.3f} spent a run; "
            f"EarlyStopping(patience=3) after {np.mean(p3):.1f}, ${np.mean(p3_spent):.3f} a run")
        kinds: dict[str, int] = {}
        for _, reason in pol:
            key = reason.split(":")[0]
            kinds[key] = kinds.get(key, 0) + 1
        say("  stop reasons: " + ", ".join(f"{k} x{v}" for k, v in sorted(kinds.items())))
        # The other side of stopping runs as not learning: runs that learn, stopped that way.
        false_stops = {h: [score(r, i)[0] for r, (i, reason) in zip(learners[h], policy_on(h, op_price))
                           if reason.startswith("not learning")] for h in ("tune", "test")}
        say("  runs that learn but were stopped as not learning: " + ", ".join(
            f"{h} {len(v)}" + (f" ({np.sum(v):.1f} points lost in all)" if v else "") for h, v in false_stops.items()))
        result["non_learning"] = {"runs": len(bad), "policy_evals_mean": float(np.mean(evals)),
                                  "policy_cost_saved_mean": float(np.mean(saved)),
                                  "policy_usd_spent_mean": float(np.mean(spent)),
                                  "patience3_evals_mean": float(np.mean(p3)),
                                  "patience3_usd_spent_mean": float(np.mean(p3_spent)), "stop_reasons": kinds,
                                  "learners_stopped_as_not_learning": {h: len(v) for h, v in false_stops.items()}}
    # 5. The stated interval for the final metric: how often does it hold the run's real final value? The policy as
    # shipped (whose prior leaves the interval to the curve fit), then the interval the shipped prior's cells would
    # state (as a team's file of them would): which side the misses fall on shows whether either is biased.
    conf = MarginalGainPolicy().confidence
    result["coverage"], result["coverage_prior_interval"] = {}, {}
    shipped: dict = {}
    stating = CurvePrior.from_dict(load_prior("default").to_dict())  # the same cells, stating their interval
    blocks = (("coverage", {}, "runs that learn, as shipped (the interval from the curve fit)"),
              ("coverage_prior_interval", {"prior": stating},
               "runs that learn, the interval from the shipped prior's past runs instead"))
    for key, extra, what in blocks:
        say()
        say(f"coverage of the stated {conf:.0%} interval for the final metric (target: 70-90% at 25% of the run), "
            f"{what}, at ${op_price:g}/point:")
        for h in ("tune", "test"):
            checks = coverage(learners[h], {**policy_kwargs, "usd_per_point": op_price, **extra}, workers)
            shipped.setdefault(h, checks)
            if key == "coverage_prior_interval" and checks == shipped[h]:
                say(f"{h:5} the same: the prior applies to none of these runs (it needs a bounded metric and a plan)")
                result[key][h] = result["coverage"][h]
                continue
            row = []
            for k, at in enumerate(COVERAGE_AT):
                got = [(r, c[k]) for r, c in zip(learners[h], checks) if c[k] is not None]
                inside = float(np.mean([g[0] for _, g in got])) if got else float("nan")
                width = float(np.mean([abs(g[2] - g[1]) * r.points_per_unit for r, g in got])) if got else float("nan")
                better = float(np.mean([ended_better(r, g) for r, g in got])) if got else float("nan")
                worse = max(1.0 - inside - better, 0.0)  # not -0% from rounding
                row.append(f"at {at:.0%}: {inside:.0%} of {len(got)} (width {width:.2f} points; misses: ended better "
                           f"{better:.0%}, worse {worse:.0%})")
                result[key].setdefault(h, {})[f"{at:g}"] = {"coverage": inside, "runs": len(got),
                                                           "no_interval_yet": len(checks) - len(got),
                                                           "mean_width_points": width,
                                                           "ended_better": better, "ended_worse": worse}
            say(f"{h:5} " + "; ".join(row))

    # 5b. The gain the policy states, against what the runs then made: a stated gain that runs high keeps runs going
    # that do not pay (the policy prices the next increment with it).
    say()
    say(f"the stated gain (the median gain of the kept best over the stated increment) against what the run then "
        f"made, mean points per estimate, runs that learn, at ${op_price:g}/point, by part of the run:")
    result["gain_calibration"] = {}
    for h in ("tune", "test"):
        per_run = for_each_run(gain_checks, learners[h], ({**policy_kwargs, "usd_per_point": op_price},), workers)
        checks = [c for run_checks in per_run for c in run_checks]
        row, lo = [], 0.0
        for hi in GAIN_PARTS:
            got = np.asarray([c[1:3] for c in checks if lo <= c[0] < hi]).reshape(-1, 2)
            stated, made = (float(np.mean(got[:, k])) if len(got) else float("nan") for k in (0, 1))
            ratio = f"{stated / made:.2f}x" if made > 0 else "-"
            row.append(f"{lo:.0%}-{hi:.0%}: {stated:.3f} stated, {made:.3f} made ({ratio}, {len(got)})")
            result["gain_calibration"].setdefault(h, {})[f"{lo:g}-{hi:g}"] = {
                "estimates": len(got), "stated_points_mean": stated, "made_points_mean": made}
            lo = hi
        say(f"{h:5} " + "; ".join(row))
        # How well each rate ranks what the next doubling of the spend then brought, early in a run (25-50%), where
        # past runs price the next stretch: why the policy blends the two (costaware.curves._PRIOR_RATE_SPREAD).
        early = np.asarray([c[3:] for c in checks if 0.25 <= c[0] < 0.5 and math.isfinite(c[3])]).reshape(-1, 4)
        if len(early) >= 10:
            rho = [float(spearmanr(early[:, k], early[:, 3]).statistic) for k in range(3)]
            say(f"{h:5} rank correlation (Spearman) with the rate the next doubling of the spend then made, 25%-50% "
                f"of a run, {len(early)} estimates: the fit's rate {rho[0]:.3f}, past runs' {rho[1]:.3f}, "
                f"the rate used (weighted) {rho[2]:.3f}")
            result["gain_calibration"][h]["spearman_25-50"] = {"estimates": len(early), "fit": rho[0],
                                                               "past_runs": rho[1], "used": rho[2]}

    # 6. Other priors, replayed on the test half against the shipped one. A team's own (issue 12: past runs of the
    # same kind are the best predictor a team has), fitted on this set's tune half alone, non-learning runs included;
    # on from-scratch sets, the packaged from-scratch prior too (prior="from-scratch").
    others = [("team_prior", "a team's own prior", team_prior(halves["tune"]))]
    if from_scratch:
        others.append(("from_scratch_prior", "the packaged prior='from-scratch'", load_prior("from-scratch")))
    for key, label, other in others:
        if other is None:
            continue
        rs = learners["test"]
        own = {p: [i for i, _ in replay_policy(rs, {**policy_kwargs, "usd_per_point": p, "prior": other}, workers)]
               for p in dict.fromkeys((op_price, *prices))}
        s_own, s_shipped = summarize(rs, own[op_price]), summarize(rs, [i for i, _ in policy_on("test", op_price)])
        regret_rows = result["halves"]["test"]["regret"]  # the best patience's regret at each price, from step 3
        wins_own = [mean_regret(rs, own[row["usd_per_point"]], row["usd_per_point"])
                    < row["best_patience_excess_regret_usd"] for row in regret_rows]
        wins_shipped = [row["policy_better"] for row in regret_rows]
        shipped_cov = [result["coverage"]["test"][f"{at:g}"]["coverage"] for at in COVERAGE_AT]
        cov = shipped_cov  # a prior that states no interval leaves it to the curve fit, as the shipped one does
        if other.states_interval:
            checks = coverage(rs, {**policy_kwargs, "usd_per_point": op_price, "prior": other}, workers)
            cov = []
            for k in range(len(COVERAGE_AT)):
                got = [c[k][0] for c in checks if c[k] is not None]
                cov.append(float(np.mean(got)) if got else float("nan"))
        say()
        say(f"{label} ({other.source}, {len(other.cells)} cells), test half, against the shipped prior:")
        say(f"test  at ${op_price:g}/point: {s_own['points_lost_mean']:.3f} points lost, "
            f"{s_own['cost_saved_mean']:.1%} saved (shipped: {s_shipped['points_lost_mean']:.3f}, "
            f"{s_shipped['cost_saved_mean']:.1%}); regret below the best patience at {sum(wins_own)} of "
            f"{len(prices)} prices (shipped: {sum(wins_shipped)}); coverage at "
            + " / ".join(f"{at:.0%}" for at in COVERAGE_AT) + ": "
            + (" / ".join(f"{c:.0%}" for c in cov) + " (shipped: " + " / ".join(f"{c:.0%}" for c in shipped_cov) + ")"
               if other.states_interval else "the curve fit's interval, as shipped"))
        lost_by_price = {row["usd_per_point"]: (summarize(rs, own[row["usd_per_point"]])["points_lost_mean"],
                                                row["policy_points_lost_mean"]) for row in regret_rows}
        say("test  points lost by price: " + ", ".join(f"${p:g}: {mine:.2f} (shipped {theirs:.2f})"
                                                      for p, (mine, theirs) in lost_by_price.items()))
        result[key] = {"cells": len(other.cells), "points_lost_mean": s_own["points_lost_mean"],
                       "cost_saved_mean": s_own["cost_saved_mean"], "regret_wins": sum(wins_own),
                       "coverage": {f"{at:g}": c for at, c in zip(COVERAGE_AT, cov)},
                       "points_lost_by_price": {f"{p:g}": v[0] for p, v in lost_by_price.items()}}
    say()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="shared data root (holds curves/)")
    parser.add_argument("--generic", type=Path, help="replay this generic JSONL file instead")
    parser.add_argument("--from-scratch", action="store_true",
                        help="with --generic: the runs train from scratch or pretrain (SSL), so the operating price's "
                             "loss target is EarlyStopping(patience=10)'s mean loss on the tune half, not "
                             f"{TARGET_LOSS_POINTS} points")
    parser.add_argument("--prices", type=float, nargs="+", metavar="USD_PER_POINT",
                        help=f"with --generic: the prices of one point tried in the regret table (default: "
                             f"{' '.join(f'{p:g}' for p in GENERIC_PRICES)})")
    parser.add_argument("--learns-above", type=float, metavar="POINTS",
                        help="with --generic: a run with a baseline learns when its best beats it by this many points "
                             f"(default: {LEARNS_ABOVE_POINTS:g}); the others are scored apart")
    parser.add_argument("--write-generic", type=Path, help="write the converted data sets as generic JSONL here")
    parser.add_argument("--json", type=Path, help="write the summary as JSON to this file")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--quick", action="store_true", help="only the first 120 runs of each data set")
    parser.add_argument("--no-corpus", action="store_true",
                        help="leave out benchmarks/curves/digits.jsonl and lora_sst2.jsonl")
    parser.add_argument("--only", help="replay only the data sets whose name contains this")
    parser.add_argument("--every", type=int, default=1, metavar="K",
                        help="robustness: keep every K-th evaluation of each run (and its last), as if it had been "
                             "validated K times less often")
    parser.add_argument("--no-plan", action="store_true",
                        help="robustness: drop each run's planned cost and learning rates, as a record that has "
                             "only its points")
    parser.add_argument("--keep-lr", action="store_true",
                        help="with --no-plan: keep the learning rates (a fit with a scheduler and no planned end, "
                             "such as max_epochs=-1 with max_time)")
    parser.add_argument("--noise-points", type=float, default=0.0, metavar="SD",
                        help="robustness: add Gaussian noise of SD points to every evaluation (a smaller validation "
                             "set), one seeded draw per run")
    parser.add_argument("--mismatched", action="store_true",
                        help="robustness: DeBERTa's runs scored on MNLI's mismatched validation set (the prior, "
                             "the settings and the operating price were chosen on the matched one)")
    args = parser.parse_args(argv)
    if args.keep_lr and not args.no_plan:
        parser.error("--keep-lr goes with --no-plan (a run with its plan keeps its learning rates)")
    if not (args.noise_points >= 0 and math.isfinite(args.noise_points)):
        parser.error(f"--noise-points must be a standard deviation >= 0, got {args.noise_points}")
    if args.every < 1:
        parser.error(f"--every must be a positive number of evaluations, got {args.every}")
    if args.prices and any(p <= 0 or not math.isfinite(p) for p in args.prices):
        parser.error(f"--prices must be positive dollars per point, got {args.prices}")
    if args.generic and args.mismatched:
        parser.error("--mismatched applies to the shared DeBERTa runs, not to a --generic file")
    if not args.generic and (args.from_scratch or args.prices is not None or args.learns_above is not None):
        parser.error("--from-scratch, --prices and --learns-above apply to a --generic file only")
    learns_above = LEARNS_ABOVE_POINTS if args.learns_above is None else args.learns_above

    t0 = time.time()
    lines: list[str] = []
    policy_kwargs: dict = {}  # the policy's defaults, except the price swept/set per row
    usd_per_example = USD_PER_GPU_HOUR / 3600.0 / DEBERTA_EXAMPLES_PER_GPU_SECOND
    header = [
        "Replay of recorded learning curves through costaware.curves.MarginalGainPolicy (default settings,",
        "with the shipped curve prior; price per point varied). Points: metric x 100. A run with a plan and a",
        "learning rate at every point gets its recorded rates as the schedule ahead (what MarginalGainStopping",
        "reads off the Trainer's scheduler). Halves fixed by",
    ]
    if args.generic:
        target = ("EarlyStopping(patience=10)'s mean loss on tune (--from-scratch)" if args.from_scratch
                  else f"{TARGET_LOSS_POINTS} points lost (fine-tuning; --from-scratch for scratch/SSL runs)")
        header += [
            "crc32(id) % 2; the operating price comes from 'tune', 'test' is held out (the policy's settings and",
            "its shipped prior were chosen on this repository's data sets, never on this file).",
            f"{args.generic}: the operating price's loss target is {target};",
            f"runs with a baseline learn when their best beats it by {learns_above:g} points.",
        ]
    else:
        header += [
            "crc32(id) % 2; settings, the operating price and the shipped prior (tune halves of DeBERTa and the",
            "digits corpus) come from 'tune'; 'test' is held out. The loss/savings target is the issue's for",
            "fine-tuning (DeBERTa, LoRA-SST2); for NAS-Bench-NLP and the digits sets it is shown for reference.",
            "digits-*: benchmarks/curves/digits.jsonl (make_curves.py), FLOPs at a nominal $1e6/PFLOP.",
            "lora-sst2: benchmarks/curves/lora_sst2.jsonl (make_lora_curves.py), FLOPs at a nominal $1000/PFLOP;",
            "never used to tune anything (not in the prior): both its halves are held out but for its operating price.",
            "digits-late-step: benchmarks/curves/digits_late_step.jsonl (make_curves.py --late-step), "
            "scratch and SSL runs",
            "whose learning rate drops x0.1 at 80% of the plan only; never used to tune anything, as lora-sst2.",
            "digits-pairs: benchmarks/curves/digits_pairs.jsonl (make_curves.py --pairs), "
            "from scratch on 100 classes (two",
            "digits side by side; chance 1%), top-1 crawling near chance before it rises; "
            "FLOPs at a nominal $2.5e5/PFLOP",
            "(mean run $18, as the issue's image classifiers); never used to tune anything.",
            f"DeBERTa cost: examples seen / {DEBERTA_EXAMPLES_PER_GPU_SECOND:g} examples per GPU-second x "
            f"${USD_PER_GPU_HOUR:g}/GPU-hour (= ${usd_per_example * 1e6:.3f} per million examples); "
            f"NAS-Bench-NLP: wall time x ${USD_PER_GPU_HOUR:g}/GPU-hour.",
        ]
    if args.every > 1 or args.no_plan or args.noise_points > 0:
        header.append("Robustness run: every run " + " and ".join(
            ([f"keeps only every {args.every}-th evaluation (and its last)"] if args.every > 1 else [])
            + ([f"has no planned cost{'' if args.keep_lr else ' and no learning rates'}"] if args.no_plan else [])
            + ([f"has Gaussian noise of {args.noise_points:g} points added to every evaluation (one seeded draw "
                f"per run; a smaller validation set)"] if args.noise_points > 0 else []))
            + ".")
    if args.mismatched:
        header.append("Robustness run: DeBERTa's runs scored on MNLI's mismatched validation set (baseline: its "
                      "majority class, 3,463 of 9,832); the operating price is chosen again on its tune half.")
    header += [
        f"Run {time.strftime('%Y-%m-%d %H:%M %Z')} on {platform.node() or 'unknown host'} "
        f"({platform.platform()}, {os.cpu_count()} CPUs, {args.workers} worker(s)), Python "
        f"{platform.python_version()}, numpy {np.__version__}.",
        "",
    ]
    for line in header:
        print(line)
    lines += header

    # (name, records, regret prices, which runs learn, whether the runs train from scratch / pretrain)
    datasets: list[tuple[str, list[dict], tuple, callable, bool]] = []
    if args.generic:
        try:
            records = read_generic(args.generic)
        except (OSError, ValueError) as err:
            parser.exit(2, f"{parser.prog}: {args.generic}: {err}\n")
        percent_like = looks_like_percentages(records)
        if percent_like:
            lines.append(f"note: {percent_like} runs (mode max) have values above 1 and none above 100 but no "
                         "points_per_unit: if they are percentages, give each record \"points_per_unit\": 1 and "
                         "\"metric_range\": [0, 100] (read as they are, a point is a hundredth of a percentage "
                         "point, and no prior is asked: the metric looks unbounded).")
            print(lines[-1], flush=True)
        error_like = looks_like_error_rates(records)
        if error_like:
            lines.append(f"note: {error_like} runs (mode min) have every value in [0, 1] but no metric_range: if they "
                         "are error rates (1 - accuracy), give each record \"metric_range\": [0, 1] (read as they are, "
                         "the metric is a loss bounded by 0 below only, and no prior is asked).")
            print(lines[-1], flush=True)
        datasets.append((args.generic.stem, records, tuple(args.prices or GENERIC_PRICES),
                         lambda r: run_learns(r, learns_above), args.from_scratch))
    else:
        curves = args.data / "curves"
        validation = "mismatched" if args.mismatched else "matched"
        deb = deberta_records(curves / "deberta-mnli" / "deberta-base_tuning.results.jsonl", usd_per_example,
                              validation)
        nas = nasbench_records(curves / "nasbench-nlp-wikitext2" / "logs.zip", USD_PER_GPU_HOUR)
        deb_name = "deberta-mnli" if validation == "matched" else f"deberta-mnli-{validation}"
        datasets.append((deb_name, deb, REGRET_PRICES["deberta-mnli"],
                         lambda r: np.nanmax(r.metrics) > DEBERTA_LEARNS_ABOVE, False))
        datasets.append(("nasbench-nlp", nas, REGRET_PRICES["nasbench-nlp"], lambda r: r.has_finite, False))
        if CORPUS.is_file() and not args.no_corpus:
            with open(CORPUS) as f:
                corpus = [json.loads(line) for line in f if line.strip()]
            for kind in dict.fromkeys(r["kind"] for r in corpus):
                datasets.append((f"digits-{kind}", [r for r in corpus if r["kind"] == kind], REGRET_PRICES["digits"],
                                 run_learns, True))
        if LATE_STEP_CORPUS.is_file() and not args.no_corpus:
            with open(LATE_STEP_CORPUS) as f:
                late = [json.loads(line) for line in f if line.strip()]
            datasets.append(("digits-late-step", late, REGRET_PRICES["digits"], run_learns, True))
        if PAIRS_CORPUS.is_file() and not args.no_corpus:
            with open(PAIRS_CORPUS) as f:
                pairs = [json.loads(line) for line in f if line.strip()]
            datasets.append(("digits-pairs", pairs, REGRET_PRICES["digits"], run_learns, True))
        if LORA_CORPUS.is_file() and not args.no_corpus:
            with open(LORA_CORPUS) as f:
                lora = [json.loads(line) for line in f if line.strip()]
            datasets.append(("lora-sst2", lora, REGRET_PRICES["lora-sst2"], run_learns, False))
        if args.write_generic:
            args.write_generic.mkdir(parents=True, exist_ok=True)
            for name, recs, *_ in datasets:
                with open(args.write_generic / f"{name}.jsonl", "w") as f:
                    for rec in recs:
                        f.write(json.dumps(rec) + "\n")

    summary: dict = {"policy_kwargs": policy_kwargs, "usd_per_gpu_hour": USD_PER_GPU_HOUR,
                     "deberta_examples_per_gpu_second": DEBERTA_EXAMPLES_PER_GPU_SECOND,
                     "points_per_unit": POINTS_PER_UNIT, "datasets": {}}
    for name, records, prices, learns, from_scratch in datasets:
        if args.only and args.only not in name:
            continue
        runs = [run_from_generic(degraded(r, args.every, args.no_plan, args.keep_lr, args.noise_points))
                for r in records]
        if args.quick:
            runs = runs[:120]
        summary["datasets"][name] = evaluate_dataset(name, runs, policy_kwargs, prices, args.workers, learns, lines,
                                                     from_scratch=from_scratch)
    ms = decision_time_ms()
    say_line = f"decision time with 1,000 evaluations seen (median of 20, a run with a plan and LRs): {ms:.2f} ms"
    print(say_line)
    lines.append(say_line)
    summary["decision_ms_at_1000"] = ms
    elapsed = time.time() - t0
    print(f"total time {elapsed:.0f}s on {args.workers} worker(s)")
    lines.append(f"total time {elapsed:.0f}s on {args.workers} worker(s)")
    summary["elapsed_s"] = elapsed
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
