"""The batch protocol every strategy shares: what a model is called with, and where the data is.

* ``split_batch(pl_module, batch)`` gives ``(inputs, labels)``: the teacher's
  ``distill_inputs(batch)`` if it defines one, else ``(x, y)`` from a 2-tuple/list batch, else
  a dict batch without its ``"labels"`` (or ``"label"``) key and that key, else
  ``(batch, None)`` for a bare tensor.
* ``call_model(model, inputs)`` calls ``model(**inputs)`` for a dict, ``model(*inputs)`` for a
  tuple or list, ``model(inputs)`` otherwise, and must return logits.

``Distill`` trains and scores with it; ``Quantize`` and the serving measurements call models
through it, so teacher, student and quantized model are all called the same way.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch

from costaware.deploy import to_device

__all__ = ["call_model", "count_examples", "split_batch", "to_device", "train_loader", "val_loader"]


def split_batch(pl_module: Any, batch: Any, inputs_fn: Optional[Callable[[Any], tuple]] = None) -> tuple[Any, Any]:
    """``(inputs, labels)`` of a batch: ``inputs_fn``, the module's ``distill_inputs``, or a default.

    Defaults: a 2-tuple/list batch is ``(x, y)``, a 1-tuple/list ``(x, None)``; a dict batch is its other keys and its
    ``"labels"`` (or ``"label"``) value; a tensor is ``(batch, None)``.

    Raises:
        TypeError: a batch none of these fit, saying what to define.
    """
    if inputs_fn is not None:
        return _pair(inputs_fn(batch), "inputs_fn")
    own = getattr(pl_module, "distill_inputs", None)
    if callable(own):
        return _pair(own(batch), f"{type(pl_module).__name__}.distill_inputs")
    if isinstance(batch, dict):
        for key in ("labels", "label"):
            if key in batch:
                return {k: v for k, v in batch.items() if k != key}, batch[key]
        return dict(batch), None
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, (tuple, list)) and len(batch) == 1:
        return batch[0], None
    if isinstance(batch, torch.Tensor):
        return batch, None
    raise TypeError(
        f"costaware cannot tell a model's inputs from its labels in a batch of type {type(batch).__name__}: "
        "define `distill_inputs(self, batch) -> (inputs, labels)` on the LightningModule (inputs: a tensor, a tuple "
        "of positional arguments or a dict of keyword arguments of forward; labels: class indices or None), or pass "
        "inputs_fn=..."
    )


def _pair(result: Any, where: str) -> tuple[Any, Any]:
    if not (isinstance(result, (tuple, list)) and len(result) == 2):
        raise TypeError(f"{where} must return (inputs, labels), got {type(result).__name__}")
    return result[0], result[1]


def call_model(model: Any, inputs: Any) -> torch.Tensor:
    """``model(**inputs)`` for a dict, ``model(*inputs)`` for a tuple/list, else ``model(inputs)``."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def count_examples(inputs: Any, labels: Any) -> int:
    """Examples in a batch: the labels' length, else the first tensor's first dimension."""
    if isinstance(labels, torch.Tensor) and labels.dim() > 0:
        return int(labels.shape[0])
    values = inputs.values() if isinstance(inputs, dict) else inputs if isinstance(inputs, (tuple, list)) else [inputs]
    for value in values:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return 1


def val_loader(trainer: Any) -> Optional[Iterable]:
    """The Trainer's (first) validation ``DataLoader``, or None."""
    loaders = getattr(trainer, "val_dataloaders", None)
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    elif isinstance(loaders, dict):
        loaders = next(iter(loaders.values()), None)
    return loaders


def train_loader(trainer: Any) -> Optional[Iterable]:
    """The Trainer's (first) training ``DataLoader``, else its datamodule's, or None."""
    loaders = getattr(trainer, "train_dataloader", None)
    if loaders is None and getattr(trainer, "datamodule", None) is not None:
        loaders = trainer.datamodule.train_dataloader()
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    elif isinstance(loaders, dict):
        loaders = next(iter(loaders.values()), None)
    return loaders
