"""costaware: cost-aware training for PyTorch Lightning.

``costaware.CostMonitor`` (and every callback here) is a ``pytorch_lightning.Callback``; the
same callbacks for ``lightning.pytorch`` are in ``costaware.lightning``.
"""

from costaware import _lightning
from costaware.callbacks import CALLBACKS
from costaware.ledger import Ledger, LedgerError, Totals, read_ledger
from costaware.prices import Prices, make_prices

__version__ = "0.1.0"

for _logic in CALLBACKS:
    globals()[_logic.__name__] = _lightning.bind(_logic, "pytorch_lightning", __name__)

__all__ = ["Ledger", "LedgerError", "Prices", "Totals", "make_prices", "read_ledger",
           *(c.__name__ for c in CALLBACKS)]
