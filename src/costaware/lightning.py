"""The costaware callbacks for the ``lightning.pytorch`` namespace (``import lightning as L``).

Example::

    import lightning as L
    from costaware.lightning import CostMonitor

    trainer = L.Trainer(callbacks=[CostMonitor(usd_per_host_hour=0.2)])
"""

from costaware import _lightning
from costaware.callbacks import CALLBACKS

for _logic in CALLBACKS:
    globals()[_logic.__name__] = _lightning.bind(_logic, "lightning.pytorch", __name__)

__all__ = [c.__name__ for c in CALLBACKS]
