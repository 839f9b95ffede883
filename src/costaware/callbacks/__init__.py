"""The Lightning callbacks, as namespace-free classes; ``costaware`` binds them to a namespace."""

from costaware.callbacks.budget_cap import BudgetCap
from costaware.callbacks.cost_monitor import CostMonitor
from costaware.callbacks.marginal_gain import MarginalGainStopping
from costaware.callbacks.online_probe import OnlineProbe

CALLBACKS = (CostMonitor, BudgetCap, OnlineProbe, MarginalGainStopping)

__all__ = ["CALLBACKS", "BudgetCap", "CostMonitor", "MarginalGainStopping", "OnlineProbe"]
