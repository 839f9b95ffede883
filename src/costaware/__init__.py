"""costaware: cost-aware training for PyTorch Lightning.

``costaware.CostMonitor`` (and every callback here) is a ``Callback`` of each installed
Lightning namespace (``pytorch_lightning`` and ``lightning.pytorch``): the same class works in
either Trainer and either LightningCLI. They are imported on first use, so ``costaware report``
and friends start without importing Lightning.
"""

from costaware.ledger import Ledger, LedgerError, Totals, read_ledger
from costaware.prices import Prices, make_prices

__version__ = "0.1.0"

_CALLBACK_NAMES = ("CostMonitor", "BudgetCap", "OnlineProbe", "MarginalGainStopping")
_ERRORS = {"BudgetExceededError": "costaware.callbacks.budget_cap", "BudgetWarning": "costaware.callbacks.budget_cap",
           "EarlyStop": "costaware.strategies", "Distill": "costaware.strategies", "Quantize": "costaware.strategies"}


def __getattr__(name: str):
    if name in _CALLBACK_NAMES:
        from costaware import callbacks

        return getattr(callbacks, name)
    if name in _ERRORS:
        from importlib import import_module

        return getattr(import_module(_ERRORS[name]), name)
    raise AttributeError(f"module 'costaware' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_CALLBACK_NAMES, *_ERRORS])


__all__ = ["Ledger", "LedgerError", "Prices", "Totals", "make_prices", "read_ledger", *_CALLBACK_NAMES, *_ERRORS]
