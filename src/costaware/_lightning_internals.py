"""Every use of Lightning's private internals, in one place.

costaware needs a few things Lightning keeps private: whether this batch is a logging batch,
the step Lightning logs a batch's metrics at, and the fit loop's minimums (a budget cap must
win over ``min_epochs``/``min_steps``). Each is read here, behind a function that says what it
means, so a Lightning release that moves one breaks one function, caught by
``tests/test_lightning_internals.py`` (run against the oldest and newest supported releases by
``scripts/test_versions``). pyproject bounds Lightning below the next minor release for this.
"""

from __future__ import annotations

from typing import Any, Optional


def should_log(trainer: Any) -> bool:
    """Whether Lightning logs this training batch (``log_every_n_steps``), as its own
    ``LearningRateMonitor`` and ``DeviceStatsMonitor`` ask it."""
    return bool(trainer._logger_connector.should_update_logs)


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


def checkpoint_every_n_epochs(checkpoint: Any) -> int:
    """``ModelCheckpoint``'s epoch interval (0: it does not save at epoch ends)."""
    return int(getattr(checkpoint, "_every_n_epochs", 1) or 0)


def checkpoint_every_n_train_steps(checkpoint: Any) -> int:
    """``ModelCheckpoint``'s step interval (0: it does not save by steps)."""
    return int(getattr(checkpoint, "_every_n_train_steps", 0) or 0)


def validation_is_time_based(trainer: Any) -> bool:
    """Whether ``val_check_interval`` is a duration (validation may follow any batch)."""
    return getattr(trainer, "_val_check_time_interval", None) is not None
