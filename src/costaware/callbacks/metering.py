"""Which ``CostMeter`` a costaware callback reads, found by type, never by rewiring the Trainer.

The run has one meter. It is the ``CostMonitor``'s when the Trainer has one; otherwise the
``own_meter`` of the first callback in ``trainer.callbacks`` that can meter alone (``BudgetCap``,
``MarginalGainStopping``), which then drives it: starts it, logs ``cost/*`` and writes the
ledger and report. Every other callback only reads it.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Optional

from lightning_utilities.core.rank_zero import rank_zero_warn

from costaware.callbacks.cost_monitor import CostMonitor
from costaware.meter import METER_ARGS, PRICE_ARGS, PRICE_HINT, CostMeter

if TYPE_CHECKING:
    import pytorch_lightning as pl


def make_own_meter(given: dict, extra: Optional[dict]) -> CostMeter:
    """The meter a callback drives when it meters alone: ``given`` prices plus ``monitor_kwargs``
    (``extra``), validated now by building it (it checks every value)."""
    if extra is not None and not isinstance(extra, dict):
        raise ValueError(f"monitor_kwargs must be a dict of CostMonitor arguments, got {extra!r}")
    accepted = [p for p in inspect.signature(CostMeter.__init__).parameters if p != "self"]
    for key in extra or {}:
        if key not in accepted:
            raise ValueError(f"monitor_kwargs has an unknown key {key!r}: CostMonitor accepts {', '.join(accepted)}")
        if key in given:
            raise ValueError(f"{key} is given twice (as an argument and in monitor_kwargs)")
    return CostMeter(**{**given, **(extra or {})})


def run_meter(trainer: pl.Trainer) -> Optional[CostMeter]:
    """The run's meter: the first CostMonitor's, else the first ``own_meter`` among the callbacks."""
    callbacks = _callbacks(trainer)
    for cb in callbacks:
        if isinstance(cb, CostMonitor):
            return cb.meter
    return next((cb.own_meter for cb in callbacks if isinstance(getattr(cb, "own_meter", None), CostMeter)),
                None)


def find_meter(trainer: pl.Trainer, me: Any, category: type = UserWarning) -> CostMeter:
    """The run's meter for callback ``me`` (whose ``own_meter`` is used if no other applies).

    Warns when ``me`` was given prices that do not apply because another meter is the run's (not those given the
    same to both); a setting given to both with different values is a ValueError (at setup, before compute).
    """
    monitors = [cb for cb in _callbacks(trainer) if isinstance(cb, CostMonitor)]
    name = type(me).__name__
    if len(monitors) > 1:
        rank_zero_warn(f"costaware: several CostMonitors in the Trainer's callbacks; {name} reads the first",
                       category=category)
    meter = run_meter(trainer)
    assert meter is not None  # ``me`` has an own_meter
    if meter is not me.own_meter and _given(me.own_meter):
        metered_by = "the Trainer's CostMonitor" if monitors else "another costaware callback"
        mine, theirs = _given(me.own_meter), _given(meter)
        clashes = {k: (v, theirs[k]) for k, v in mine.items() if k in theirs and theirs[k] != v}
        if clashes:  # two prices for one run: neither can be assumed right
            detail = "; ".join(f"{k}={a!r} here, {b!r} there" for k, (a, b) in sorted(clashes.items()))
            raise ValueError(f"costaware: {name} and {metered_by}, which meters the run, were given different "
                             f"settings ({detail}): give prices once, on the callback that meters the run")
        ignored = sorted(k for k in mine if k not in theirs)  # one given the same on both is not ignored: it agrees
        if ignored:  # (the presets callbacks/cost_monitor.yaml and marginal_gain.yaml both say country: USA)
            rank_zero_warn(f"costaware: {name}'s monitor arguments {ignored} are ignored: the run is metered by "
                           f"{metered_by}, whose prices apply", category=category)
    return meter


def meter_stage_from_checkpoint(me: Any, trainer: pl.Trainer, stage: str) -> None:
    """A ``test``, ``validate`` or ``predict`` (``stage``, now running) in a process that ran no fit: ``me``
    meters it for the run that saved the checkpoint when ``me``'s own meter is the run's, as for a fit."""
    if trainer.state.fn != stage:  # (a fit's validation: the common case, decided without the callback list)
        return
    meter = run_meter(trainer)
    if meter is not None and meter is me.own_meter:
        meter.begin_stage_from_checkpoint(trainer, stage)


def check_priced(meter: CostMeter, owner: str, argument: str) -> None:
    """A dollar cap or a price per point with nothing priced is a configuration error (at fit
    start, once every meter is started and the GPU known, before any compute)."""
    if meter.dollars_priced() is False:
        raise ValueError(f"{owner}({argument}=...) needs dollars, but no price applies (no GPU price, "
                         f"usd_per_host_hour=0, no energy price): the run would cost $0 and it could never act. "
                         f"{PRICE_HINT[0].upper()}{PRICE_HINT[1:]} (on the CostMonitor, if the Trainer has one)")


def _given(meter: CostMeter) -> dict:
    """The meter's arguments that differ from the defaults (what the user gave)."""
    defaults = {p.name: p.default for p in inspect.signature(CostMeter.__init__).parameters.values()
                if p.name in PRICE_ARGS + METER_ARGS}
    return {k: v for k, v in meter.settings().items() if v != defaults.get(k)}


def _callbacks(trainer: Any) -> list:
    """``trainer.callbacks``: Lightning's callback connector sets it, but ``Trainer`` does not declare it."""
    return trainer.callbacks
