"""The costaware callbacks, for ``import lightning as L`` users (an alias of ``costaware``).

Every costaware callback is a ``Callback`` of each installed Lightning namespace, so
``costaware.CostMonitor`` and ``costaware.lightning.CostMonitor`` are the same class, accepted by
``lightning.pytorch.Trainer`` and ``pytorch_lightning.Trainer`` alike. This module stays for the
code and configs that name it.

Example::

    import lightning as L
    from costaware.lightning import CostMonitor

    trainer = L.Trainer(callbacks=[CostMonitor(usd_per_host_hour=0.2)])
"""

from costaware.callbacks import BudgetCap, CostMonitor, MarginalGainStopping, OnlineProbe

__all__ = ["BudgetCap", "CostMonitor", "MarginalGainStopping", "OnlineProbe"]
