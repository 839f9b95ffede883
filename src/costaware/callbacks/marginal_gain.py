"""``MarginalGainStopping``: stop when the next dollar of training buys less than it costs."""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import torch
from lightning_utilities.core.rank_zero import rank_zero_info, rank_zero_warn

from costaware import _lightning_internals as internals
from costaware._lightning import CALLBACK_BASES
from costaware.callbacks.budget_cap import BudgetCap
from costaware.callbacks.metering import check_priced, find_meter, make_own_meter, meter_stage_from_checkpoint
from costaware.curves import Decision, MarginalGainPolicy
from costaware.lr_schedule import probe_schedule
from costaware.meter import CostMeter, log_at_lightning_step
from costaware.records import (
    MarginalGainDecisionEvent,
    MarginalGainPolicyEvent,
    RecordedTotals,
    StrategyFailedEvent,
    StrategyResultEvent,
)
from costaware.strategies.base import ModelRow, StopContext, StopStrategy
from costaware.strategies.early_stop import EarlyStop
from costaware.validation import check_flag

if TYPE_CHECKING:
    import pytorch_lightning as pl

#: Keys written to the loggers at each decision (``{monitor}`` is the monitored metric's name).
GAIN_PER_USD_KEY = "cost/marginal_gain_per_usd"
PREDICTED_FINAL_KEY = "cost/predicted_final_{monitor}"
USD_TO_PREDICTED_FINAL_KEY = "cost/usd_to_predicted_final"


class MetricNotLoggedError(KeyError, ValueError):
    """The monitored metric is not among the metrics the run logs.

    Attributes:
        monitor: the missing key.
        logged: the keys that are logged (``trainer.callback_metrics``).
    """

    def __init__(self, monitor: str, logged: Sequence[str]) -> None:
        self.monitor = monitor
        self.logged = list(logged)
        self.message = (f"MarginalGainStopping(monitor={monitor!r}): the run does not log {monitor!r} at validation; "
                        f"logged metrics are {self.logged or 'none'}. Log it in validation_step "
                        f"(self.log({monitor!r}, value)) or pass one of these as monitor=")
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


class MarginalGainStopping(*CALLBACK_BASES):  # type: ignore[misc]  # a Callback of each installed namespace
    r"""Stop training when the metric the next dollar buys is worth less than that dollar.

    At every validation end of a fit (not the sanity check) the monitored metric and the run's
    cost so far, in dollars, go to a :class:`costaware.curves.MarginalGainPolicy`: it fits
    learning curves of the metric against cost and estimates, with uncertainty, how much the
    best value would improve over the next increment of spend. When even the optimistic
    (``confidence``) estimate is worth less than the increment costs, at ``usd_per_point``
    dollars per point of the metric (a point is 0.01 of accuracy with the default
    ``points_per_unit=100``), the run stops and the ``then`` strategy takes over: by default
    :class:`~costaware.strategies.EarlyStop`, which keeps the best weights. Other strategies
    distill the model into a student or quantize it. A run whose metric turns NaN, or collapses,
    stops too.

    The policy also gets the run's planned cost: what it spent, plus the rest of the plan at the
    pace of the later half of the fit so far (the share done of ``max_steps``, in optimizer steps,
    or of ``max_epochs``, in batches, whichever ends the fit first; none when the Trainer plans no
    end). It anchors the predicted final metric and lets the policy wait for the gains of
    learning-rate annealing (``anneal_fraction``, ``anneal_points``) when the fit has a learning-rate scheduler (at a
    constant learning rate there is no annealing to wait for; with a scheduler and no planned end, where
    the schedule stands is unknown: the wait is what ``anneal_points`` are worth); give
    ``policy_kwargs={"planned_cost_usd": ..., "anneals": ...}`` to set either yourself.
    At its first validation of a fit it reads the learning rates the Trainer's scheduler will set
    until the planned end off a copy of the scheduler (the real one is not touched; not for
    ``ReduceLROnPlateau``, which follows the metric): the policy then prices the gain on a curve fitted
    against the area under the learning rate, so the end of a schedule that anneals to zero is not
    priced as if the run still learned at its peak rate (``policy_kwargs={"lr_schedule": ...}`` to give it yourself).
    Give ``policy_kwargs={"baseline": ...}``, the metric of a model that learned nothing (the
    majority class's share of the validation set, for accuracy), and a run stuck at that level
    (diverged before its first validation) stops after a short, priced wait instead of sampling
    noise for a lucky best -- unless, with the curve prior, its learning rate is still warming up or
    at its peak and past runs at that stage gained more than waiting for it to anneal costs (a
    slow start, as from scratch or in self-supervised pretraining; with no planned end, while past runs
    at chance gained more as their spend doubled than doubling it costs). A run that learned and falls back
    to that level for two validations in a row stops as collapsed (a diverged model predicting one class).

    Cost comes from the meter of the ``CostMonitor`` among the Trainer's callbacks; without one,
    this callback meters the run itself (:attr:`own_meter`, built from ``monitor_kwargs``),
    logging ``cost/*`` and writing the ledger and report as CostMonitor does. Nothing priced (on
    a CPU-only machine, no ``usd_per_host_hour``) is an error at fit start: a run that costs $0
    could never be stopped on price. Totals are refreshed at each decision (a collective under
    DDP; every rank validates, so every rank calls it).

    Each decision, with its reason and the policy's figures, is written to the run's ledger as a
    ``marginal_gain_decision`` event (``stop``, ``reason``, ``monitor``, ``value``,
    ``usd``, ``step``, ``lr`` (the first optimizer's learning rate, which the policy uses too),
    ``lr_schedule`` (on the decision that first used the schedule read off the scheduler),
    ``gain_points``, ``gain_points_upper``, ``increment_usd``, ``gain_per_usd`` (the rate the decision
    compared with the price), ``past_gain_points_upper`` and ``past_increment_usd`` (where past runs at
    this stage were asked), ``predicted_final`` with ``predicted_final_low`` and ``predicted_final_high`` (its
    ``confidence`` interval), ``usd_to_predicted_final``, ``curve``, and
    ``curve_points``: the fitted curve sampled against dollars, which the report draws), and the
    estimate goes to the loggers as ``cost/marginal_gain_per_usd`` (points per dollar),
    ``cost/predicted_final_<monitor>`` and ``cost/usd_to_predicted_final`` (with a plan) at the
    step Lightning logs the validation's metrics at, and into ``trainer.callback_metrics`` for
    callbacks that run after this one. They are written to the loggers directly (as ``LearningRateMonitor`` does),
    not through ``pl_module.log``: Lightning forbids ``log`` in ``on_validation_end``, the only
    hook where a metric logged in the module's own ``on_validation_epoch_end`` is final. At the
    end of the fit, each strategy's ``after_fit`` runs and its rows (teacher, student, quantized)
    are recorded as a ``strategy_result`` event and kept in :attr:`results`.

    Under DDP the ranks stop together: the stop goes through
    ``trainer.strategy.reduce_boolean_decision`` (one rank that would stop stops them all).
    ``state_dict`` carries the policy's points, so a resumed run decides as if never stopped.

    Args:
        monitor: the metric to watch, as logged (``"val_acc"``).
        mode: ``"max"`` if higher is better (accuracy), ``"min"`` if lower is better (loss).
        usd_per_point: what one point of the metric is worth to you, in dollars. Give this or
            ``min_gain_per_usd``.
        min_gain_per_usd: the same knob as a rate: the fewest points per dollar worth paying for
            (``1 / usd_per_point``).
        confidence: in [0.5, 1): the quantile of the gain estimate that must fall below the cost;
            higher is more cautious (stops later).
        min_points: never stop (except on NaN or collapse) before this many validations (>= 3).
        points_per_unit: points per unit of the metric (100: accuracy points are percentage
            points; for a loss, 0.01 of loss is one point).
        then: what to do on a stop: a :class:`~costaware.strategies.StopStrategy` or a list of
            them, run in order; default ``EarlyStop()``.
        policy_kwargs: more ``MarginalGainPolicy`` arguments (``fit_fraction``,
            ``increment_fraction``, ``planned_cost_usd``, ``anneal_fraction``, ``anneals``,
            ``baseline``, ``collapse_points``, ``seed``...). ``metric_range``: ``(0, 1)`` for an
            error rate (else read as a loss, bounded by 0 alone, and past runs are not asked),
            ``(0, 100)`` for a percentage with ``points_per_unit=1``; recorded in the ledger.
        monitor_kwargs: ``CostMonitor`` arguments for the meter this callback drives when the
            Trainer has none (``{"usd_per_host_hour": 0.1, "country": "USA"}``); ignored, with a
            warning, when there is one (a price that differs from its is a ValueError at setup).
        verbose: print each decision on rank zero (stops are always printed).
        prior: what past runs say about how a run goes on: ``"default"`` (the prior shipped with
            costaware), ``"from-scratch"`` (its from-scratch and SSL runs alone: for pretraining or
            training from scratch), the path of a JSON file from ``costaware prior fit LEDGERS... -o prior.json``
            (your own past runs: the best predictor), or ``None`` (the curve fit alone). See
            :class:`costaware.curves.MarginalGainPolicy`.

    Raises:
        ValueError: at construction, naming the argument: an empty ``monitor``, an unknown
            ``mode``, neither or both of ``usd_per_point`` and ``min_gain_per_usd``, a knob that
            is not a number > 0, ``confidence`` outside (0, 1), ``min_points`` < 3, a ``then``
            that is not a strategy, bad ``policy_kwargs`` or ``monitor_kwargs``.
        MetricNotLoggedError: (a ``KeyError`` and a ``ValueError``) at the first validation,
            when ``monitor`` is not logged; it lists the keys that are.
        ValueError: at the fit's start, when the fit runs no validation (no ``val_dataloader``, no
            ``validation_step``, ``limit_val_batches=0``): the policy would never decide.

    Example::

        from pytorch_lightning import Trainer
        from costaware import CostMonitor, MarginalGainStopping
        from costaware.strategies import Distill

        trainer = Trainer(callbacks=[
            CostMonitor(gpu="H100", usd_per_gpu_hour=2.5),
            MarginalGainStopping(monitor="val_acc", mode="max", usd_per_point=5),
        ])
        # Distill into a small student once the teacher is not worth more:
        MarginalGainStopping(monitor="val_acc", usd_per_point=5, then=Distill(student=small_model))
        # LightningCLI:  --config callbacks/marginal_gain.yaml
    """

    def __init__(
        self,
        monitor: str,
        mode: str = "max",
        usd_per_point: Optional[float] = None,
        min_gain_per_usd: Optional[float] = None,
        confidence: float = 0.8,
        min_points: int = 3,
        points_per_unit: float = 100.0,
        then: Optional[Union[StopStrategy, Sequence[StopStrategy]]] = None,
        policy_kwargs: Optional[dict] = None,
        monitor_kwargs: Optional[dict] = None,
        verbose: bool = False,
        prior: Any = "default",
    ) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"monitor must be the name of a logged metric such as 'val_acc', got {monitor!r}")
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be one of ('max', 'min'), got {mode!r}")
        if usd_per_point is None and min_gain_per_usd is None:
            raise ValueError("give usd_per_point (dollars one point of the metric is worth to you) or min_gain_per_usd "
                             "(the fewest points per dollar worth paying for); got neither")
        if usd_per_point is not None and min_gain_per_usd is not None:
            raise ValueError(f"give usd_per_point or min_gain_per_usd, not both (got usd_per_point={usd_per_point!r}, "
                             f"min_gain_per_usd={min_gain_per_usd!r})")
        if policy_kwargs is not None and not isinstance(policy_kwargs, dict):
            raise ValueError(f"policy_kwargs must be a dict of MarginalGainPolicy arguments, got {policy_kwargs!r}")
        check_flag("verbose", verbose)
        self.policy_kwargs = dict(policy_kwargs or {})
        self._user_plan = self.policy_kwargs.get("planned_cost_usd") is not None
        self._user_anneals = "anneals" in self.policy_kwargs
        self._user_schedule = self.policy_kwargs.get("lr_schedule") is not None
        self._schedule_read = False  # the scheduler's rates ahead read in this fit (see _lr_schedule)
        self._spent_at: list[tuple[float, float]] = []  # (share of the plan, dollars) at validations
        self._begun = False  # the policy recorded in this fit's ledger (see _begin)
        for key in ("mode", "usd_per_point", "min_gain_per_usd", "confidence", "min_points", "points_per_unit",
                    "prior"):
            if key in self.policy_kwargs:
                raise ValueError(f"policy_kwargs has {key!r}, which is an argument of MarginalGainStopping: pass "
                                 f"{key}= directly")
        try:
            self.policy = MarginalGainPolicy(mode=mode, usd_per_point=usd_per_point, min_gain_per_usd=min_gain_per_usd,
                                             confidence=confidence, min_points=min_points,
                                             points_per_unit=points_per_unit, prior=prior, **self.policy_kwargs)
        except TypeError as err:  # an unknown policy_kwargs key
            raise ValueError(f"policy_kwargs: {err}") from err
        except ValueError as err:  # the policy names the argument; strip its backquotes
            raise ValueError(str(err).replace("`", "")) from err
        self.monitor = monitor
        self.mode = mode
        self.strategies = _strategies(then)
        self.own_meter = make_own_meter({}, monitor_kwargs)
        self.verbose = verbose
        self.meter: Optional[CostMeter] = None  # the run's meter, from setup on
        self._drives = False  # the run's meter is own_meter: this callback starts it, logs and reports
        self._fitting = True  # whether a checkpoint Lightning restores now is a fit's (see load_state_dict)
        self.decisions: list[Decision] = []  # this session's decisions, in order
        self.stopped_step: Optional[int] = None
        self.stop_reason: Optional[str] = None
        self.results: list[ModelRow] = []  # the strategies' rows, after the fit
        self._seen_monitor = False
        self._warned_free = False
        self._warned_percent = False
        self._warned_error_rate = False

    # The policy holds the knobs (validated there); these read them, so no copy can drift.

    @property
    def usd_per_point(self) -> float:
        return self.policy.usd_per_point

    @property
    def min_gain_per_usd(self) -> float:
        return self.policy.min_gain_per_usd

    @property
    def confidence(self) -> float:
        return self.policy.confidence

    @property
    def min_points(self) -> int:
        return self.policy.min_points

    @property
    def points_per_unit(self) -> float:
        return self.policy.points_per_unit

    @property
    def state_key(self) -> str:
        generate = getattr(self, "_generate_state_key", None)
        return generate(monitor=self.monitor, mode=self.mode) if generate else type(self).__qualname__

    # ------------------------------------------------------------------------------------------
    # Lightning hooks
    # ------------------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._fitting = stage == "fit"
        if stage != "fit":
            if self._drives:  # a test, validate or predict after the fit this callback metered
                self.own_meter.begin_stage(trainer, stage)
            return
        for strategy in self.strategies:
            getattr(strategy, "check_before_fit", lambda: None)()  # before compute, not after the fit
        self.meter = find_meter(trainer, self)
        self._check_validates(trainer)
        self._drives = self.meter is self.own_meter
        if self._drives:
            self.meter.start(trainer)

    def _check_validates(self, trainer: Any) -> None:
        """The policy decides at each validation: a fit that runs none would never be judged, so it is refused before
        any compute (as Lightning's ``EarlyStopping`` refuses a metric it never sees)."""
        if not trainer.enable_validation:
            raise ValueError(
                f"MarginalGainStopping(monitor={self.monitor!r}) decides at each validation, and this fit runs none "
                f"(no val_dataloader, no validation_step, or limit_val_batches={trainer.limit_val_batches!r}): give "
                "the fit a validation loop that logs it, or leave the callback out")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.meter is not None and self.meter.ledger is not None, "setup() found and started the run's meter"
        check_priced(self.meter, "MarginalGainStopping", "usd_per_point")
        self.decisions = []
        self.results = []
        self._begun = False
        self._schedule_read = False
        self._spent_at = []
        if not internals.restores_after_fit_start(trainer):
            self._begin(trainer)

    def on_sanity_check_start(self, trainer: Any, pl_module: Any) -> None:
        self._begin(trainer)

    def _begin(self, trainer: Any) -> None:
        """Record the policy, with the points a resumed run's checkpoint holds: in ``on_fit_start``, or at the first
        hook after a strategy that restores late (FSDP, DeepSpeed) has restored."""
        if self._begun:
            return
        self._begun = True
        assert self.meter is not None and self.meter.ledger is not None, "setup() found and started the run's meter"
        self.meter.open_ledger(trainer)  # (once per fit, whoever asks first)
        self.meter.ledger.record(MarginalGainPolicyEvent(
            monitor=self.monitor, mode=self.mode, usd_per_point=self.usd_per_point,
            min_gain_per_usd=self.min_gain_per_usd, confidence=self.confidence, min_points=self.min_points,
            points_per_unit=self.points_per_unit, strategies=[_name(s) for s in self.strategies],
            resumed_points=self.policy.num_points, anneals=self._anneals(trainer), baseline=self.policy.baseline,
            metric_range=_given_range(self.policy.metric_range)))

    # When this callback meters alone, it drives its meter as CostMonitor would.

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._drives:
            self.own_meter.begin_batch(pl_module)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._drives:
            self.own_meter.count_batch(trainer, pl_module)
            if internals.should_log(trainer):
                self.own_meter.log(trainer, pl_module, on_step=True)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self._drives:
            self.own_meter.end_epoch()
            self.own_meter.log(trainer, pl_module, on_step=False)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._begin(trainer)
        if self._drives:
            self.own_meter.phase_start("training")
        context = self._context(trainer, pl_module)
        for strategy in self.strategies:
            hook = getattr(strategy, "on_train_start", None)
            if callable(hook):
                hook(context)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self._drives:
            self.own_meter.phase_end("training")

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        meter_stage_from_checkpoint(self, trainer, "validate")  # trainer.validate(ckpt_path=...) in a new process
        if self._drives:
            self.own_meter.phase_start("validation")

    def _warn_if_percent(self, value: float) -> None:
        """Once: an accuracy logged as a percentage is 100x the points the price was set for."""
        policy = self.policy
        if (self._warned_percent or policy.mode != "max" or policy.points_per_unit != 100.0
                or not 1.0 < value <= 100.0 or policy.metric_range != "auto"):
            return
        self._warned_percent = True
        rank_zero_warn(f"costaware: MarginalGainStopping sees {self.monitor}={value:g}, above 1: with "
                       "points_per_unit=100 a point is 0.01 of the metric, a percentage point of an accuracy in "
                       "[0, 1]. If it is a percentage, pass points_per_unit=1 (and "
                       "policy_kwargs={'metric_range': (0, 100)}) so that usd_per_point prices one percentage point.")

    def _warn_if_error_rate(self, value: float) -> None:
        """Once: an error rate (``mode="min"``, a name with "err", values in [0, 1]) left at ``metric_range="auto"``
        is read as a loss, bounded by 0 alone, and past runs are not asked; ``policy_kwargs={"metric_range": (0, 1)}``
        is the fix. Not inferred from the values: a loss in [0, 1] (binary cross-entropy) is as common, and read as
        bounded by 1 it fared worse (NAS-Bench-NLP's losses scaled into [0, 1], replayed: regret up to 34% higher)."""
        policy = self.policy
        name = self.monitor.lower()
        if (self._warned_error_rate or policy.mode != "min" or policy.metric_range != "auto" or "err" not in name
                or "loss" in name or not 0.0 <= value <= 1.0):
            return
        self._warned_error_rate = True
        rank_zero_warn(f"costaware: MarginalGainStopping reads {self.monitor}={value:g} (mode='min') as a loss, "
                       "bounded by 0 alone, so past runs are not asked how runs at this stage go on. If it is an "
                       "error rate (1 - accuracy), pass policy_kwargs={'metric_range': (0, 1)}: it is then judged as "
                       "the accuracy it mirrors.")

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict) -> None:
        if self._drives:
            self.own_meter.phase_start("checkpointing")

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.state.fn != "fit" or self.meter is None:
            return
        if self._drives:
            self.own_meter.record_validation(trainer, pl_module)
            self.own_meter.phase_end("validation")
        metrics = trainer.callback_metrics
        if trainer.sanity_checking:
            # A typo fails here, before training, when the sanity check logged other metrics
            # (a module that logs nothing during the sanity check is judged at the first validation).
            logged = [k for k in metrics if not k.startswith(("cost/", "throughput/", "gpu/", "host/"))]
            later = {getattr(cb, "log_name", None) for cb in trainer.callbacks}  # OnlineProbe skips the sanity check
            if logged and self.monitor not in metrics and self.monitor not in later:
                raise MetricNotLoggedError(self.monitor, sorted(metrics))
            return
        if self.monitor not in metrics:
            if not self._seen_monitor:
                raise MetricNotLoggedError(self.monitor, sorted(metrics))
            return  # logged at other validations: nothing to decide on this one
        self._seen_monitor = True
        value = float(metrics[self.monitor])
        self._warn_if_percent(value)
        self._warn_if_error_rate(value)
        totals = self.meter.refresh(trainer, pl_module)  # a collective: every rank validates
        context = self._context(trainer, pl_module, totals_usd=totals.usd)
        for strategy in self.strategies:
            hook = getattr(strategy, "on_validation", None)
            if callable(hook):
                hook(context, value)
        lr = _learning_rate(trainer)
        schedule = self._lr_schedule(trainer)
        decision = self.policy.observe(totals.usd, value, planned_cost_usd=self._planned_cost_usd(trainer, totals.usd),
                                       anneals=self._anneals(trainer), lr=lr, lr_schedule=schedule)
        self.decisions.append(decision)
        stop = bool(trainer.strategy.reduce_boolean_decision(decision.stop, all=False))
        if totals.usd <= 0 and self.policy.num_points >= self.min_points and not self._warned_free:
            self._warned_free = True
            rank_zero_warn("costaware: MarginalGainStopping sees a run that costs $0, so it can never stop it on "
                           "price: give the CostMonitor a price (usd_per_host_hour on a CPU, usd_per_gpu_hour or "
                           "gpu on a GPU)")
        reason = decision.reason
        if stop and not decision.stop:
            reason = f"another rank decided to stop (here: {decision.reason})"
        self._record(trainer, decision, stop, reason, value, totals, lr, schedule)
        if stop:
            trainer.should_stop = True  # (again, if min_steps/min_epochs made Lightning go on)
        if stop and self.stopped_step is None:
            self.stopped_step = trainer.global_step
            self.stop_reason = reason
            rank_zero_info(f"costaware: MarginalGainStopping stops the run at step {trainer.global_step} "
                           f"(${totals.usd:.4g} spent, {self.monitor}={value:.6g}): {reason}")
            context.reason = reason
            for strategy in self.strategies:
                strategy.on_stop(context)
        elif self.verbose:
            rank_zero_info(f"costaware: MarginalGainStopping at step {trainer.global_step}: {decision.reason}")

    def _anneals(self, trainer: Any) -> bool:
        """Whether the learning rate anneals: the user's ``anneals``, else whether the fit has an LR scheduler.

        Any scheduler counts (a warmup-only one too: the wait stays bounded by ``anneal_points``).
        """
        return self.policy.anneals if self._user_anneals else bool(trainer.lr_scheduler_configs)

    def _lr_schedule(self, trainer: Any) -> Optional[list]:
        """The rates the scheduler sets from now to the planned end, read once a fit (also after a resume: the
        policy keeps the rates it saw); ``None`` after that, when the user gave a schedule, or when unknowable."""
        if self._user_schedule or self._schedule_read:
            return None
        self._schedule_read = True
        planned_steps = _planned_steps(trainer)
        return None if planned_steps is None else probe_schedule(trainer, planned_steps)

    def _planned_cost_usd(self, trainer: Any, spent_usd: float) -> Optional[float]:
        """The run's planned cost: what it spent, plus the rest of the plan at the pace of the later half of this fit.

        The pace is dollars per share of the plan (:func:`_plan_done`) since this fit's first validation at or past
        half its progress so far (at its first validation: the average so far). The average carries what a run
        spends once, around its first steps (setup, the first batches, a first validation, a slow start);
        extrapolated over the steps left, it overstated the plan by up to 32% and 50% on two small CPU runs that
        completed (the SST-2 distillation example's first estimate was 25% above its last) and 3x on a run whose
        first 20 of 150 steps cost 5x the others, and `costaware prior fit` then took completed runs for stopped ones.

        ``None`` (the policy keeps its last plan) when the user gave ``planned_cost_usd``, when
        the Trainer plans no end (``max_steps=-1``, ``max_epochs=-1``), or before the first step.
        """
        if self._user_plan or spent_usd <= 0:
            return None
        done = _plan_done(trainer)
        if done is None or not 0.0 < done < 1.0:
            return None
        since = next(((d, usd) for d, usd in self._spent_at if 2 * d >= done and d < done), None)
        self._spent_at.append((done, spent_usd))
        if since is None:
            return spent_usd / done
        return spent_usd + (1.0 - done) * max(spent_usd - since[1], 0.0) / (done - since[0])

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if self.meter is None:
            return
        self._begin(trainer)  # (a resume that had nothing left to train started no training)
        # The teacher's metering ends before the strategies, wherever the CostMonitor is listed
        # (every rank runs this hook: the refresh's collective is safe; later calls do nothing).
        self.meter.end_fit(trainer, pl_module)
        context = self._context(trainer, pl_module, totals_usd=self.meter.totals.usd)
        context.reason = self.stop_reason or "the fit ended without a marginal-gain stop"
        ledger = self.meter.ledger
        assert ledger is not None, "setup() found and started the run's meter"
        for strategy in self.strategies:
            try:
                rows = strategy.after_fit(context) or []
            except Exception as err:  # noqa: BLE001 - the teacher is trained and measured: keep it, say why
                rank_zero_warn(f"costaware: {_name(strategy)} failed after the fit ({type(err).__name__}: {err}); "
                               "the teacher's training and its ledger are kept")
                ledger.record(StrategyFailedEvent(strategy=_name(strategy), reason=context.reason,
                                                  error=f"{type(err).__name__}: {err}"))
                continue
            self.results.extend(rows)
            ledger.record(StrategyResultEvent(strategy=_name(strategy), reason=context.reason,
                                              rows=[asdict(row) for row in rows]))

    def on_test_start(self, trainer: Any, pl_module: Any) -> None:
        meter_stage_from_checkpoint(self, trainer, "test")  # LightningCLI's `test --ckpt_path` after its `fit`

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        meter_stage_from_checkpoint(self, trainer, "predict")

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self._drives:
            self.own_meter.fail(trainer, exception)
        else:
            self.own_meter.end_stage(trainer)  # a test from a checkpoint this callback metered (no fit here)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit" and self._drives:
            self.own_meter.teardown(trainer)
        elif stage != "fit":
            self.own_meter.end_stage(trainer)  # (nothing if this callback metered no stage)

    def state_dict(self) -> dict:
        state = {"policy": self.policy.state_dict(), "seen_monitor": self._seen_monitor,
                 "stopped_step": self.stopped_step, "stop_reason": self.stop_reason,
                 "strategies": [s.state_dict() if callable(getattr(s, "state_dict", None)) else {}
                                for s in self.strategies]}
        if self._drives:
            state["meter"] = self.own_meter.state_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Continue the checkpointed run's decisions, on a resumed fit only (Lightning restores callbacks for a
        ``trainer.test`` or ``validate`` from a checkpoint too, and a fit after those is a new run)."""
        if not self._fitting:
            return
        self.policy.load_state_dict(state_dict["policy"])
        self._seen_monitor = bool(state_dict.get("seen_monitor", False))
        self.stopped_step = state_dict.get("stopped_step")
        self.stop_reason = state_dict.get("stop_reason")
        for strategy, state in zip(self.strategies, state_dict.get("strategies", [])):
            if state and callable(getattr(strategy, "load_state_dict", None)):
                strategy.load_state_dict(state)
        if self._drives and "meter" in state_dict:
            self.own_meter.load_state_dict(state_dict["meter"])

    # ------------------------------------------------------------------------------------------

    def _context(self, trainer: Any, pl_module: Any, totals_usd: Optional[float] = None) -> StopContext:
        return StopContext(trainer=trainer, pl_module=pl_module, monitor=self.meter, metric_name=self.monitor,
                           mode=self.mode, budget_left_usd=_budget_left_usd(trainer, totals_usd),
                           usd_per_point=self.usd_per_point, points_per_unit=self.policy.points_per_unit)

    def _record(self, trainer: Any, decision: Decision, stop: bool, reason: str, value: float, totals: Any,
                lr: Optional[float] = None, lr_schedule: Optional[list] = None) -> None:
        """The decision into the ledger, and its estimate to the loggers and callback metrics."""
        est = decision.estimate
        figures: dict[str, Any] = {
            "gain_points": None, "gain_points_upper": None, "increment_usd": None, "gain_per_usd": None,
            "past_gain_points_upper": None, "past_increment_usd": None,
            "predicted_final": None, "predicted_final_low": None, "predicted_final_high": None,
            "usd_to_predicted_final": None, "curve": None}
        if est is not None:
            figures.update({k: getattr(est, k) for k in figures})
            figures["curve_points"] = {"usd": list(est.curve_usd), "value": list(est.curve_metric)}  # for the report
        assert self.meter is not None and self.meter.ledger is not None, "the run's meter is started"
        ledger = self.meter.ledger
        ledger.record(MarginalGainDecisionEvent(  # its totals: those the decision used, not the last sample's
            stop=stop, reason=reason, monitor=self.monitor, value=value, usd=totals.usd, step=trainer.global_step,
            lr=lr, lr_schedule=None if lr_schedule is None else [list(pair) for pair in lr_schedule],
            points=self.policy.num_points, usd_per_point=self.usd_per_point, totals=RecordedTotals.of(totals),
            **figures))
        if est is None:
            return
        logged = {GAIN_PER_USD_KEY: est.gain_per_usd,
                  PREDICTED_FINAL_KEY.format(monitor=self.monitor): est.predicted_final}
        if est.usd_to_predicted_final is not None:
            logged[USD_TO_PREDICTED_FINAL_KEY] = est.usd_to_predicted_final
        logged = {k: float(v) for k, v in logged.items() if v is not None and math.isfinite(v)}
        log_at_lightning_step(trainer, logged)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in logged.items()})


def _strategies(then: Any) -> list:
    if then is None:
        return [EarlyStop()]
    items = list(then) if isinstance(then, (list, tuple)) else [then]
    if not items:
        raise ValueError("then must be a strategy or a non-empty list of them (default: EarlyStop())")
    for item in items:
        if isinstance(item, type):
            raise ValueError(f"then must hold strategy objects, got the class {item.__name__}: write "
                             f"then={item.__name__}(...) (EarlyStop(), Distill(student=...), Quantize())")
        if not (callable(getattr(item, "on_stop", None)) and callable(getattr(item, "after_fit", None))):
            raise ValueError(f"then must hold costaware.strategies.StopStrategy objects (EarlyStop, Distill, "
                             f"Quantize), got {item!r}")
    return items


def _plan_done(trainer: Any) -> Optional[float]:
    """The share of its plan the fit has done, of the limit that ends it first; None when it plans no end.

    Optimizer steps against ``max_steps`` (its own unit, however many a batch takes), batches against the batches
    of ``max_epochs``. Not ``global_step / estimated_stepping_batches``: Lightning counts that with the accumulation
    of the moment, so under ``GradientAccumulationScheduler({0: 1, 3: 4})`` it fell below the steps already done at
    epoch 3 and the plan was gone for the rest of the fit; and a batch that steps two optimizers (a GAN, manual
    optimization) runs ``global_step`` twice as fast as the batches it counts.
    """
    shares = []
    max_steps = trainer.max_steps
    if max_steps is not None and max_steps > 0:
        shares.append(trainer.global_step / max_steps)
    batches, max_epochs = trainer.num_training_batches, trainer.max_epochs
    if max_epochs is not None and max_epochs > 0 and math.isfinite(batches) and batches > 0:
        shares.append((trainer.fit_loop.total_batch_idx + 1) / (max_epochs * batches))
    return max(shares) if shares else None


def _planned_steps(trainer: Any) -> Optional[float]:
    """The optimizer steps the Trainer plans, or None when it plans no end (``max_steps=-1``, ``max_epochs=-1``)."""
    try:
        planned_steps = float(trainer.estimated_stepping_batches)
    except Exception:  # noqa: BLE001 - an unsized data loader: no plan, judged without one
        return None
    return planned_steps if math.isfinite(planned_steps) else None


def _learning_rate(trainer: Any) -> Optional[float]:
    """The first optimizer's first parameter group's learning rate now, or None (no optimizer, no "lr")."""
    try:
        lr = float(trainer.optimizers[0].param_groups[0]["lr"])
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        return None
    return lr if math.isfinite(lr) and lr >= 0 else None


def _given_range(metric_range: Any) -> Optional[list]:
    """The range a user gave, as the ledger records it: ``[low, high]`` where both ends are finite, else None (a
    range open on one side bounds no prior, as "auto" for a loss does not)."""
    if isinstance(metric_range, tuple) and all(math.isfinite(v) for v in metric_range):
        return [float(v) for v in metric_range]
    return None


def _name(strategy: Any) -> str:
    return getattr(strategy, "name", None) or type(strategy).__name__


def _budget_left_usd(trainer: Any, totals_usd: Optional[float]) -> Optional[float]:
    """Dollars left under the Trainer's BudgetCap(s) ``max_usd``, or None when uncapped."""
    caps = [cb.limits["max_usd"] for cb in trainer.callbacks if isinstance(cb, BudgetCap) and "max_usd" in cb.limits]
    if not caps or totals_usd is None:
        return None
    return min(caps) - totals_usd
