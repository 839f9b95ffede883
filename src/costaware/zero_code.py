"""Zero-code attach: Lightning's ``callbacks_factory`` entry points, active only when asked.

Lightning calls every registered factory when a ``Trainer`` is built. These return nothing unless
the environment asks for costaware, so installing the package changes no one's runs::

    COSTAWARE=1 python train.py                                   # meter any existing script
    COSTAWARE_MAX_USD=5 COSTAWARE_USD_PER_GPU_HOUR=2.5 python train.py   # ... and cap it

``COSTAWARE_<ARG>`` sets the callback argument ``<arg>`` (prices, carbon and ledger settings of
``CostMonitor``; ``max_*``, ``on_cap`` of ``BudgetCap``). A ``COSTAWARE_MAX_*`` adds a
``BudgetCap`` (which meters the run itself); otherwise ``COSTAWARE=1`` adds a ``CostMonitor``.
``COSTAWARE=0`` turns it all off. A misspelt variable or a bad value is an error naming it,
raised when the Trainer is built, before any compute. A Trainer whose code already meters the run
(a costaware callback) keeps its meter and prices, as two meters would count the run twice: the
environment's prices are not applied (a warning says so), its caps are (unless the code has a
``BudgetCap``). A Trainer that costaware builds itself (Distill's student) gets nothing.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any, Callable, Mapping, Optional

PREFIX = "COSTAWARE_"
_SWITCH = "COSTAWARE"

# argument -> parser, for the arguments a shell user may set.
_PRICE_ARGS: dict[str, Callable[[str], Any]] = {
    "gpu": str, "usd_per_gpu_hour": float, "usd_per_host_hour": float, "usd_per_kwh": float, "pue": float,
    "mode": str, "country": str, "region": str, "cloud_provider": str, "cloud_region": str, "g_co2_per_kwh": float,
}
_MONITOR_ONLY_ARGS: dict[str, Callable[[str], Any]] = {"ledger_dir": str, "sample_interval_s": float}
_CAP_ARGS: dict[str, Callable[[str], Any]] = {
    "max_usd": float, "max_kwh": float, "max_co2_kg": float, "max_gpu_hours": float, "max_flops": float,
    "max_time": str, "on_cap": str,
}
_ALL_ARGS = {**_PRICE_ARGS, **_MONITOR_ONLY_ARGS, **_CAP_ARGS}


def settings_from_environment(environ: Mapping[str, str]) -> Optional[dict[str, Any]]:
    """The callback arguments the environment sets, parsed; None when costaware is not asked for.

    Raises:
        ValueError: a ``COSTAWARE_*`` variable that names no argument, or a value of the wrong type.
    """
    switch = environ.get(_SWITCH, "").strip().lower()
    if switch in ("0", "false", "no", "off"):
        return None
    if switch not in ("", "1", "true", "yes", "on"):
        raise ValueError(f"{_SWITCH}={environ[_SWITCH]!r}: use 1 to meter the run, 0 to turn costaware off")
    settings: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(PREFIX):
            continue
        arg = name[len(PREFIX):].lower()
        if arg not in _ALL_ARGS:
            accepted = ", ".join(PREFIX + a.upper() for a in _ALL_ARGS)
            raise ValueError(f"{name} is not a costaware setting; accepted: {_SWITCH}, {accepted}")
        try:
            settings[arg] = _ALL_ARGS[arg](raw)
        except ValueError:
            raise ValueError(f"{name}={raw!r} is not a valid {_ALL_ARGS[arg].__name__}") from None
    if not switch and not any(arg.startswith("max_") for arg in settings):
        return None  # prices alone (say, in a shell profile) do not turn metering on
    return settings


def callbacks_for(namespace_module: Any, environ: Mapping[str, str], given: Optional[list] = None) -> list:
    """The callbacks the environment asks for, from ``namespace_module`` (costaware or costaware.lightning).

    With a callback in ``given`` (the Trainer's, from code) that meters the run already (a
    ``CostMonitor``, or one that can meter alone: ``BudgetCap``, ``MarginalGainStopping``), its
    prices apply: the environment's price and ledger settings are not, and a cap the environment
    asks for is added as a ``BudgetCap`` that reads that meter (unless the code has a cap already).
    """
    settings = settings_from_environment(environ)
    if settings is None:
        return []
    caps = {k: v for k, v in settings.items() if k in _CAP_ARGS}
    if "on_cap" in caps and not any(arg.startswith("max_") for arg in caps):
        raise ValueError(f"{PREFIX}ON_CAP is set but no {PREFIX}MAX_* cap is")
    metering = sorted({type(cb).__name__ for cb in given or () if _meters(cb)})
    if not metering:
        if caps:
            monitor_args = {k: v for k, v in settings.items() if k in _MONITOR_ONLY_ARGS}
            prices = {k: v for k, v in settings.items() if k in _PRICE_ARGS}
            return [namespace_module.BudgetCap(**caps, **prices, monitor_kwargs=monitor_args or None)]
        return [namespace_module.CostMonitor(**settings)]
    from costaware.callbacks.budget_cap import BudgetCap

    capped = any(isinstance(cb, BudgetCap) for cb in given or ())
    added = [namespace_module.BudgetCap(**caps)] if caps and not capped else []
    not_applied = sorted(PREFIX + k.upper() for k in settings if k not in _CAP_ARGS or capped)
    if not_applied:
        warnings.warn(f"costaware: this Trainer already has {', '.join(metering)} in code, which meters the run: "
                      f"{', '.join(not_applied)} not applied" + (" (the BudgetCap in code applies)" if capped and caps
                                                                 else ""), RuntimeWarning, stacklevel=2)
    return added


def _meters(callback: Any) -> bool:
    """Whether a callback given in code meters the run (an OnlineProbe, say, only reads a meter)."""
    from costaware.callbacks.cost_monitor import CostMonitor
    from costaware.meter import CostMeter

    return isinstance(callback, CostMonitor) or isinstance(getattr(callback, "own_meter", None), CostMeter)


def _built_by_costaware() -> bool:
    """Whether costaware itself is building this Trainer (Distill's student fit): the environment
    is the user's script's business, not the student's."""
    frame = sys._getframe(1)
    while frame is not None:
        if str(frame.f_globals.get("__name__", "")).startswith("costaware.strategies"):
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


def pytorch_lightning_callbacks() -> list:
    """Entry point ``pytorch_lightning.callbacks_factory``."""
    import costaware
    from costaware import _lightning_internals as internals

    if _built_by_costaware():
        return []
    return callbacks_for(costaware, os.environ, internals.callbacks_given_to_trainer_being_built())


def lightning_callbacks() -> list:
    """Entry point ``lightning.pytorch.callbacks_factory``."""
    import costaware.lightning
    from costaware import _lightning_internals as internals

    if _built_by_costaware():
        return []
    return callbacks_for(costaware.lightning, os.environ, internals.callbacks_given_to_trainer_being_built())
