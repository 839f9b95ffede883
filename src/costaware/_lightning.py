"""The one place that chooses between ``pytorch_lightning`` and ``lightning.pytorch``.

The two packages are separate class hierarchies: a ``pytorch_lightning.Trainer`` rejects a
``lightning.pytorch.Callback`` and LightningCLI rejects a callback of the other one. So each
callback is written once as a namespace-free class and bound here to each namespace's
``Callback`` base. ``costaware.X`` is the ``pytorch_lightning`` flavour (the package the product
names); ``costaware.lightning.X`` is the ``lightning.pytorch`` flavour.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Optional

NAMESPACES = ("pytorch_lightning", "lightning.pytorch")
DEFAULT_NAMESPACE = "pytorch_lightning"


def load(namespace: str) -> ModuleType:
    """Import a Lightning namespace, with an error that names the accepted values."""
    if namespace not in NAMESPACES:
        raise ValueError(f"namespace={namespace!r} is not one of {NAMESPACES}")
    return importlib.import_module(namespace)


def namespace_of(obj: Any) -> Optional[str]:
    """The namespace an object (or class) belongs to, found from its bases' modules; None if neither.

    So that a helper built for a fit (a Trainer, a LightningModule) uses the fit's own namespace.
    """
    cls = obj if isinstance(obj, type) else type(obj)
    for base in cls.__mro__:
        module = getattr(base, "__module__", "") or ""
        for namespace in NAMESPACES:
            if module == namespace or module.startswith(namespace + "."):
                return namespace
    return None


def bind(logic: type, namespace: str, module: str) -> type:
    """Make a concrete ``Callback`` subclass of ``namespace`` from a namespace-free class.

    ``module`` is where the class is exposed, so that LightningCLI's ``class_path`` and pickling
    find it by name.
    """
    callback_base = load(namespace).Callback
    return type(
        logic.__name__,
        (logic, callback_base),
        {"__module__": module, "__qualname__": logic.__name__, "__doc__": logic.__doc__},
    )
