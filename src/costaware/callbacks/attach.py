"""The run's one ``CostMonitor``, found or added for a callback that reads it.

``BudgetCap`` and ``MarginalGainStopping`` work alone (they add a monitor) or next to one the
user added (they read it). Either way the monitor sits before them in ``trainer.callbacks``, so
its batch hooks have updated the totals by the time theirs run.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Optional

from lightning_utilities.core.rank_zero import rank_zero_warn

from costaware.callbacks.cost_monitor import CostMonitor


def check_monitor_kwargs(given: dict, extra: Optional[dict]) -> dict:
    """Validate the arguments for a CostMonitor, by building one (it checks every value)."""
    if extra is not None and not isinstance(extra, dict):
        raise ValueError(f"monitor_kwargs must be a dict of CostMonitor arguments, got {extra!r}")
    accepted = [p for p in inspect.signature(CostMonitor.__init__).parameters if p != "self"]
    for key in extra or {}:
        if key not in accepted:
            raise ValueError(f"monitor_kwargs has an unknown key {key!r}: CostMonitor accepts {', '.join(accepted)}")
        if key in given:
            raise ValueError(f"{key} is given twice (as an argument and in monitor_kwargs)")
    kwargs = {**given, **(extra or {})}
    CostMonitor(**kwargs)  # raises ValueError naming a bad price, country, meter setting...
    return kwargs


def attach_cost_monitor(owner: Any, trainer: Any, pl_module: Any, stage: str, monitor_kwargs: dict,
                        ours: Optional[Any], warning_category: type = UserWarning) -> tuple[Any, bool]:
    """The run's CostMonitor, placed just before ``owner`` in ``trainer.callbacks``.

    Lightning calls ``setup`` walking ``trainer.callbacks`` in place: a monitor inserted (or
    moved) at the owner's index is not reached by that walk, so its ``setup`` is called here; its
    later hooks (and its ``state_dict`` in checkpoints) run as for any callback.

    Args:
        owner: the callback that reads the monitor.
        monitor_kwargs: arguments for a monitor the owner adds; a warning says they are ignored
            when the Trainer already has one that the owner did not add.
        ours: the monitor the owner added in an earlier fit, if any.
        warning_category: the owner's warning class.

    Returns:
        ``(monitor, added)``: ``added`` is True when the owner created it now.
    """
    callbacks = trainer.callbacks
    me = next(i for i, cb in enumerate(callbacks) if cb is owner)
    found = [i for i, cb in enumerate(callbacks) if isinstance(cb, CostMonitor)]
    name = type(owner).__name__
    if not found:
        monitor = _monitor_class(owner)(**monitor_kwargs)
        callbacks.insert(me, monitor)
        monitor.setup(trainer, pl_module, stage)
        return monitor, True
    monitor = callbacks[found[0]]
    if len(found) > 1:
        rank_zero_warn(f"costaware: several CostMonitors in the Trainer's callbacks; {name} reads the first",
                       category=warning_category)
    if monitor_kwargs and monitor is not ours:
        rank_zero_warn(f"costaware: {name}'s monitor arguments {sorted(monitor_kwargs)} are ignored: "
                       "the Trainer already has a CostMonitor, whose prices apply", category=warning_category)
    if found[0] > me:
        callbacks.pop(found[0])
        callbacks.insert(me, monitor)
        monitor.setup(trainer, pl_module, stage)
    return monitor, False


class MonitorAttachment:
    """An owner's CostMonitor across fits: attached once per fit, and whether the owner added it.

    Inserting the monitor before its owner shifts the owner one place on in the list Lightning
    is walking for ``setup``, so the owner's ``setup`` is called twice: the second call is a no-op.
    The owner calls :meth:`release` at fit start, on an exception and at teardown, so that a
    later fit (of the same Trainer too, after one that failed in setup) attaches again.
    """

    def __init__(self) -> None:
        self.owned = False  # the owner added the monitor (its arguments are then not ignored)
        self._trainer: Optional[Any] = None  # the Trainer being set up, between setup and release

    def attach(self, owner: Any, trainer: Any, pl_module: Any, stage: str, monitor_kwargs: dict,
               current: Optional[Any], warning_category: type = UserWarning) -> Optional[Any]:
        """The monitor ``owner`` reads: found or added for a fit, else ``current`` unchanged."""
        if stage != "fit" or self._trainer is trainer:
            return current
        self._trainer = trainer
        monitor, added = attach_cost_monitor(owner, trainer, pl_module, stage, monitor_kwargs,
                                             current if self.owned else None, warning_category)
        self.owned = self.owned or added
        return monitor

    def release(self) -> None:
        self._trainer = None


def _monitor_class(owner: Any) -> type:
    """``CostMonitor`` bound to the same Lightning namespace as ``owner``."""
    for base in type(owner).__mro__:
        module = getattr(base, "__module__", "") or ""
        if base.__name__ == "Callback" and module.startswith("lightning.pytorch"):
            return importlib.import_module("costaware.lightning").CostMonitor
        if base.__name__ == "Callback" and module.startswith("pytorch_lightning"):
            return importlib.import_module("costaware").CostMonitor
    name = type(owner).__name__
    raise TypeError(f"{name} must be used as costaware.{name} or costaware.lightning.{name}")
