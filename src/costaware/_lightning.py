"""The one place that knows about the two Lightning namespaces.

``pytorch_lightning`` and ``lightning.pytorch`` are separate class hierarchies: a
``pytorch_lightning.Trainer`` rejects a ``lightning.pytorch.Callback`` and each LightningCLI
rejects a callback of the other. So every costaware callback is one class whose bases are
:data:`CALLBACK_BASES`: the ``Callback`` of *each installed* namespace. The same class then
works in either Trainer, and ``costaware.CostMonitor`` is a valid ``class_path`` for either
LightningCLI (``costaware.lightning.CostMonitor`` is the same class, kept as an alias).
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import Any, Optional

NAMESPACES = ("pytorch_lightning", "lightning.pytorch")
DEFAULT_NAMESPACE = "pytorch_lightning"

def installed() -> tuple[str, ...]:
    """The namespaces importable here (``pytorch_lightning`` is a dependency; ``lightning`` is optional)."""
    found = []
    for namespace in NAMESPACES:
        try:
            spec = importlib.util.find_spec(namespace)
        except ModuleNotFoundError:  # ``lightning`` itself missing, for ``lightning.pytorch``
            spec = None
        if spec is not None:
            found.append(namespace)
    return tuple(found)


def load(namespace: str) -> ModuleType:
    """Import a Lightning namespace, with an error that names the accepted values."""
    if namespace not in NAMESPACES:
        raise ValueError(f"namespace={namespace!r} is not one of {NAMESPACES}")
    return importlib.import_module(namespace)


def namespace_of(obj: Any) -> Optional[str]:
    """The namespace an object (or class) belongs to, found from its bases' modules; None if neither.

    So that a helper built for a fit (the student's LightningModule) uses the fit's own namespace.
    """
    cls = obj if isinstance(obj, type) else type(obj)
    for base in cls.__mro__:
        module = getattr(base, "__module__", "") or ""
        for namespace in NAMESPACES:
            if module == namespace or module.startswith(namespace + "."):
                return namespace
    return None


def _callback_bases() -> tuple[type, ...]:
    return tuple(load(namespace).Callback for namespace in installed())


#: The ``Callback`` classes every costaware callback derives from, one per installed namespace.
CALLBACK_BASES: tuple[type, ...] = _callback_bases()
