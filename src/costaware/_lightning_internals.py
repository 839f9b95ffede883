"""Every use of Lightning's private internals, in one place.

costaware needs a few things Lightning keeps private: whether this batch is a logging batch,
the step Lightning logs a batch's metrics at, and the fit loop's minimums (a budget cap must
win over ``min_epochs``/``min_steps``). Each is read here, behind a function that says what it
means, so a Lightning release that moves one breaks one function, caught by
``tests/test_lightning_internals.py`` (run against the oldest and newest supported releases by
``scripts/test_versions``). pyproject bounds Lightning below the next minor release for this.
"""

from __future__ import annotations

import sys
from typing import Any, Optional


def should_log(trainer: Any) -> bool:
    """Whether Lightning logs this training batch (``log_every_n_steps``), as its own
    ``LearningRateMonitor`` and ``DeviceStatsMonitor`` ask it.

    Called from ``on_train_batch_end`` on every batch, so the fit loop's branch of the logger
    connector's ``should_update_logs`` is computed here directly: the property first works out
    which loop is active (``trainer.training``, an enum comparison), a few microseconds a batch.
    """
    every = trainer.log_every_n_steps
    if not every:
        return False
    return (trainer.fit_loop.epoch_loop._batches_that_stepped + 1) % every == 0 or bool(trainer.should_stop)


def logging_step(trainer: Any) -> int:
    """The step Lightning logs the current batch's metrics at (optimizer steps taken, before
    the current one), so figures sent straight to the loggers line up with the run's own."""
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


def minimums_met(trainer: Any) -> bool:
    """Whether ``min_epochs``/``min_steps`` are met (the fit loop ignores ``should_stop`` before)."""
    return bool(getattr(trainer.fit_loop, "_can_stop_early", True))


def read_minimums(trainer: Any) -> tuple[Optional[int], Optional[int]]:
    """``(min_epochs, min_steps)`` as the fit loop enforces them."""
    return trainer.fit_loop.min_epochs, trainer.fit_loop.epoch_loop.min_steps


def write_minimums(trainer: Any, minimums: tuple[Optional[int], Optional[int]]) -> None:
    """Set the fit loop's ``(min_epochs, min_steps)`` (None, None clears them)."""
    trainer.fit_loop.min_epochs, trainer.fit_loop.epoch_loop.min_steps = minimums


def restores_after_fit_start(trainer: Any) -> bool:
    """Whether a resumed fit's checkpoint reaches callbacks only after ``on_fit_start``.

    Strategies that restore after their own setup (FSDP, DeepSpeed, model parallel) call
    ``load_state_dict`` between ``on_fit_start`` and the sanity check; whether a checkpoint is
    given is not known yet in ``on_fit_start`` (``trainer.ckpt_path`` is set by the restore).
    """
    return bool(getattr(getattr(trainer, "strategy", None), "restore_checkpoint_after_setup", False))


def checkpoint_every_n_epochs(checkpoint: Any) -> int:
    """``ModelCheckpoint``'s epoch interval (0: it does not save at epoch ends)."""
    return int(getattr(checkpoint, "_every_n_epochs", 1) or 0)


def checkpoint_every_n_train_steps(checkpoint: Any) -> int:
    """``ModelCheckpoint``'s step interval (0: it does not save by steps)."""
    return int(getattr(checkpoint, "_every_n_train_steps", 0) or 0)


def validation_is_time_based(trainer: Any) -> bool:
    """Whether ``val_check_interval`` is a duration (validation may follow any batch)."""
    return getattr(trainer, "_val_check_time_interval", None) is not None


def publish_metrics(trainer: Any, metrics: dict, prog_bar: tuple = ()) -> None:
    """Make ``metrics`` (name -> float) monitorable as if logged with ``pl_module.log``, without it.

    Each ``pl_module.log`` call walks Lightning's result collection (hundreds of microseconds,
    every logging step), so costaware puts its figures straight into the trainer's callback
    metrics (what ``EarlyStopping`` and ``ModelCheckpoint`` read), its logged metrics and, for
    ``prog_bar`` keys, its progress-bar metrics: the dicts behind ``trainer.callback_metrics``,
    ``trainer.logged_metrics`` and ``trainer.progress_bar_metrics``. The loggers get them from
    :func:`costaware.meter.log_at_lightning_step`.
    """
    import torch

    connector = trainer._logger_connector
    values = torch.tensor([float(value) for value in metrics.values()]).unbind()  # one tensor, not one per key
    tensors = dict(zip(metrics, values))
    connector._callback_metrics.update(tensors)
    connector._logged_metrics.update(tensors)
    for key in prog_bar:
        if key in metrics:
            connector._progress_bar_metrics[key] = float(metrics[key])


def callbacks_given_to_trainer_being_built() -> Optional[list]:
    """The callbacks already in the Trainer whose ``__init__`` is calling the ``callbacks_factory``
    entry points, or None if no Trainer is being built up the stack.

    Lightning calls a factory without arguments, from ``CallbackConnector.on_trainer_init`` after
    it has set the user's callbacks: the connector (and so the Trainer) is found on the stack.
    """
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "on_trainer_init":
            trainer = getattr(frame.f_locals.get("self"), "trainer", None)
            callbacks = getattr(trainer, "callbacks", None)
            if isinstance(callbacks, list):
                return list(callbacks)
        frame = frame.f_back  # type: ignore[assignment]
    return None
