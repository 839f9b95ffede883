"""What a strategy is: the cheaper path a run takes once more training is not worth its cost.

These are not Lightning ``Strategy`` objects (which place a model on devices); they are what
``MarginalGainStopping(then=...)`` does when it decides to stop.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional


@dataclass
class StopContext:
    """What a strategy gets to work with.

    Attributes:
        trainer: the teacher's Trainer (either Lightning namespace).
        pl_module: the teacher's LightningModule.
        monitor: the run's ``CostMonitor`` (for totals and the ledger), or None.
        metric_name: the monitored metric, e.g. ``"val_acc"``.
        mode: ``"max"`` or ``"min"``.
        budget_left_usd: dollars left under a ``BudgetCap``, or None when uncapped.
        reason: why the run stopped (the policy's decision text).
    """

    trainer: Any
    pl_module: Any
    monitor: Any = None
    metric_name: str = ""
    mode: str = "max"
    budget_left_usd: Optional[float] = None
    reason: str = ""


@dataclass
class ModelRow:
    """One line of the teacher / student / quantized table in the report.

    Attributes:
        role: ``"teacher"``, ``"student"`` or ``"quantized"``.
        metric: the monitored metric's value on the validation set.
        params: number of parameters.
        size_bytes: size on disk of the saved weights, bytes.
        latency_ms_per_example: CPU inference latency per example, milliseconds.
        train_usd: what training it cost, dollars.
    """

    role: str
    metric: Optional[float] = None
    params: Optional[int] = None
    size_bytes: Optional[int] = None
    latency_ms_per_example: Optional[float] = None
    train_usd: Optional[float] = None
    path: Optional[str] = None
    note: str = ""


class StopStrategy:
    """Base class: override ``on_stop`` (at the stop point) and/or ``after_fit`` (after the fit)."""

    name = "stop"

    def on_stop(self, context: StopContext) -> None:
        """Called once, on every rank, at the step where the run decides to stop."""

    def after_fit(self, context: StopContext) -> list[ModelRow]:
        """Called at the end of the teacher's fit; returns rows for the report's model table."""
        return []


def ledger_folder(trainer: Any, monitor: Any) -> Path:
    """Where a strategy's files go: the ledger's folder, else ``<log dir>/costaware`` as ``CostMonitor`` picks it.

    The log dir is read from the first logger rather than ``Trainer.log_dir``, which is a
    broadcast: a strategy may run on rank zero alone.
    """
    ledger = getattr(monitor, "ledger", None)
    if ledger is not None and getattr(ledger, "path", None) is not None:
        return Path(ledger.path).parent
    loggers = getattr(trainer, "loggers", None) or []
    folder = None
    if loggers:
        folder = getattr(loggers[0], "log_dir", None) or getattr(loggers[0], "save_dir", None)
    return Path(folder or trainer.default_root_dir) / "costaware"


def training_modes(module: Any) -> dict:
    """Each submodule's train/eval flag, to put back after an evaluation (frozen parts stay eval)."""
    return {m: m.training for m in module.modules()}


def restore_training_modes(modes: dict) -> None:
    """Put back the flags :func:`training_modes` took (``module.train(flag)`` would reset them all)."""
    for m, training in modes.items():
        m.training = training
