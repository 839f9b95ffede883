"""Cap precision: where BudgetCap's stop lands against a cap, over many simulated runs.

Each simulated run is a planned fine-tuning run (8 epochs of 250 batches, a 50-batch validation
and a checkpoint save after every epoch, a 2-batch sanity check first, 2 costly warm-up batches)
with a budget cap set at a random 10-95% of what the whole run would cost. Its costs are replayed
through ``costaware.forecast.BudgetPlanner`` -- the exact decision code the ``BudgetCap``
callback runs after every training batch -- fed the way the callback feeds it (batch costs,
validation and checkpoint costs, the sanity check's batches, Lightning's validation schedule).
A stop costs what it costs in Lightning: the validation that ``should_stop`` triggers, the
``ModelCheckpoint`` save after it, and BudgetCap's own ``budget_stop.ckpt``.

The sanity check's first batch also pays a start-up (2 batches' worth), which later validation
runs do not; BudgetCap's prior for a checkpoint save before one is measured is 1.5x its true cost.

Step costs (dollars; one second of the machines = $1, so time and money move together):

* ``steady``: every batch 1.0 +- 2% (noise), validation and saves constant;
* ``noisy``: sequence-length buckets, each batch 0.5x-2.25x at random (mean 1.0);
* ``spiky``: steady, plus 1% of batches stalled 3-10x (GC, I/O, a straggler), and validation
  runs +-15% apart;
* ``stress`` (not held to the targets, shown for what it costs): spiky, but 30% of validation
  runs 1-2.5x slower than usual -- a slowdown no history announces, so the reserve cannot hold it.

Modes compared:

* ``predictive``: BudgetCap's default (stop before the batch that would cross the cap);
* ``pred. + skips``: predictive as ``BudgetCap`` runs it, deciding only when the planner's
  ``safe_skips`` says a batch may not skip the decision (at most 7 skipped, none near a cap;
  validation or save costs measured reset it), skipped batches observed at the next checked one
  as their mean;
* ``reactive``: ``BudgetCap(predictive=False)`` (stop after the batch at which spend plus the
  stop's reserve reached the cap);
* ``mean-based``: an ablation -- predictive, but the next batch predicted by the mean batch cost
  instead of the largest recent one;
* ``EarlyStopping``: the baseline a user would try first, Lightning's
  ``EarlyStopping(monitor="cost/usd", mode="max", stopping_threshold=cap)``: it checks at
  validation ends only (here, epoch ends), against ``cost/usd`` as last logged (every 50 steps).

Figures: the share of runs that end over the cap, the overshoot in units of one mean batch cost
(worst, and mean over the runs that overshoot), and the share of the cap actually used (final
spend / cap). Targets: predictive never over the cap, with >= 95% of the cap used on steady runs
(on average: a cap that falls just past a scheduled validation leaves unused what one more batch
and another validation would cost, up to ~10% of the smallest caps here); reactive at most one
batch's cost over (that of the last batch run, the one that crossed). Forecast: BudgetCap's
forecast of the whole planned run's cost
at 10% of the run (before the first validation has run: its cost comes from the sanity check),
against the run's true cost; target <= 5% error on steady runs. For reference, a
carbontracker-style linear forecast (first epoch's cost x epochs), available only after the
first epoch (12.5% of the run).

Usage::

    python benchmarks/cap_precision.py [--runs 300] [--out benchmarks/results/cap_precision.txt]
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO / "src") not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(_REPO / "src"))

from costaware.forecast import MAX_SKIPPED_BATCHES, BudgetPlanner, StopPlan, validation_after, validations_between, zero  # noqa: E402

KINDS = ("steady", "noisy", "spiky", "stress")
TARGET_KINDS = ("steady", "noisy", "spiky")
MODES = ("predictive", "pred. + skips", "reactive", "mean-based", "EarlyStopping")

BATCHES_PER_EPOCH = 250
EPOCHS = 8
VALIDATION_BATCHES = 50
VALIDATION_BATCH_COST = 0.4  # a validation batch: forward only
CHECKPOINT_COST = 3.0
# BudgetCap's prior for a save before one is measured (weights + optimizer state at 100 MB/s) is
# meant to err high; here it is 1.5x the true cost.
CHECKPOINT_PRIOR = 1.5 * CHECKPOINT_COST
WARMUP_BATCHES = 2
WARMUP_FACTOR = 5.0
SANITY_BATCHES = 2
SANITY_STARTUP = 2.0  # the first sanity batch also starts the validation data loader
LOG_EVERY_N_STEPS = 50
SAVES_PER_VALIDATION = 1  # one ModelCheckpoint
FORECAST_AT = 0.10

TARGET_PREDICTIVE_OVER = 0.0
TARGET_STEADY_USED = 0.95
TARGET_REACTIVE_OVER_STEPS = 1.0
TARGET_FORECAST_ERROR = 0.05


@dataclass(frozen=True)
class RunSpec:
    """One simulated run: its cost model, random seed, and cap as a share of its planned cost."""

    kind: str
    seed: int
    cap_fraction: float
    batches_per_epoch: int = BATCHES_PER_EPOCH
    epochs: int = EPOCHS


@dataclass
class Costs:
    """What every part of the planned run costs, drawn once per run."""

    batches: np.ndarray  # per training batch
    validations: np.ndarray  # per validation run (as many as batches: a stop may validate anywhere)
    sanity: list
    checkpoint: float
    planned_usd: float  # the whole planned run, uncapped
    mean_batch: float


@dataclass
class Result:
    """Where one run ended."""

    kind: str
    mode: str
    cap_usd: float
    final_usd: float
    batches_run: int
    mean_batch: float
    last_batch: float
    forecast_error: Optional[float] = None  # |forecast - true| / true at FORECAST_AT of the run
    linear_error: Optional[float] = None  # carbontracker-style, after the first epoch

    @property
    def over_steps(self) -> float:
        return (self.final_usd - self.cap_usd) / self.mean_batch

    @property
    def over_last(self) -> float:
        """Overshoot in units of the cost of the last batch run (the one that crossed)."""
        return (self.final_usd - self.cap_usd) / self.last_batch

    @property
    def used(self) -> float:
        return self.final_usd / self.cap_usd


def _vector(usd: float) -> dict:
    """A cost in the planner's units: $1 per second of the machines."""
    return {**zero(), "usd": float(usd), "elapsed_s": float(usd)}


def make_costs(spec: RunSpec) -> Costs:
    rng = np.random.default_rng(spec.seed)
    n = spec.batches_per_epoch * spec.epochs
    if spec.kind == "steady":
        batches = 1.0 + rng.normal(0.0, 0.02, n)
    elif spec.kind == "noisy":
        buckets = np.array([0.5, 0.75, 1.0, 1.5, 2.25])
        batches = rng.choice(buckets, n, p=[0.3, 0.25, 0.2, 0.15, 0.1]) * (1.0 + rng.normal(0.0, 0.05, n))
        batches /= buckets @ np.array([0.3, 0.25, 0.2, 0.15, 0.1])
    elif spec.kind in ("spiky", "stress"):
        batches = 1.0 + rng.normal(0.0, 0.02, n)
        stalls = rng.random(n) < 0.01
        batches[stalls] *= rng.uniform(3.0, 10.0, stalls.sum())
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {spec.kind!r}")
    batches = np.clip(batches, 0.05, None)
    mean_batch = float(batches[WARMUP_BATCHES:].mean())
    batches[:WARMUP_BATCHES] *= WARMUP_FACTOR
    validation = VALIDATION_BATCHES * VALIDATION_BATCH_COST
    validations = validation * (1.0 + rng.normal(0.0, 0.02, n))
    if spec.kind in ("spiky", "stress"):
        validations = validation * rng.uniform(0.85, 1.15, n)
    if spec.kind == "stress":
        slow = rng.random(n) < 0.3
        validations[slow] *= rng.uniform(1.0, 2.5, slow.sum())
    sanity = [VALIDATION_BATCH_COST + SANITY_STARTUP] + [VALIDATION_BATCH_COST] * (SANITY_BATCHES - 1)
    planned = sum(sanity) + batches.sum()
    for epoch in range(spec.epochs):
        planned += validations[(epoch + 1) * spec.batches_per_epoch - 1] + CHECKPOINT_COST * SAVES_PER_VALIDATION
    return Costs(batches, validations, sanity, CHECKPOINT_COST, float(planned), mean_batch)


class _MeanBased(BudgetPlanner):
    """Ablation: the next batch predicted by the mean batch cost."""

    def next_batch(self) -> dict:
        return self.batches.mean() or self.warmup.max() or zero()


def simulate(spec: RunSpec, mode: str) -> Result:
    """Replay one run through the decision of ``mode`` and return where it stopped."""
    costs = make_costs(spec)
    cap = spec.cap_fraction * costs.planned_usd
    nb, n = spec.batches_per_epoch, len(costs.batches)
    planner_class = _MeanBased if mode == "mean-based" else BudgetPlanner
    planner = planner_class({"max_usd": cap}, predictive=mode != "reactive", warmup_batches=WARMUP_BATCHES)
    planner.validation_batches = VALIDATION_BATCHES
    planner.checkpoint_prior_s = CHECKPOINT_PRIOR
    planner.observe_sanity_check([_vector(c) for c in costs.sanity])
    spent = sum(costs.sanity)
    logged = spent  # cost/usd as last logged, what EarlyStopping sees
    saves_per_validation: Optional[int] = None
    stop_cost = 0.0
    skips = 0
    pending: list = []
    b = 0
    for b in range(1, n + 1):
        batch = costs.batches[b - 1]
        spent += batch
        pending.append(batch)
        if skips == 0 or mode != "pred. + skips":  # BudgetCap observes skipped batches with the next checked one
            mean = sum(pending) / len(pending)
            for _ in pending:
                planner.observe_batch(_vector(mean))
            pending = []
        if b % LOG_EVERY_N_STEPS == 0:
            logged = spent
        validation_now = validation_after(b, nb, nb, 1)
        if b == n:  # the planned end: its scheduled validation, no stop
            if validation_now:
                spent += costs.validations[b - 1] + costs.checkpoint * SAVES_PER_VALIDATION
            break
        if mode != "EarlyStopping":
            per_validation = SAVES_PER_VALIDATION if saves_per_validation is None else saves_per_validation
            plan = StopPlan(validation_now=validation_now, validation_on_stop=True,
                            saves_per_validation=per_validation, saves_on_stop=1 + per_validation)
            if skips > 0:
                skips -= 1
            elif planner.decide(_vector(spent), plan) is not None:
                # Lightning validates on should_stop (the scheduled one, if due), ModelCheckpoint
                # saves after it, and BudgetCap writes budget_stop.ckpt.
                stop_cost = costs.validations[b - 1] + costs.checkpoint * (SAVES_PER_VALIDATION + 1)
                spent += stop_cost
                break
            elif mode == "pred. + skips":
                skips = planner.safe_skips(_vector(spent), plan, MAX_SKIPPED_BATCHES)
        if validation_now:
            validation = costs.validations[b - 1]
            spent += validation + costs.checkpoint * SAVES_PER_VALIDATION
            planner.observe_validation(_vector(validation))
            planner.observe_checkpoint(_vector(costs.checkpoint))
            saves_per_validation = SAVES_PER_VALIDATION
            skips = 0  # BudgetCap decides again once a validation and a save are measured
            if mode == "EarlyStopping" and logged > cap:
                break  # stopping_threshold reached at this validation end; the run ends here
    return Result(spec.kind, mode, cap, spent, b, costs.mean_batch, float(costs.batches[b - 1]))


def forecast_errors(spec: RunSpec) -> tuple:
    """``(BudgetCap's forecast error at FORECAST_AT of the run, a linear one after the first
    epoch)``, both relative to the whole planned run's true cost (no cap: the run goes on)."""
    costs = make_costs(spec)
    nb, n = spec.batches_per_epoch, len(costs.batches)
    planner = BudgetPlanner({"max_usd": math.inf}, warmup_batches=WARMUP_BATCHES)
    planner.validation_batches = VALIDATION_BATCHES
    planner.checkpoint_prior_s = CHECKPOINT_PRIOR
    planner.observe_sanity_check([_vector(c) for c in costs.sanity])
    spent = sum(costs.sanity)
    ours = linear = None
    for b in range(1, nb + 1):
        spent += costs.batches[b - 1]
        planner.observe_batch(_vector(costs.batches[b - 1]))
        if b == round(FORECAST_AT * n):
            remaining_validations = validations_between(b, n, nb, nb, 1)
            forecast = planner.forecast(_vector(spent), n - b, remaining_validations,
                                        remaining_validations * SAVES_PER_VALIDATION)
            ours = abs(forecast["usd"] - costs.planned_usd) / costs.planned_usd
    spent += costs.validations[nb - 1] + costs.checkpoint * SAVES_PER_VALIDATION
    linear = abs(spent * spec.epochs - costs.planned_usd) / costs.planned_usd
    return ours, linear


def run_all(runs: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    results = []
    for kind in KINDS:
        for _ in range(runs):
            spec = RunSpec(kind=kind, seed=int(rng.integers(2**31)), cap_fraction=float(rng.uniform(0.10, 0.95)))
            for mode in MODES:
                results.append(simulate(spec, mode))
            results[-len(MODES)].forecast_error, results[-len(MODES)].linear_error = forecast_errors(spec)
    return results


def _summary(results: list) -> dict:
    over = np.array([r.over_steps for r in results])
    over_last = np.array([r.over_last for r in results])
    used = np.array([r.used for r in results])
    overs = over[over > 1e-9]
    return {
        "runs": len(results),
        "over_pct": 100.0 * len(overs) / len(results),
        "max_over_steps": float(over.max()),
        "max_over_last": float(over_last.max()),
        "mean_over_steps": float(overs.mean()) if len(overs) else 0.0,
        "used_mean": float(used.mean()),
        "used_p5": float(np.percentile(used, 5)),
        "used_min": float(used.min()),
    }


def report(results: list, runs: int, elapsed_s: float) -> str:
    lines = [
        "BudgetCap cap precision (benchmarks/cap_precision.py)",
        f"{runs} simulated runs per cost model, each replayed in every mode; {EPOCHS} epochs x {BATCHES_PER_EPOCH} "
        f"batches, validation ({VALIDATION_BATCHES} batches) + checkpoint after every epoch; cap at 10-95% of the "
        "planned run's cost.",
        "Overshoot in units of one mean batch cost (and in units of the last batch run, the one that crossed); "
        "'mean over' over the runs that overshoot; 'used' = final spend / cap.",
        "",
        f"{'cost model':<10} {'mode':<14} {'runs over cap':>13} {'worst over':>11} {'(in last batch)':>15} "
        f"{'mean over':>10} {'cap used (mean)':>16} {'(5th pct)':>10} {'(min)':>7}",
    ]
    table: dict = {}
    for kind in KINDS:
        for mode in MODES:
            s = _summary([r for r in results if r.kind == kind and r.mode == mode])
            table[kind, mode] = s
            lines.append(f"{kind:<10} {mode:<14} {s['over_pct']:>12.1f}% {s['max_over_steps']:>+11.2f} "
                         f"{s['max_over_last']:>+15.2f} {s['mean_over_steps']:>10.2f} {100 * s['used_mean']:>15.1f}% "
                         f"{100 * s['used_p5']:>9.1f}% {100 * s['used_min']:>6.1f}%")
        lines.append("")
    lines.append(f"Forecast of the whole planned run's cost (BudgetCap at {FORECAST_AT:.0%} of the run; "
                 "carbontracker-style")
    lines.append("first epoch x epochs, at 12.5%):")
    lines.append(f"{'cost model':<10} {'BudgetCap mean err':>19} {'max err':>8} {'linear mean err':>16} {'max err':>8}")
    forecast: dict = {}
    for kind in KINDS:
        rs = [r for r in results if r.kind == kind and r.mode == "predictive"]
        ours = np.array([r.forecast_error for r in rs])
        linear = np.array([r.linear_error for r in rs if r.linear_error is not None])
        forecast[kind] = ours
        lines.append(f"{kind:<10} {100 * ours.mean():>18.2f}% {100 * ours.max():>7.2f}% "
                     f"{100 * linear.mean():>15.2f}% {100 * linear.max():>7.2f}%")
    lines.append("")
    checks = [
        ("predictive: never over the cap (steady, noisy, spiky)",
         all(table[k, "predictive"]["over_pct"] == 0.0 for k in TARGET_KINDS),
         ", ".join(f"{k} {table[k, 'predictive']['over_pct']:.1f}% of runs over" for k in TARGET_KINDS)),
        ("predictive with BudgetCap's skipped decisions: never over the cap (steady, noisy, spiky)",
         all(table[k, "pred. + skips"]["over_pct"] == 0.0 for k in TARGET_KINDS),
         ", ".join(f"{k} {table[k, 'pred. + skips']['over_pct']:.1f}% of runs over" for k in TARGET_KINDS)),
        (f"predictive: >= {TARGET_STEADY_USED:.0%} of the cap used on steady runs (mean over runs)",
         table["steady", "predictive"]["used_mean"] >= TARGET_STEADY_USED,
         f"mean {100 * table['steady', 'predictive']['used_mean']:.1f}%, "
         f"5th percentile {100 * table['steady', 'predictive']['used_p5']:.1f}%, "
         f"worst {100 * table['steady', 'predictive']['used_min']:.1f}% (a cap just past a scheduled "
         "validation cannot buy one more step and another validation)"),
        (f"reactive: at most {TARGET_REACTIVE_OVER_STEPS:g} step's cost over, that of the last step "
         "(steady, noisy, spiky)",
         all(table[k, "reactive"]["max_over_last"] <= TARGET_REACTIVE_OVER_STEPS for k in TARGET_KINDS),
         ", ".join(f"{k} worst {table[k, 'reactive']['max_over_last']:+.2f}" for k in TARGET_KINDS)),
        (f"forecast error at {FORECAST_AT:.0%} <= {TARGET_FORECAST_ERROR:.0%} on steady runs (every run)",
         forecast["steady"].max() <= TARGET_FORECAST_ERROR,
         f"max {100 * forecast['steady'].max():.2f}%"),
    ]
    lines.append("Targets:")
    for name, ok, detail in checks:
        lines.append(f"  [{'met' if ok else 'MISSED'}] {name}: {detail}")
    lines.append("")
    lines.append(f"numpy {np.__version__}, Python {platform.python_version()}, {elapsed_s:.1f} s")
    return "\n".join(lines)


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=300, help="simulated runs per cost model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    results = run_all(args.runs, args.seed)
    text = report(results, args.runs, time.perf_counter() - start)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
