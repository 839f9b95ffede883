"""The Lightning callbacks, as namespace-free classes; ``costaware`` binds them to a namespace."""

from costaware.callbacks.cost_monitor import CostMonitor

CALLBACKS = (CostMonitor,)

__all__ = ["CALLBACKS", "CostMonitor"]
