"""What a strategy is: the cheaper path a run takes once more training is not worth its cost.

These are not Lightning ``Strategy`` objects (which place a model on devices); they are what
``MarginalGainStopping(then=...)`` does when it decides to stop.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from torch import nn


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
        usd_per_point: what one point of the metric is worth, dollars (the policy's), or
            None; a ``Deployment`` prices the models' value with it.
        points_per_unit: points per unit of the metric (the policy's; 100: accuracy 0.01 is a point).
    """

    trainer: Any
    pl_module: Any
    monitor: Any = None
    metric_name: str = ""
    mode: str = "max"
    budget_left_usd: Optional[float] = None
    reason: str = ""
    usd_per_point: Optional[float] = None
    points_per_unit: float = 100.0


@dataclass
class ModelRow:
    """One line of the teacher / student / quantized table in the report.

    Attributes:
        role: ``"teacher"``, ``"student"`` or ``"quantized"``.
        metric: the monitored metric's value on the validation set.
        params: number of parameters.
        size_bytes: size on disk of the saved weights, bytes.
        latency_ms_per_example: CPU inference latency per example, milliseconds.
        train_usd: what training it cost, dollars: this model's own spend (a student's row
            excludes the teacher's; the run's total is the sum of the rows).
        path: where its weights were saved.
        note: what was done and why.
        usd_per_1k_requests: serving dollars per 1,000 requests under the ``Deployment``.
        lifetime_usd: every training dollar the model needed (a student's includes its
            teacher's) plus serving dollars over the deployment's requests.
        value_usd: metric points x ``usd_per_point`` minus ``lifetime_usd``.
        deploy: True for the model to deploy, False for the others; None without a ``Deployment``.
    """

    role: str
    metric: Optional[float] = None
    params: Optional[int] = None
    size_bytes: Optional[int] = None
    latency_ms_per_example: Optional[float] = None
    train_usd: Optional[float] = None
    path: Optional[str] = None
    note: str = ""
    usd_per_1k_requests: Optional[float] = None
    lifetime_usd: Optional[float] = None
    value_usd: Optional[float] = None
    deploy: Optional[bool] = None


class StopStrategy:
    """Base class: override ``on_stop`` (at the stop point) and/or ``after_fit`` (after the fit)."""

    name = "stop"

    def check_before_fit(self) -> None:
        """Raise a ValueError for settings that could only fail after the fit (called at setup,
        before any compute: a strategy used standalone may get them later, a fitted one cannot)."""

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


def cpu_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` on CPU, detached from any Trainer (LightningModule pickles without it).

    Tensors on an accelerator are copied straight to CPU (through ``deepcopy``'s memo), so the
    device never holds two models and the original is not moved.
    """
    memo: dict = {}
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.device.type != "cpu" and id(tensor) not in memo:
            data = tensor.detach().to("cpu")
            memo[id(tensor)] = nn.Parameter(data, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else data
    copied = copy.deepcopy(module, memo)
    return copied.to("cpu")  # (a LightningModule also records its device)
