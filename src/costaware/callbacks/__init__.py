"""The Lightning callbacks. Each is one class, a ``Callback`` of every installed Lightning
namespace (``pytorch_lightning`` and ``lightning.pytorch``), so it works in either Trainer and CLI."""

from costaware.callbacks.budget_cap import BudgetCap
from costaware.callbacks.cost_monitor import CostMonitor
from costaware.callbacks.marginal_gain import MarginalGainStopping
from costaware.callbacks.online_probe import OnlineProbe

CALLBACKS = (CostMonitor, BudgetCap, OnlineProbe, MarginalGainStopping)

__all__ = ["CALLBACKS", "BudgetCap", "CostMonitor", "MarginalGainStopping", "OnlineProbe"]
