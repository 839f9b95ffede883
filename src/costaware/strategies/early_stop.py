"""``EarlyStop``: stop, and keep the best weights the run has seen.

Also home to the small helpers every strategy uses to describe a model in the report's
teacher / student / quantized table (parameters, size on disk, CPU latency, a metric on the
validation set) and the batch protocol they share:

* ``split_batch(pl_module, batch)`` gives ``(inputs, labels)``: the teacher's
  ``distill_inputs(batch)`` if it defines one, else ``(x, y)`` from a 2-tuple/list batch, else
  a dict batch without its ``"labels"`` (or ``"label"``) key and that key, else
  ``(batch, None)`` for a bare tensor.
* ``call_model(model, inputs)`` calls ``model(**inputs)`` for a dict, ``model(*inputs)`` for a
  tuple or list, ``model(inputs)`` otherwise, and must return logits.
"""

from __future__ import annotations

import io
import math
import time
from typing import Any, Callable, Iterable, Optional

import torch
from lightning_utilities.core.rank_zero import rank_zero_info

from costaware._torch import device_of
from costaware.strategies.base import ModelRow, StopContext, StopStrategy, restore_training_modes, training_modes
from costaware.validation import check_count

_MODES = ("max", "min")


class EarlyStop(StopStrategy):
    r"""Stop the run and keep the best weights seen at any validation.

    ``MarginalGainStopping``'s default ``then``. At each validation (not the sanity check) it
    compares the monitored value with the best so far and, on an improvement, keeps a CPU copy
    of the weights; at the end of the fit it loads that copy back into the LightningModule, so
    what you save or test afterwards is the best model, not the last. With a stop decided late
    (the policy needs a few evaluations past the knee to be sure), the last weights are often
    slightly worse than the best.

    What is copied: parameters with ``requires_grad=True`` plus the module's buffers, since
    frozen parameters cannot change during training. For LoRA that is the adapters and the head
    (under a megabyte for MiniLM); for full fine-tuning it is the whole ``state_dict`` (one CPU
    copy of the weights, taken only on improvements). ``copy_frozen=True`` copies frozen
    parameters too, for code that changes them in place. Sharded models (FSDP, DeepSpeed) are
    not supported: each rank would copy its shard only.

    Its report row (role ``"teacher"``) holds the best value of the monitored metric, the
    parameter count, the size of the saved ``state_dict``, the CPU latency per example on a few
    validation batches (when the LightningModule can be called on them, see this module's batch
    protocol) and the teacher's training cost.

    Args:
        restore_best: load the best weights back at the end of the fit. False only records the
            best value and step.
        copy_frozen: also copy parameters with ``requires_grad=False``.
        latency_batches: validation batches timed for the latency figure (after one warm-up
            batch); 0 skips it.

    Raises:
        ValueError: at construction, for a non-bool flag or a negative ``latency_batches``.

    Example::

        from costaware import MarginalGainStopping
        from costaware.strategies import EarlyStop

        stopping = MarginalGainStopping(monitor="val_acc", usd_per_point=0.5, then=EarlyStop())
    """

    name = "early_stop"

    def __init__(self, restore_best: bool = True, copy_frozen: bool = False, latency_batches: int = 3) -> None:
        for arg, value in (("restore_best", restore_best), ("copy_frozen", copy_frozen)):
            if not isinstance(value, bool):
                raise ValueError(f"{arg} must be True or False, got {value!r}")
        self.restore_best = restore_best
        self.copy_frozen = copy_frozen
        self.latency_batches = check_count("latency_batches", latency_batches)
        self.best_value: Optional[float] = None
        self.best_step: Optional[int] = None
        self.last_value: Optional[float] = None  # the latest finite validation value
        self._best_state: Optional[dict] = None
        self.note = ""  # what after_fit did with the weights

    # ------------------------------------------------------------------------------------------
    # Hooks called by MarginalGainStopping
    # ------------------------------------------------------------------------------------------

    def on_validation(self, context: StopContext, value: float) -> None:
        """At each validation: keep a copy of the weights if ``value`` is the best so far."""
        if context.mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {context.mode!r}")
        if not math.isfinite(value):
            return
        self.last_value = float(value)
        best = self.best_value
        if best is not None and (value <= best if context.mode == "max" else value >= best):
            return
        self.best_value = float(value)
        self.best_step = int(context.trainer.global_step)
        self._best_state = copy_state(context.pl_module, self.copy_frozen) if self.restore_best else None

    def after_fit(self, context: StopContext) -> list[ModelRow]:
        """Restore the best weights; return the teacher's row."""
        note, metric = "last weights", self.last_value
        if self.restore_best and self._best_state is not None:
            context.pl_module.load_state_dict(self._best_state, strict=False)
            note, metric = f"best weights (step {self.best_step}) restored", self.best_value
            rank_zero_info(f"costaware: EarlyStop restored the best weights: {context.metric_name}="
                           f"{self.best_value:.6g} at step {self.best_step}")
        elif self.best_step is not None and self.restore_best:
            # The best was seen before a resume: checkpoints hold the model, not this copy.
            note = f"best at step {self.best_step}, before the resume, not kept in memory; last weights kept"
        elif self.best_step is not None:
            note = f"best at step {self.best_step}; last weights kept (restore_best=False)"
        self._best_state = None  # a CPU copy of the weights: free it
        self.note = note
        timed = getattr(context.trainer, "is_global_zero", True)  # rank zero only: others need no CPU copy
        row = describe_model(context.pl_module, "teacher", loader=val_loader(context.trainer),
                             split=lambda batch: split_batch(context.pl_module, batch),
                             latency_batches=self.latency_batches if timed else 0,
                             train_usd=context.monitor.totals.usd if context.monitor is not None else None)
        row.metric = metric
        which = "best validation" if metric == self.best_value else "last validation"
        row.note = "; ".join(x for x in (f"{context.metric_name} ({which})" if context.metric_name else "",
                                         note, row.note) if x)
        return [row]

    def state_dict(self) -> dict:
        """The best value and step (not the weights: a checkpoint already holds the model)."""
        return {"best_value": self.best_value, "best_step": self.best_step, "last_value": self.last_value}

    def load_state_dict(self, state_dict: dict) -> None:
        """Also loads older checkpoints, whose ``stop_step`` entry is ignored."""
        self.best_value = state_dict.get("best_value")
        self.best_step = state_dict.get("best_step")
        self.last_value = state_dict.get("last_value")


# ----------------------------------------------------------------------------------------------
# Copying weights
# ----------------------------------------------------------------------------------------------


def copy_state(module: torch.nn.Module, copy_frozen: bool = False) -> dict:
    """A CPU copy of the part of ``module.state_dict()`` that training can change.

    Parameters with ``requires_grad=True`` and every buffer; frozen parameters only with
    ``copy_frozen``. Loaded back with ``load_state_dict(copy, strict=False)``.
    """
    frozen = set() if copy_frozen else {name for name, p in module.named_parameters() if not p.requires_grad}
    return {key: value.detach().to("cpu", copy=True) for key, value in module.state_dict().items()
            if key not in frozen and isinstance(value, torch.Tensor)}


# ----------------------------------------------------------------------------------------------
# The batch protocol
# ----------------------------------------------------------------------------------------------


def split_batch(pl_module: Any, batch: Any, inputs_fn: Optional[Callable[[Any], tuple]] = None) -> tuple[Any, Any]:
    """``(inputs, labels)`` of a batch: ``inputs_fn``, the module's ``distill_inputs``, or a default.

    Defaults: a 2-tuple/list batch is ``(x, y)``; a dict batch is its other keys and its
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


def to_device(value: Any, device: torch.device) -> Any:
    """Move the tensors of a (nested) batch to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    return value


# ----------------------------------------------------------------------------------------------
# Describing a model for the report
# ----------------------------------------------------------------------------------------------


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


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def saved_size_bytes(model: torch.nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``: the model's size on disk (nothing is written)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


@torch.no_grad()
def latency_ms_per_example(model: torch.nn.Module, loader: Iterable, split: Callable[[Any], tuple],
                           batches: int = 3, repeats: int = 3,
                           forward: Optional[Callable[[torch.nn.Module, Any], Any]] = None) -> Optional[float]:
    """CPU inference time per example, milliseconds: the fastest of ``repeats`` passes over the
    loader's first ``batches`` batches, after one untimed warm-up pass (the fastest pass is the
    least disturbed by other work on the machine).

    Each batch is timed as ``forward(model, batch)`` if given (``Quantize``'s ``forward_fn``),
    else ``call_model(model, split(batch)[0])``; ``split`` also counts the examples. The model
    runs in eval mode on the CPU and is put back on its device and in its mode.
    """
    if loader is None or batches <= 0:
        return None
    cpu = torch.device("cpu")
    kept = []
    for batch in loader:
        kept.append(to_device(batch, cpu))
        if len(kept) >= batches:
            break
    examples = sum(count_examples(*split(batch)) for batch in kept)
    if not examples:
        return None
    if forward is None:
        def forward(m: torch.nn.Module, batch: Any) -> Any:
            return call_model(m, split(batch)[0])
    device = device_of(model)
    modes = training_modes(model)
    if device != cpu:  # (a quantized model is on the CPU already, and bitsandbytes re-packs on a move)
        model.to(cpu)
    model.eval()
    try:
        for batch in kept:  # warm-up pass: allocations, weight packing, caches
            forward(model, batch)
        best_s = math.inf
        for _ in range(max(repeats, 1)):
            start = time.perf_counter()
            for batch in kept:
                forward(model, batch)
            best_s = min(best_s, time.perf_counter() - start)
        return 1000.0 * best_s / examples
    finally:
        if device != cpu:
            model.to(device)
        restore_training_modes(modes)


def timed_latency(model: torch.nn.Module, loader: Optional[Iterable], split: Callable[[Any], tuple],
                  batches: int = 3) -> tuple[Optional[float], str]:
    """``(latency_ms_per_example, note)``: a latency that cannot be measured is a note, not a failure."""
    if loader is None or batches <= 0:
        return None, ""
    try:
        return latency_ms_per_example(model, loader, split, batches), ""
    except Exception as err:  # noqa: BLE001 - a figure for the report must not fail the run
        return None, f"latency not measured: {type(err).__name__}: {err}"


class cpu_threads:
    """Run a block with ``count`` torch CPU threads (None: leave the setting alone)."""

    def __init__(self, count: Optional[int]) -> None:
        self.count = count

    def __enter__(self) -> None:
        self._before = torch.get_num_threads()
        if self.count is not None:
            torch.set_num_threads(self.count)

    def __exit__(self, *exc: Any) -> None:
        torch.set_num_threads(self._before)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of examples (or tokens) whose arg-max class is the label."""
    return float((logits.argmax(dim=-1) == labels).float().mean())


def describe_model(model: torch.nn.Module, role: str, loader: Optional[Iterable] = None,
                   split: Optional[Callable[[Any], tuple]] = None, latency_batches: int = 3,
                   train_usd: Optional[float] = None) -> ModelRow:
    """A report row with what can be measured of ``model``: parameters, size, CPU latency."""
    row = ModelRow(role=role, params=count_params(model), size_bytes=saved_size_bytes(model), train_usd=train_usd)
    if split is not None:
        row.latency_ms_per_example, row.note = timed_latency(model, loader, split, latency_batches)
    return row
