"""``BudgetCap``: never spend more than a budget, in dollars, energy, carbon, GPU-hours, FLOPs or time."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
from lightning_utilities.core.rank_zero import rank_zero_info, rank_zero_warn

from costaware import _lightning_internals as internals
from costaware._lightning import CALLBACK_BASES
from costaware.callbacks.metering import check_priced, find_meter, make_own_meter, meter_stage_from_checkpoint
from costaware.forecast import (
    CAP_UNITS,
    MAX_SKIPPED_BATCHES,
    UNITS,
    Breach,
    BudgetPlanner,
    StopPlan,
    add,
    check_caps,
    cost_of,
    describe,
    scale,
    subtract,
    validation_after,
    validations_between,
    zero,
)
from costaware.meter import CostMeter, log_at_lightning_step
from costaware.records import BudgetCapHitEvent, BudgetCapsEvent, BudgetWarningEvent, ForecastEvent, RecordedTotals
from costaware.validation import check_count, check_flag, check_path

if TYPE_CHECKING:
    import pytorch_lightning as pl

ON_CAP = ("stop", "raise")
STOP_CHECKPOINT = "budget_stop.ckpt"

# Before a checkpoint save is measured: weights plus two optimizer moments, written at 100 MB/s.
_PRIOR_CHECKPOINT_STATE_FACTOR = 3.0
_PRIOR_CHECKPOINT_BYTES_PER_S = 100e6
# A forecast is recorded in the ledger again when it moved by more than this fraction.
_FORECAST_RECORD_CHANGE = 0.05
#: At most one forecast every this many batches (at a logging step), however often the Trainer logs.
_FORECAST_EVERY_BATCHES = 10


class BudgetExceededError(RuntimeError):
    """A cap was reached with ``on_cap="raise"``; the stop checkpoint and the ledger event are written.

    Attributes:
        cap: the argument whose cap was hit (``"max_usd"``).
        limit: the cap, in its unit (``max_time`` in seconds).
        value: what the run had spent, in that unit, when it stopped.
        step: the Trainer's ``global_step`` at the stop.
        checkpoint: the stop checkpoint's path.
    """

    def __init__(self, message: str, cap: str, limit: float, value: float, step: int, checkpoint: Optional[str]):
        super().__init__(message)
        self.cap, self.limit, self.value, self.step, self.checkpoint = cap, limit, value, step, checkpoint


class BudgetWarning(UserWarning):
    """A budget milestone: 50/80/95% of a cap spent, or a forecast over a cap."""


class BudgetCap(*CALLBACK_BASES):  # type: ignore[misc]  # a Callback of each installed Lightning namespace
    r"""Stop training before any cap is crossed: dollars, kWh, kg CO2, GPU-hours, FLOPs or time.

    Checked after every training batch from the cost monitor's cached totals (no collective, no
    device sync), and *predictive*: from the measured batch costs it stops before the batch that
    would cross a cap, keeping inside the budget the validation run and checkpoint that a stop
    entails (Lightning validates when a run is stopped). The next batch is predicted with the
    largest recent batch cost, warm-up batches excluded, so variable costs (sequence-length
    buckets, slow steps) leave a little of the budget unused rather than overshoot. Lightning's
    ``EarlyStopping(monitor="cost/usd", stopping_threshold=...)`` checks only at validation or
    epoch ends and overshoots by up to an epoch.

    On a stop, ``budget_stop.ckpt`` is written next to ``ModelCheckpoint``'s files (default
    ``<log_dir>/checkpoints/``), so nothing trained is lost, and the ledger records a
    ``budget_cap_hit`` event: the cap, its limit, the spend, the prediction, the step and the
    totals. A cap wins over ``min_epochs``/``min_steps``: Lightning ignores ``should_stop`` until
    they are met, so on a stop BudgetCap clears them (restored at teardown). Under DDP the ranks
    agree through ``trainer.strategy.reduce_boolean_decision`` and stop on the same step; caps
    apply to the run's total over all ranks, nodes and restarts. To keep the hot path free of
    collectives, the ranks agree every batch only near a cap: each agreement also shares the
    smallest headroom (in batches) of any rank, and the next one comes after half of it (at most
    ``log_every_n_steps`` later).

    Forecast: after a few post-warm-up batches, what the planned run (``max_steps``/
    ``max_epochs``) will cost, validations and checkpoints included, is logged as
    ``cost/forecast_usd``, ``cost/forecast_kwh``, ``cost/forecast_co2_kg``,
    ``cost/forecast_gpu_hours``, ``cost/forecast_flops``, ``cost/forecast_elapsed_s`` at the
    Trainer's log interval; a forecast over a cap, and 50/80/95% of a cap spent, are warned once
    (:class:`BudgetWarning`, rank zero).

    Ledger events: ``budget_caps`` (the caps, at fit start), ``forecast`` (``forecast_usd``,
    every unit, ``basis``; the first, then after a validation or epoch when it moved by > 5%),
    ``budget_warning`` (cap, fraction), ``budget_cap_hit`` (cap, unit, limit, value,
    predicted_next, next_batch, reserve, step, epoch, checkpoint, totals).

    One BudgetCap per Trainer takes any number of caps. It reads the ``CostMonitor``'s meter
    when the Trainer has one (its price arguments below are then ignored, with a warning, and a
    price that differs from the monitor's is a ValueError at setup);
    without one it meters the run itself (:attr:`own_meter`, built from the price arguments and
    ``monitor_kwargs``), logging ``cost/*`` and writing the ledger and report as CostMonitor does.
    A ``max_usd`` with no price at all (no GPU price, ``usd_per_host_hour`` 0, no energy price)
    is an error at fit start, before any compute: the cap could never fire.

    Args:
        max_usd: dollars.
        max_kwh: energy, kWh (GPU + CPU + RAM, before PUE).
        max_co2_kg: kilograms of CO2-eq.
        max_gpu_hours: GPU-hours held.
        max_flops: training floating-point operations.
        max_time: wall time: a ``timedelta``, seconds, ``"DD:HH:MM:SS"`` (as Lightning's
            ``Timer``) or a dict of ``timedelta`` arguments (``{"hours": 12}``).
        caps: the same caps as a dict, keyed by argument or unit name
            (``{"usd": 5, "time": "00:12:00:00"}``).
        on_cap: ``"stop"`` (a clean stop, with the usual final validation) or ``"raise"`` (write
            the checkpoint and the ledger event, then raise :class:`BudgetExceededError`, for
            pipelines that must fail loudly).
        predictive: stop before the batch that would cross a cap. If False, stop after the batch
            at which spend plus the stop's reserve reached a cap: at most one batch over.
        warmup_steps: batches at the start of each fit or resume left out of the batch-cost
            statistics (compilation, caches, data-loader start-up).
        ckpt_path: where to write the stop checkpoint; default ``budget_stop.ckpt`` in
            ``ModelCheckpoint``'s folder, else ``<log_dir>/checkpoints/``.
        gpu, usd_per_gpu_hour, usd_per_host_hour, usd_per_kwh, pue, mode, country, region,
            cloud_provider, cloud_region, g_co2_per_kwh: prices for the ``CostMonitor`` that
            BudgetCap creates when the Trainer has none (see ``CostMonitor``).
        monitor_kwargs: any other ``CostMonitor`` arguments for it (``{"cpu_tdp_w": 65}``).

    Raises:
        ValueError: at construction, for no cap, a cap <= 0 or not a number, a ``max_time`` that
            does not parse, an unknown ``caps`` key, ``on_cap``, or bad monitor arguments; at fit
            start, for ``max_usd`` with nothing priced.

    Example::

        from pytorch_lightning import Trainer
        from costaware import BudgetCap, CostMonitor

        # Alone: it measures with its own CostMonitor.
        trainer = Trainer(callbacks=[BudgetCap(max_usd=5, gpu="A10G", country="USA")])
        # With a monitor, several caps; whichever comes first stops the run.
        trainer = Trainer(callbacks=[CostMonitor(gpu="H100", usd_per_gpu_hour=2.5),
                                     BudgetCap(max_usd=40, max_kwh=20, max_time="00:12:00:00")])
        # LightningCLI:
        #   --trainer.callbacks+=costaware.BudgetCap --trainer.callbacks.max_usd=5
    """

    def __init__(
        self,
        max_usd: Optional[float] = None,
        max_kwh: Optional[float] = None,
        max_co2_kg: Optional[float] = None,
        max_gpu_hours: Optional[float] = None,
        max_flops: Optional[float] = None,
        max_time: Optional[Union[float, str, timedelta, dict]] = None,
        caps: Optional[dict] = None,
        on_cap: str = "stop",
        predictive: bool = True,
        warmup_steps: int = 2,
        ckpt_path: Optional[str] = None,
        gpu: Optional[str] = None,
        usd_per_gpu_hour: Optional[float] = None,
        usd_per_host_hour: Optional[float] = None,
        usd_per_kwh: Optional[float] = None,
        pue: Optional[float] = None,
        mode: Optional[str] = None,
        country: Optional[str] = None,
        region: Optional[str] = None,
        cloud_provider: Optional[str] = None,
        cloud_region: Optional[str] = None,
        g_co2_per_kwh: Optional[float] = None,
        monitor_kwargs: Optional[dict] = None,
    ) -> None:
        explicit = {"max_usd": max_usd, "max_kwh": max_kwh, "max_co2_kg": max_co2_kg, "max_gpu_hours": max_gpu_hours,
                    "max_flops": max_flops, "max_time": max_time}
        self.limits = check_caps(explicit, caps)
        if on_cap not in ON_CAP:
            raise ValueError(f"on_cap must be one of {ON_CAP}, got {on_cap!r}")
        check_flag("predictive", predictive)
        check_count("warmup_steps", warmup_steps)
        check_path("ckpt_path", ckpt_path)
        self.on_cap = on_cap
        self.predictive = predictive
        self.warmup_steps = warmup_steps
        self.ckpt_path = ckpt_path
        given = {"gpu": gpu, "usd_per_gpu_hour": usd_per_gpu_hour, "usd_per_host_hour": usd_per_host_hour,
                 "usd_per_kwh": usd_per_kwh, "pue": pue, "mode": mode, "country": country, "region": region,
                 "cloud_provider": cloud_provider, "cloud_region": cloud_region, "g_co2_per_kwh": g_co2_per_kwh}
        self.own_meter = make_own_meter({k: v for k, v in given.items() if v is not None}, monitor_kwargs)
        self.planner = BudgetPlanner(self.limits, predictive=predictive, warmup_batches=warmup_steps)
        self.meter: Optional[CostMeter] = None  # the run's meter, from setup on
        self.stopped: Optional[Breach] = None  # the cap that stopped this session's run
        self._drives = False  # the run's meter is own_meter: this callback starts it, logs and reports
        self._fitting = True  # whether a checkpoint Lightning restores now is a fit's (see load_state_dict)
        self._saved_minimums: Optional[tuple] = None
        self._previous_stop: Optional[dict] = None
        self._saves_per_validation: Optional[int] = None
        self._begun = False  # the caps recorded in this fit's ledger (see _begin)
        self._reset_session()

    def _reset_session(self) -> None:
        self._mark: Optional[dict] = None  # totals at the end of the previous batch
        self._excluded = zero()  # validation and checkpoint costs since then
        self._validation_start: Optional[dict] = None
        self._checkpoint_start: Optional[dict] = None
        self._saves_after_validation: Optional[int] = None
        self._saving_stop_checkpoint = False
        self._since_sync = 0
        self._sync_every = 1
        self._skip_checks = 0  # batches that may skip the planner's decision (far from every cap)
        self._skipped = 0  # batches skipped since the last checked one (their cost is observed with it)
        self._since_forecast = 0
        self._planned_batches: Optional[float] = None
        self._replan = False  # re-read the planned batches at the epoch's first batch
        self._forecast_checked = False
        self._recorded_forecast: Optional[dict] = None
        self._record_forecast = False  # set after a validation or an epoch: record it if it moved
        self.forecast: Optional[dict] = None

    # ----------------------------------------------------------------------------------------
    # Lightning hooks
    # ----------------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._fitting = stage == "fit"
        if stage != "fit":
            if self._drives:  # a test, validate or predict after the fit this callback metered
                self.own_meter.begin_stage(trainer, stage)
            return
        self.meter = find_meter(trainer, self, category=BudgetWarning)
        self._drives = self.meter is self.own_meter
        if self._drives:
            self.meter.start(trainer)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.meter is not None and self.meter.ledger is not None, "setup() found and started the run's meter"
        if "max_usd" in self.limits:
            check_priced(self.meter, "BudgetCap", "max_usd")
        self.stopped = None
        self._saved_minimums = internals.read_minimums(trainer)
        self._begun = False
        if not internals.restores_after_fit_start(trainer):
            self._begin(trainer)

    def on_sanity_check_start(self, trainer: Any, pl_module: Any) -> None:
        self._begin(trainer)

    def _begin(self, trainer: Any) -> None:
        """Record the caps, with what a resumed run's checkpoint says: in ``on_fit_start``, or at the first hook
        after a strategy that restores late (FSDP, DeepSpeed) has restored."""
        if self._begun:
            return
        self._begun = True
        assert self.meter is not None and self.meter.ledger is not None, "setup() found and started the run's meter"
        self.meter.open_ledger(trainer)  # (once per fit, whoever asks first)
        self.meter.ledger.record(BudgetCapsEvent(caps=dict(self.limits), on_cap=self.on_cap,
                                                 predictive=self.predictive, previous_stop=self._previous_stop))

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._begin(trainer)
        if self._drives:
            self.own_meter.phase_start("training")
        self._reset_session()
        self.planner.start_session()
        self.planner.checkpoint_prior_s = _checkpoint_prior_s(pl_module)
        self.planner.validation_batches = _validation_batches(trainer) or self.planner.validation_batches
        self._planned_batches = _planned_batches(trainer)
        self._schedule = _Schedule.read(trainer)
        spent = self._now()
        self._mark = spent
        # A resumed run may already be at a cap, or one batch from it (its batch costs are
        # restored): stop before the first batch.
        plan = self._stop_plan(trainer, batch_idx=None)
        breach = self.planner.decide(spent, plan)
        if trainer.strategy.reduce_boolean_decision(breach is not None, all=False):
            self._stop(trainer, pl_module, breach or self.planner.closest(spent, plan),
                       decided_here=breach is not None)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._drives:
            self.own_meter.begin_batch(pl_module)
        self._close_checkpoint()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        assert self.meter is not None, "setup() found the run's meter"
        self.meter.count_batch(trainer, pl_module)  # metering first: the checks read this batch's cost
        log_now = internals.should_log(trainer)  # as CostMonitor and Lightning's monitors do
        if self._drives and log_now:
            self.own_meter.log(trainer, pl_module, on_step=True)
        self._since_forecast += 1
        forecast_due = log_now and self._since_forecast >= _FORECAST_EVERY_BATCHES
        if self._skip_checks > 0 and not forecast_due and self._checkpoint_start is None:
            # Far from every cap, even at the worst (planner.safe_skips): this batch's cost is
            # observed with the next checked batch's (their mean, once per batch).
            self._skip_checks -= 1
            self._skipped += 1
            return
        self._close_checkpoint()
        if self.stopped is not None or self._mark is None:
            return
        spent = self._now()
        batches, self._skipped = self._skipped + 1, 0
        cost = scale(subtract(subtract(spent, self._mark, floor=None), self._excluded), 1.0 / batches)
        for _ in range(batches):
            self.planner.observe_batch(cost)
        self._mark, self._excluded = spent, zero()
        self._warn_milestones(trainer, spent)
        if self._replan:
            self._replan = False
            # Batches run before this epoch, counted here (on a mid-epoch resume, too).
            self._planned_batches = _planned_batches(trainer, trainer.fit_loop.total_batch_idx - batch_idx)
        first = not self._forecast_checked and self._planned_batches is not None  # until the first forecast
        if first or forecast_due:
            self._since_forecast = 0
            self._update_forecast(trainer, pl_module, spent, self._stop_plan(trainer, batch_idx), log=log_now)
        plan = self._stop_plan(trainer, batch_idx)
        if _last_batch_of_run(trainer):
            return  # the run ends here anyway: no further batch to decide on (same on every rank)
        breach = self.planner.decide(spent, plan)
        stop = self._agree(trainer, pl_module, breach is not None, spent, plan)
        if stop:
            self._stop(trainer, pl_module, breach or self.planner.closest(spent, plan),
                       decided_here=breach is not None)
        elif trainer.world_size <= 1 and trainer.accumulate_grad_batches <= 1:
            # (With gradient accumulation one batch in k is dearer: a skipped span's mean would
            # hide it from the planner's high-side estimate. Decide on every batch then.)
            self._skip_checks = self.planner.safe_skips(spent, plan, MAX_SKIPPED_BATCHES)

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._close_checkpoint()
        self._skip_checks = 0
        if self._mark is not None:
            self._schedule = _Schedule.read(trainer)  # data loaders may have been reloaded
            self._replan = True  # ... and the planned run with them

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self._drives:
            self.own_meter.end_epoch()
            self.own_meter.log(trainer, pl_module, on_step=False)
        self._record_forecast = True

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        meter_stage_from_checkpoint(self, trainer, "validate")  # trainer.validate(ckpt_path=...) in a new process
        if self._drives:
            self.own_meter.phase_start("validation")
        if self.meter is None or (self._mark is None and not trainer.sanity_checking):
            return
        self._close_checkpoint()
        self._validation_start = self._now()
        self._sanity_costs: list = []
        self._sanity_mark = self._validation_start

    def on_validation_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        if trainer.sanity_checking and self._validation_start is not None:
            now = self._now()  # the sanity check's batches, one by one: the first pays for start-up
            self._sanity_costs.append(subtract(now, self._sanity_mark))
            self._sanity_mark = now

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if self._drives:
            self.own_meter.record_validation(trainer, pl_module)
            self.own_meter.phase_end("validation")
        if self._validation_start is None:
            return
        cost = subtract(self._now(), self._validation_start)
        self._validation_start = None
        if trainer.sanity_checking:
            self.planner.observe_sanity_check(self._sanity_costs)
            return
        self.planner.observe_validation(cost)
        self._skip_checks = 0  # a validation measured: decide again with its cost
        self._excluded = add(self._excluded, cost)
        self.planner.validation_batches = _validation_batches(trainer) or self.planner.validation_batches
        self._saves_after_validation = 0  # count the checkpoint saves this validation triggers
        self._record_forecast = True

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict) -> None:
        if self._drives:
            self.own_meter.phase_start("checkpointing")
        if self._saving_stop_checkpoint or self.meter is None or self._mark is None:
            return
        self._close_checkpoint_timing()  # (not the count: this save is one of those that follow a validation)
        self._checkpoint_start = self._now()
        if self._saves_after_validation is not None:
            self._saves_after_validation += 1

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self._drives:
            self.own_meter.phase_end("training")
        self._close_checkpoint()
        self._mark = None

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._begin(trainer)  # (a resume that had nothing left to train started no training)
        if self._drives:
            self.own_meter.end_fit(trainer, pl_module)

    def on_test_start(self, trainer: Any, pl_module: Any) -> None:
        meter_stage_from_checkpoint(self, trainer, "test")  # LightningCLI's `test --ckpt_path` after its `fit`

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        meter_stage_from_checkpoint(self, trainer, "predict")

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._restore_minimums(trainer)
        if self._drives:
            self.own_meter.fail(trainer, exception)
        else:
            self.own_meter.end_stage(trainer)  # a test from a checkpoint this callback metered (no fit here)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            self.own_meter.end_stage(trainer)  # (nothing if this callback metered no stage)
            return
        self._checkpoint_start = None
        self._restore_minimums(trainer)
        if self._drives:
            self.own_meter.teardown(trainer)

    def state_dict(self) -> dict:
        state = {
            "planner": self.planner.state_dict(),
            "saves_per_validation": self._saves_per_validation,
            "stopped": self.stopped.to_dict() if self.stopped is not None else None,
        }
        if self._drives:
            state["meter"] = self.own_meter.state_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Continue the measured costs and the warnings already given; spend itself is restored
        by the run's meter (this callback's own, when it meters alone), so a resumed run counts
        what was already spent. Not for a test or validate from a checkpoint (Lightning restores callbacks
        then too): a fit after it is a new run."""
        if not self._fitting:
            return
        self.planner.load_state_dict(state_dict.get("planner", {}))
        self._saves_per_validation = state_dict.get("saves_per_validation")
        self._previous_stop = state_dict.get("stopped")
        if self._drives and "meter" in state_dict:
            self.own_meter.load_state_dict(state_dict["meter"])

    # ----------------------------------------------------------------------------------------
    # Measuring
    # ----------------------------------------------------------------------------------------

    def _now(self) -> dict:
        assert self.meter is not None, "setup() found the run's meter"
        return cost_of(self.meter.current_totals())

    def _close_checkpoint(self) -> None:
        """End the timing of a checkpoint save at the next hook after it (the save itself runs
        after ``on_save_checkpoint``); end the count of saves that follow a validation."""
        self._close_checkpoint_timing()
        if self._saves_after_validation is not None and self._validation_start is None:
            self._saves_per_validation = max(self._saves_per_validation or 0, self._saves_after_validation)
            self._saves_after_validation = None

    def _close_checkpoint_timing(self) -> None:
        """End the timing of a checkpoint save, if one is being timed."""
        if self._checkpoint_start is not None:
            cost = subtract(self._now(), self._checkpoint_start)
            self._checkpoint_start = None
            self.planner.observe_checkpoint(cost)
            self._skip_checks = 0  # a save measured: decide again with its cost
            self._excluded = add(self._excluded, cost)

    def _stop_plan(self, trainer: Any, batch_idx: Optional[int]) -> StopPlan:
        """What a stop after this batch entails, from Lightning's validation schedule."""
        schedule = self._schedule
        validation_epoch = schedule.validation_epoch(trainer.current_epoch)
        validation_now = False
        if validation_epoch and batch_idx is not None:
            k, vcb, nb = schedule.check_val_every_n_epoch, schedule.val_check_batch, schedule.batches_per_epoch
            if schedule.time_based:
                validation_now = True  # time-based: it may come after any batch
            elif vcb is None or not math.isfinite(vcb):
                validation_now = bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)
            else:
                n = trainer.fit_loop.total_batch_idx + 1 if k is None else trainer.current_epoch * nb + batch_idx + 1
                validation_now = validation_after(n, nb, vcb, k)
        per_validation = self._saves_per_validation
        if per_validation is None:
            per_validation = schedule.default_saves
        step = trainer.global_step
        return StopPlan(validation_now=validation_now, validation_on_stop=validation_epoch and self.on_cap == "stop",
                        saves_per_validation=per_validation,
                        saves_on_stop=1 + (per_validation if self.on_cap == "stop" else 0),
                        saves_now=schedule.step_saves(step) if batch_idx is not None else 0,
                        saves_next=schedule.step_saves(step + 1))

    # ----------------------------------------------------------------------------------------
    # Deciding
    # ----------------------------------------------------------------------------------------

    def _agree(self, trainer: Any, pl_module: Any, local: bool, spent: dict, plan: StopPlan) -> bool:
        """The ranks' joint decision: any rank that would cross a cap stops them all.

        One process: this rank's decision, every batch. Under DDP the ranks must call the
        collective on the same batches, so they do it on a schedule they agree on: at each
        agreement they also take the smallest headroom (in batches) of any rank and meet again
        after half of it (at most every ``log_every_n_steps``, every batch near a cap). The
        headroom spreads a validation's cost over the batches between validations, so they also
        agree after every batch that a validation or checkpoint saves follow, or precede the next
        batch's saves (the schedule is the same on every rank): the last chance to stop before them.
        """
        if trainer.world_size <= 1:
            return trainer.strategy.reduce_boolean_decision(local, all=False)
        self._since_sync += 1
        due = ((plan.validation_now and not self._schedule.time_based)  # time-based: could be any batch
               or plan.saves_now > 0 or plan.saves_next > 0)
        if self._since_sync < self._sync_every and not due:
            return False
        self._since_sync = 0
        decision = trainer.strategy.reduce_boolean_decision(local, all=False)
        room = self.planner.headroom_batches(spent, plan, self._schedule.batches_per_validation(),
                                             self._schedule.step_saves_per_batch(trainer.accumulate_grad_batches))
        mine = torch.tensor(min(room, 1e12), dtype=torch.float64, device=pl_module.device)
        room = float(trainer.strategy.reduce(mine, reduce_op="min"))
        self._sync_every = int(max(1, min(room // 2, max(trainer.log_every_n_steps, 1))))
        return bool(decision)

    def _stop(self, trainer: Any, pl_module: Any, breach: Breach, decided_here: bool) -> None:
        self.stopped = breach
        trainer.should_stop = True
        self._override_minimums(trainer)
        path = self._stop_checkpoint_path(trainer)
        assert self.meter is not None and self.meter.ledger is not None, "setup() found and started the run's meter"
        totals = self.meter.current_totals()
        self.meter.ledger.record(BudgetCapHitEvent(
            cap=breach.cap, unit=breach.unit, limit=breach.limit, value=breach.value,
            predicted_next=breach.predicted, next_batch=breach.next_batch, reserve=breach.reserve,
            predictive=breach.predictive, step=trainer.global_step, epoch=trainer.current_epoch,
            on_cap=self.on_cap, decided_by="this rank" if decided_here else "another rank",
            checkpoint=str(path), totals=RecordedTotals.of(totals)))
        self._save_stop_checkpoint(trainer, path)
        message = (f"costaware: BudgetCap stopped the run at step {trainer.global_step}: {breach.cap}="
                   f"{describe(breach.cap, breach.limit)}, spent {describe(breach.cap, breach.value)}"
                   + (f", one more step and the stop would reach {describe(breach.cap, breach.predicted)}"
                      if breach.predictive else "")
                   + f". Checkpoint: {path}")
        if self.on_cap == "raise":
            raise BudgetExceededError(message, breach.cap, breach.limit, breach.value, trainer.global_step, str(path))
        rank_zero_info(message)

    def _override_minimums(self, trainer: Any) -> None:
        """A hard cap wins over ``min_epochs``/``min_steps``, which Lightning's fit loop otherwise
        enforces by ignoring ``should_stop`` (``FitLoop._can_stop_early``)."""
        min_epochs, min_steps = internals.read_minimums(trainer)
        if not internals.minimums_met(trainer):
            rank_zero_info(f"costaware: the budget cap stops the run before min_epochs={min_epochs}, "
                           f"min_steps={min_steps} are met")
        internals.write_minimums(trainer, (None, None))

    def _restore_minimums(self, trainer: Any) -> None:
        if self._saved_minimums is not None:
            internals.write_minimums(trainer, self._saved_minimums)
            self._saved_minimums = None

    def _stop_checkpoint_path(self, trainer: Any) -> Path:
        if self.ckpt_path is not None:
            return Path(self.ckpt_path)
        dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
        if dirpath:
            return Path(dirpath) / STOP_CHECKPOINT
        return Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints" / STOP_CHECKPOINT

    def _save_stop_checkpoint(self, trainer: Any, path: Path) -> None:
        """Write the stop checkpoint (every rank calls it: it is a collective), timing it."""
        before = self._now()
        self._saving_stop_checkpoint = True
        try:
            trainer.save_checkpoint(str(path))
        finally:
            self._saving_stop_checkpoint = False
        cost = subtract(self._now(), before)
        self.planner.observe_checkpoint(cost)
        self._skip_checks = 0
        self._excluded = add(self._excluded, cost)

    # ----------------------------------------------------------------------------------------
    # Warnings and forecasts
    # ----------------------------------------------------------------------------------------

    def _warn_milestones(self, trainer: Any, spent: dict) -> None:
        for cap, fraction in self.planner.new_warnings(spent):
            limit, value = self.limits[cap], spent[CAP_UNITS[cap]]
            rank_zero_warn(f"costaware: {fraction:.0%} of {cap}={describe(cap, limit)} spent "
                           f"({describe(cap, value)}) at step {trainer.global_step}", category=BudgetWarning)
            assert self.meter is not None and self.meter.ledger is not None, "the run's meter is started"
            self.meter.ledger.record(BudgetWarningEvent(cap=cap, fraction=fraction, limit=limit, value=value,
                                                   step=trainer.global_step))

    def _update_forecast(self, trainer: Any, pl_module: Any, spent: dict, plan: StopPlan, log: bool) -> None:
        planned = self._planned_batches
        if planned is None:
            return
        done = trainer.fit_loop.total_batch_idx + 1
        schedule = self._schedule
        validations = saves = 0.0
        if schedule.validation and not schedule.time_based:
            validations = validations_between(done, int(planned), schedule.batches_per_epoch,
                                              schedule.val_check_batch, schedule.check_val_every_n_epoch)
            saves = validations * plan.saves_per_validation
        elif not schedule.validation and math.isfinite(schedule.batches_per_epoch):
            nb = schedule.batches_per_epoch
            saves = (int(planned) // nb - done // nb) * schedule.epoch_saves
        accumulate = max(trainer.accumulate_grad_batches, 1)
        saves += schedule.step_saves_between(trainer.global_step, trainer.global_step + (planned - done) / accumulate)
        forecast = self.planner.forecast(spent, planned - done, validations, saves)
        if forecast is None:
            return
        self.forecast = forecast
        if log:  # monitorable and to the loggers, without six pl_module.log calls
            figures = {f"cost/forecast_{unit}": forecast[unit] for unit in UNITS}
            internals.publish_metrics(trainer, figures)
            log_at_lightning_step(trainer, figures)
        over = {cap: forecast[CAP_UNITS[cap]] for cap, limit in self.limits.items() if forecast[CAP_UNITS[cap]] > limit}
        if self._recorded_forecast is None or (
                self._record_forecast and _moved(forecast, self._recorded_forecast, _FORECAST_RECORD_CHANGE)):
            # In the ledger (read by `costaware report`): the first forecast, then after a validation
            # or an epoch if it moved (an event is flushed at once: not at every log interval).
            self._recorded_forecast = forecast
            self._record_forecast = False
            assert self.meter is not None and self.meter.ledger is not None, "the run's meter is started"
            self.meter.ledger.record(ForecastEvent(
                forecast_usd=forecast["usd"], forecast=forecast, planned_batches=planned,
                batches_done=done, over=sorted(over), step=trainer.global_step,
                basis=f"BudgetCap: {done} of {planned:g} planned batches done; the rest at the mean cost per batch, "
                      f"plus {validations:g} validation runs and {saves:g} checkpoint saves at their measured cost"))
        if self._forecast_checked:
            return
        self._forecast_checked = True
        if over:
            room = self.planner.headroom_batches(spent, plan, self._schedule.batches_per_validation(),
                                                 self._schedule.step_saves_per_batch(trainer.accumulate_grad_batches),
                                                 at_mean=True)  # a forecast: at mean costs, as the forecast above
            accumulate = max(trainer.accumulate_grad_batches, 1)
            at = f"about step {trainer.global_step + int(room // accumulate)}" if math.isfinite(room) else "its cap"
            details = "; ".join(f"{cap}={describe(cap, self.limits[cap])}, forecast {describe(cap, value)}"
                                for cap, value in over.items())
            rank_zero_warn(f"costaware: the planned run ({int(planned)} batches) does not fit the budget ({details}): "
                           f"BudgetCap will stop it at {at}", category=BudgetWarning)


def _moved(forecast: dict, previous: dict, change: float) -> bool:
    """Whether a forecast differs from the last one recorded by more than ``change`` in a unit."""
    return any(abs(forecast[u] - previous[u]) > change * abs(previous[u]) for u in UNITS if previous[u])


# ---------------------------------------------------------------------------------------------
# Reading the Trainer
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Schedule:
    """What the Trainer will run besides training batches, read once per epoch (the hot path reads
    this instead of Lightning's properties)."""

    validation: bool  # a validation loop runs during fit
    time_based: bool  # val_check_interval is a duration
    batches_per_epoch: float
    val_check_batch: Optional[float]
    check_val_every_n_epoch: Optional[int]
    default_saves: int  # saves after a validation, before one is observed (save_last counts twice)
    epoch_saves: int  # saves at an epoch's end without validation, for forecasts (save_last counts twice)
    step_savers: tuple  # (every_n_train_steps, saves) of each ModelCheckpoint saving by steps

    @classmethod
    def read(cls, trainer: Any) -> _Schedule:
        checkpoints = trainer.checkpoint_callbacks
        saves = [1 + (1 if getattr(cb, "save_last", False) else 0) for cb in checkpoints]
        # At an epoch's end (no validation), a ModelCheckpoint saving by steps only (every_n_epochs=0,
        # Lightning's default with every_n_train_steps) does not save: for forecasts, not the reserve.
        by_epochs = [n for cb, n in zip(checkpoints, saves) if internals.checkpoint_every_n_epochs(cb) >= 1]
        step_savers = tuple((internals.checkpoint_every_n_train_steps(cb), n) for cb, n in zip(checkpoints, saves)
                            if internals.checkpoint_every_n_train_steps(cb) >= 1)
        return cls(validation=bool(trainer.enable_validation),
                   time_based=internals.validation_is_time_based(trainer),
                   batches_per_epoch=trainer.num_training_batches, val_check_batch=trainer.val_check_batch,
                   check_val_every_n_epoch=trainer.check_val_every_n_epoch,
                   default_saves=sum(saves), epoch_saves=sum(by_epochs), step_savers=step_savers)

    def validation_epoch(self, epoch: int) -> bool:
        k = self.check_val_every_n_epoch
        return self.validation and (k is None or (epoch + 1) % k == 0)

    def step_saves(self, step: int) -> int:
        """Checkpoint saves ``ModelCheckpoint(every_n_train_steps=...)`` makes at ``step``."""
        return sum(n for every, n in self.step_savers if step > 0 and step % every == 0)

    def step_saves_between(self, step: int, last_step: float) -> int:
        """Saves ``ModelCheckpoint(every_n_train_steps=...)`` makes after steps ``step + 1`` to ``last_step``."""
        last = int(last_step)
        return sum(n * (last // every - step // every) for every, n in self.step_savers if last > step)

    def step_saves_per_batch(self, accumulate_grad_batches: int = 1) -> float:
        """Saves ``ModelCheckpoint(every_n_train_steps=...)`` makes per training batch, on average."""
        return sum(n / every for every, n in self.step_savers) / max(accumulate_grad_batches, 1)

    def batches_per_validation(self) -> float:
        if not self.validation:
            return math.inf
        vcb = self.val_check_batch
        if vcb is None or not math.isfinite(vcb):
            return self.batches_per_epoch
        return float(vcb) * (self.check_val_every_n_epoch or 1)


def _validation_batches(trainer: Any) -> Optional[float]:
    """Batches in one validation run, as Lightning counted them; else a guess (a quarter of an
    epoch) before the validation data is loaded."""
    if not trainer.enable_validation:
        return 0.0
    counted = [n for n in (trainer.num_val_batches or []) if math.isfinite(n)]
    if counted:
        return float(sum(counted))
    if isinstance(trainer.limit_val_batches, int):
        return float(trainer.limit_val_batches)
    nb = trainer.num_training_batches
    return math.ceil(nb / 4) if math.isfinite(nb) else None


def _planned_batches(trainer: Any, epoch_start: Optional[int] = None) -> Optional[float]:
    """Training batches the run plans, from ``max_steps`` and ``max_epochs``; None if unbounded.

    ``epoch_start``: batches run before the current epoch, whose length (``num_training_batches``,
    which a reloaded data loader changes) the remaining epochs are taken to have; without it,
    every epoch is taken to have it.
    """
    planned = math.inf
    max_steps = trainer.max_steps
    if max_steps is not None and max_steps != -1:
        # max_steps counts optimizer steps: the batches run, plus the steps left at the batches a step takes now
        # (the accumulation: GradientAccumulationScheduler changes it between epochs). Under manual optimization
        # a batch may take several steps (a GAN's two): the rate measured so far (one a batch until a batch ran).
        done, steps = trainer.fit_loop.total_batch_idx + 1, trainer.global_step
        batches_per_step = float(max(trainer.accumulate_grad_batches, 1))
        if not getattr(getattr(trainer, "lightning_module", None), "automatic_optimization", True):
            batches_per_step = done / steps if done > 0 and steps > 0 else 1.0
        planned = done + max(max_steps - steps, 0) * batches_per_step
    nb = trainer.num_training_batches
    max_epochs = trainer.max_epochs
    if max_epochs not in (None, -1) and math.isfinite(nb):
        if epoch_start is None:
            planned = min(planned, float(max_epochs * nb))
        else:
            planned = min(planned, float(epoch_start + max(max_epochs - trainer.current_epoch, 0) * nb))
    return planned if math.isfinite(planned) else None


def _last_batch_of_run(trainer: Any) -> bool:
    """Whether the fit ends after this training batch (``max_steps`` reached, or the last batch of
    the last epoch): read from the Trainer, not from the plan, so a lengthened epoch stays checked."""
    max_steps = trainer.max_steps
    if max_steps is not None and max_steps != -1 and trainer.global_step >= max_steps:
        return True
    max_epochs = trainer.max_epochs
    return (max_epochs not in (None, -1) and trainer.current_epoch + 1 >= max_epochs
            and bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch))


def _checkpoint_prior_s(pl_module: Any) -> float:
    """Seconds a checkpoint save is expected to take before one is measured."""
    size = sum(t.numel() * t.element_size() for t in list(pl_module.parameters()) + list(pl_module.buffers()))
    return size * _PRIOR_CHECKPOINT_STATE_FACTOR / _PRIOR_CHECKPOINT_BYTES_PER_S
