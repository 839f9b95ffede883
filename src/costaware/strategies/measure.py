"""Describing a model for the report's teacher / student / quantized table.

Parameters, size on disk, CPU latency per example on a few validation batches (as they come:
the throughput of batched inference), accuracy. The serving figures at a deployment's own batch
size and device are :mod:`costaware.deploy`'s.
"""

from __future__ import annotations

import io
import math
import time
from typing import Any, Callable, Iterable, Optional

import torch

from costaware.deploy import device_of, to_device
from costaware.strategies.base import ModelRow, restore_training_modes, training_modes
from costaware.strategies.batches import call_model, count_examples


def count_params(model: torch.nn.Module) -> int:
    """Parameters of ``model`` (a quantized layer's packed weight counts its elements)."""
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
