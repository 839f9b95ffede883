"""``Quantize``: shrink a trained model's linear layers to 8 or 4 bits, kept only if it still scores.

Post-training quantization with bitsandbytes: every ``nn.Linear`` becomes a
``bnb.nn.Linear8bitLt`` (LLM.int8() weights, int8 per output row) or a ``bnb.nn.Linear4bit``
(NF4 or FP4 blocks of 64 weights). Both run on CPU since bitsandbytes 0.47, so the whole
strategy runs on a CPU copy of the model: the trained model on its device is never touched,
and the latency it reports is what CPU inference would see.

The quantized copy is validated with the same measurement as the float one, and kept only if
the monitored metric drops by at most ``max_drop``; the table row says which and why.
"""

from __future__ import annotations

import copy
import importlib
import logging
import math
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
from lightning_utilities.core.rank_zero import rank_zero_info
from torch import nn

from costaware import _lightning
from costaware.records import QuantizeEvent
from costaware.strategies.base import (
    ModelRow,
    StopContext,
    StopStrategy,
    ledger_folder,
    restore_training_modes,
    training_modes,
)
from costaware.strategies.early_stop import (
    count_params,
    cpu_threads,
    latency_ms_per_example,
    saved_size_bytes,
    to_device,
    val_loader,
)
from costaware.validation import check_amount, check_count

BITS = (4, 8)
QUANT_TYPES_4BIT = ("nf4", "fp4")
MODES = ("max", "min")
QUANTIZED_FILENAME = "quantized.pt"

#: ``metric_fn(model, dataloader) -> float``: the monitored metric of ``model`` on ``dataloader``.
MetricFn = Callable[[nn.Module, Any], float]
#: ``forward_fn(model, batch) -> Any``: one inference call on a validation batch (for latency).
ForwardFn = Callable[[nn.Module, Any], Any]


class QuantizationUnavailableError(ImportError):
    """bitsandbytes, which ``Quantize`` needs, cannot be imported."""


def import_bitsandbytes() -> Any:
    """Import bitsandbytes, or raise :class:`QuantizationUnavailableError` saying how to get it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no GPU support" notices on CPU-only machines
            import bitsandbytes
    except ImportError as err:
        raise QuantizationUnavailableError(
            "Quantize needs bitsandbytes (>= 0.47 for CPU kernels), which cannot be imported: "
            "pip install costaware[quant]") from err
    return bitsandbytes


class Quantize(StopStrategy):
    r"""Quantize the trained model's ``nn.Linear`` layers to int8 or 4 bits, if the metric allows.

    At the end of the fit (``after_fit``, on global rank zero only: the others return no rows),
    a CPU copy of the model is measured (metric, parameters, size on disk, CPU latency per
    example), its linear layers are replaced by bitsandbytes layers, and the same is measured
    again. The quantized model is kept when the metric drops by at most ``max_drop`` (metric
    units: for ``mode="max"`` a fall, for ``mode="min"`` a rise); then its ``state_dict`` is
    saved to ``<log dir>/costaware/quantized.pt`` (next to the ledger) and the ledger records a
    ``quantize`` event. Otherwise nothing is saved and the float model stays the result. The
    two rows returned (``"teacher"`` and ``"quantized"``) fill the report's model table; the
    quantized row's ``note`` says kept or rejected, and why.

    How the metric is measured, first match wins:

    1. ``metric_fn(model, dataloader) -> float`` if given;
    2. a callback of the Trainer that logs the monitored metric itself and can score any model:
       it has ``log_name == metric`` and a ``score(model) -> float`` method (``OnlineProbe``);
    3. otherwise the module's own ``validation_step``: a fresh one-device CPU Trainer of the same
       Lightning namespace runs ``validate(model, dataloaders=val, verbose=False)`` (no callbacks,
       no logger, the fit's ``limit_val_batches``) and the metric is read from its
       ``callback_metrics``. A separate Trainer, because re-entering the fitting Trainer from a
       fit hook would run the fit's callbacks (the cost monitor, early stopping) again and reset
       its loops. The validation data is ``trainer.val_dataloaders`` (under DDP: rank zero's
       shard), else the datamodule's or the module's ``val_dataloader()``.

    Latency is the best of ``latency_repeats`` passes of ``forward_fn`` over the first
    ``latency_batches`` validation batches, divided by the examples they hold, on
    ``latency_threads`` CPU threads (one by default: on a shared or busy machine, multi-threaded
    timings of small models mostly measure thread contention). On CPU, bitsandbytes kernels save
    memory and disk, not necessarily time: read the table. Size on disk is the bytes of
    ``torch.save(state_dict)``.

    Direct use (for instance on a distilled student)::

        model, rows = Quantize(bits=4, max_drop=0.01).apply(student, val_loader, metric_fn)

    Args:
        bits: 8 (``Linear8bitLt``, int8 weights) or 4 (``Linear4bit``).
        max_drop: the largest worsening of the metric accepted, in metric units (0.01 is one
            point of accuracy), >= 0.
        quant_type: for ``bits=4``, ``"nf4"`` (normal float, the QLoRA format) or ``"fp4"``.
        blocksize: for ``bits=4``, weights per quantization block (64, 128, ... 4096).
        int8_threshold: for ``bits=8``, LLM.int8()'s outlier threshold on activations (0 turns
            the mixed-precision decomposition off, the right choice for small models).
        skip_modules: names of layers (``"head"``, ``"encoder.fc1"``) or name suffixes to keep in
            float. Layers inside ``nn.MultiheadAttention`` and layers whose weight is shared
            (tied) with another module are always kept in float.
        metric_fn: ``metric_fn(model, dataloader) -> float``, overriding the ways above.
        forward_fn: ``forward_fn(model, batch)``: one inference call, for latency; default:
            ``apply``'s ``forward_fn``, else ``model(batch)`` for a tensor, ``model(batch[0])``
            for a tuple or list, ``model(**batch)`` for a dict.
        latency_batches: validation batches timed.
        latency_repeats: passes over them; the fastest counts.
        latency_threads: torch CPU threads while timing; None: leave ``torch.get_num_threads()``.
        filename: the saved file's name, in the ledger's folder.

    Raises:
        ValueError: at construction, for ``bits`` not 4 or 8, ``max_drop`` negative or not a
            number, an unknown ``quant_type``, a bad ``blocksize`` or count.
        QuantizationUnavailableError: (an ``ImportError``) at construction, without bitsandbytes.

    Example::

        from pytorch_lightning import Trainer
        from costaware import CostMonitor, MarginalGainStopping
        from costaware.strategies import Quantize

        trainer = Trainer(callbacks=[CostMonitor(usd_per_host_hour=0.1),
                                     MarginalGainStopping(monitor="val_acc", mode="max",
                                                          then=Quantize(bits=8, max_drop=0.01))])
    """

    name = "quantize"

    def __init__(
        self,
        bits: int = 8,
        max_drop: float = 0.01,
        quant_type: str = "nf4",
        blocksize: int = 64,
        int8_threshold: float = 0.0,
        skip_modules: Sequence[str] = (),
        metric_fn: Optional[MetricFn] = None,
        forward_fn: Optional[ForwardFn] = None,
        latency_batches: int = 4,
        latency_repeats: int = 3,
        latency_threads: Optional[int] = 1,
        filename: str = QUANTIZED_FILENAME,
    ) -> None:
        if isinstance(bits, bool) or bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
        check_amount("max_drop", max_drop, why=" (in units of the monitored metric)")
        if quant_type not in QUANT_TYPES_4BIT:
            raise ValueError(f"quant_type must be one of {QUANT_TYPES_4BIT}, got {quant_type!r}")
        if blocksize not in (64, 128, 256, 512, 1024, 2048, 4096):
            raise ValueError(f"blocksize must be one of 64, 128, 256, 512, 1024, 2048, 4096, got {blocksize!r}")
        check_amount("int8_threshold", int8_threshold)
        if isinstance(skip_modules, str) or not all(isinstance(s, str) for s in skip_modules):
            raise ValueError(f"skip_modules must be a list of module names, got {skip_modules!r}")
        check_count("latency_batches", latency_batches, minimum=1)
        check_count("latency_repeats", latency_repeats, minimum=1)
        check_count("latency_threads", latency_threads, minimum=1, allow_none=True)
        for arg, fn in (("metric_fn", metric_fn), ("forward_fn", forward_fn)):
            if fn is not None and not callable(fn):
                raise ValueError(f"{arg} must be a callable (model, ...) or None, got {fn!r}")
        if not isinstance(filename, str) or not filename or "/" in filename:
            raise ValueError(f"filename must be a file name, got {filename!r}")
        import_bitsandbytes()  # fail now, before any compute is spent
        self.bits = int(bits)
        self.max_drop = float(max_drop)
        self.quant_type = quant_type
        self.blocksize = blocksize
        self.int8_threshold = float(int8_threshold)
        self.skip_modules = tuple(skip_modules)
        self.metric_fn = metric_fn
        self.forward_fn = forward_fn  # None: apply's forward_fn, else default_forward
        self.latency_batches = latency_batches
        self.latency_repeats = latency_repeats
        self.latency_threads = latency_threads
        self.filename = filename
        self.rows: list[ModelRow] = []
        self.model: Optional[nn.Module] = None  # the result of the last apply: quantized if kept, else float
        self.kept: Optional[bool] = None
        self.path: Optional[Path] = None

    @property
    def label(self) -> str:
        return "int8" if self.bits == 8 else self.quant_type

    # ----------------------------------------------------------------------------------------
    # As a strategy of MarginalGainStopping
    # ----------------------------------------------------------------------------------------

    def after_fit(self, context: StopContext) -> list[ModelRow]:
        """Quantize the fitted module on global rank zero; returns the teacher and quantized rows.

        No collective is called, so it is safe whether the caller runs it on every rank or on
        rank zero only. A failure (a metric that cannot be measured, a bitsandbytes error) is a
        warning and a ``"not quantized: ..."`` row, never an exception at the end of a fit.
        """
        trainer, pl_module = context.trainer, context.pl_module
        if getattr(trainer, "global_rank", 0) != 0:
            return []
        started_s = time.perf_counter()
        monitor = context.monitor
        try:
            metric_fn = self.metric_fn or _provider_metric_fn(trainer, context.metric_name)
            dataloader = _val_dataloader(trainer, pl_module)
            if metric_fn is None:
                if dataloader is None:
                    return self._skip(context, "no validation data to check the quantized model on")
                if not context.metric_name:
                    return self._skip(context, "no monitored metric to check the quantized model with")
                metric_fn = LightningMetric(context.metric_name, trainer_cls=type(trainer),
                                            limit_val_batches=getattr(trainer, "limit_val_batches", 1.0))
            totals = getattr(monitor, "totals", None) if monitor is not None else None
            train_usd = float(totals.usd) if totals else None
            folder = ledger_folder(trainer, monitor)
            _, rows = self.apply(pl_module, dataloader, metric_fn, mode=context.mode, role="teacher",
                                 save_path=folder / self.filename, train_usd=train_usd,
                                 metric_name=context.metric_name)
        except Exception as err:  # noqa: BLE001 - the training is done and saved: report, do not crash the fit
            warnings.warn(f"costaware: Quantize failed ({type(err).__name__}: {err})", RuntimeWarning, stacklevel=2)
            return self._skip(context, f"{type(err).__name__}: {err}")
        seconds = time.perf_counter() - started_s
        quantized = rows[-1]
        try:
            ledger = getattr(monitor, "ledger", None)
            if ledger is not None:
                ledger.record(QuantizeEvent.from_rows(
                    rows, of="teacher", bits=self.bits, quant_type=self.label, kept=self.kept,
                    metric=context.metric_name, mode=context.mode, max_drop=self.max_drop,
                    path=str(self.path) if self.path else None, duration_s=seconds))
        except Exception as err:  # noqa: BLE001 - the model is quantized (or not) as the rows say: keep them
            warnings.warn(f"costaware: Quantize could not record its ledger event ({type(err).__name__}: {err})",
                          RuntimeWarning, stacklevel=2)
        rank_zero_info(f"costaware: Quantize({self.label}): {quantized.note}")
        return rows

    def _skip(self, context: StopContext, why: str) -> list[ModelRow]:
        """No quantized model: the results of an earlier ``apply`` are cleared, not left behind."""
        self.kept = False
        self.model = None
        self.path = None
        self.rows = [ModelRow(role="quantized", note=f"not quantized: {why}")]
        ledger = getattr(context.monitor, "ledger", None)
        if ledger is not None:
            try:
                ledger.record(QuantizeEvent(of="teacher", bits=self.bits, quant_type=self.label, kept=False,
                                            note=self.rows[0].note))
            except Exception as err:  # noqa: BLE001 - as in after_fit: never an exception at the end of a fit
                warnings.warn(f"costaware: Quantize could not record its ledger event ({type(err).__name__}: "
                              f"{err})", RuntimeWarning, stacklevel=2)
        rank_zero_info(f"costaware: Quantize({self.label}): {self.rows[0].note}")
        return self.rows

    # ----------------------------------------------------------------------------------------
    # Direct use
    # ----------------------------------------------------------------------------------------

    def apply(
        self,
        module: nn.Module,
        val_dataloader: Optional[Iterable],
        metric_fn: Union[MetricFn, str],
        *,
        mode: str = "max",
        role: str = "teacher",
        save_path: Optional[Union[str, Path]] = None,
        train_usd: Optional[float] = None,
        metric_name: str = "",
        forward_fn: Optional[ForwardFn] = None,
    ) -> tuple[nn.Module, list[ModelRow]]:
        """Quantize a CPU copy of ``module``, measure both, keep the copy if the metric allows.

        ``module`` itself is not changed (it may stay on its GPU).

        Args:
            module: the float model (any ``nn.Module``; a LightningModule for a string metric).
            val_dataloader: validation batches, passed to ``metric_fn`` and timed for latency
                (``None`` if ``metric_fn`` needs none: latency is then not measured).
            metric_fn: ``metric_fn(model, dataloader) -> float``, or the name of a metric that
                the LightningModule logs in ``validation_step`` (measured by
                :class:`LightningMetric`).
            mode: ``"max"`` (higher is better) or ``"min"``.
            role: the float model's role in the table (``"teacher"``, ``"student"``).
            save_path: where to ``torch.save`` the quantized ``state_dict`` if kept (its
                folder is created); None: not saved, size measured in memory.
            train_usd: what training the float model cost, for both rows.
            metric_name: the metric's name, for the notes.
            forward_fn: the caller's way to call the model (``Distill`` knows its batch
                protocol), used when this ``Quantize`` was given no ``forward_fn`` of its own.

        Returns:
            ``(model, [float_row, quantized_row])``: ``model`` is the quantized CPU copy if kept,
            else ``module`` itself. ``self.kept``, ``self.model``, ``self.path`` and ``self.rows``
            hold the same.
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if isinstance(metric_fn, str):
            metric_name = metric_name or metric_fn
            metric_fn = LightningMetric(metric_fn)
        if not callable(metric_fn):
            raise ValueError(f"metric_fn must be a callable (model, dataloader) -> float or a metric name, got "
                             f"{metric_fn!r}")
        what = metric_name or "the metric"
        forward = self.forward_fn or forward_fn or default_forward
        float_model = cpu_copy(module)
        batches = _first_batches(val_dataloader, self.latency_batches)
        float_metric = _call_metric(metric_fn, float_model, val_dataloader)
        params = count_params(float_model)
        float_row = ModelRow(role=role, metric=float_metric, params=params, size_bytes=saved_size_bytes(float_model),
                             latency_ms_per_example=self._latency_ms(float_model, batches, forward),
                             train_usd=train_usd,
                             note="float32 weights" if _all_float32(float_model) else "float weights")

        quantized = cpu_copy(float_model)
        converted = quantize_linear_layers(quantized, self.bits, skip_modules=self.skip_modules,
                                           quant_type=self.quant_type, blocksize=self.blocksize,
                                           int8_threshold=self.int8_threshold)
        self.path = None
        if not converted:
            row = ModelRow(role="quantized", params=params, train_usd=train_usd,
                           note=f"rejected: no nn.Linear layer to quantize; the {role} is kept")
            return self._result(module, False, [float_row, row])
        q_metric = _call_metric(metric_fn, quantized, val_dataloader)
        drop = _worsening(float_metric, q_metric, mode)
        kept = drop is not None and drop <= self.max_drop + 1e-12
        if kept and save_path is not None:
            self.path = Path(save_path)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(quantized.state_dict(), self.path)
            size_bytes = self.path.stat().st_size
        else:
            size_bytes = saved_size_bytes(quantized)
        layers = f"{len(converted)} linear layer{'s' if len(converted) != 1 else ''} in {self.label}"
        if drop is None:
            note = f"rejected: {what} could not be compared ({float_metric} -> {q_metric}); the {role} is kept"
        else:
            if drop > 0:
                change = f"{what} {'drops' if mode == 'max' else 'rises'} by {drop:.4g}"
            else:
                change = f"{what} improves by {-drop:.4g}" if drop < 0 else f"{what} is unchanged"
            verdict = (f"kept: {change}, within max_drop {self.max_drop:g}" if kept else
                       f"rejected: {change} > max_drop {self.max_drop:g}; the {role} is kept")
            note = f"{verdict} ({layers})"
        row = ModelRow(role="quantized", metric=q_metric, params=params, size_bytes=size_bytes,
                       latency_ms_per_example=self._latency_ms(quantized, batches, forward), train_usd=train_usd,
                       path=str(self.path) if self.path else None, note=note)
        return self._result(quantized if kept else module, kept, [float_row, row])

    def _result(self, model: nn.Module, kept: bool, rows: list[ModelRow]) -> tuple[nn.Module, list[ModelRow]]:
        self.model, self.kept, self.rows = model, kept, rows
        return model, rows

    def _latency_ms(self, model: nn.Module, batches: list, forward: ForwardFn) -> Optional[float]:
        """Best-of-``latency_repeats`` CPU milliseconds per example of ``forward``; None if it fails."""
        try:
            with cpu_threads(self.latency_threads), _quiet():
                return latency_ms_per_example(model, batches, _whole_batch, len(batches), self.latency_repeats,
                                              forward=forward)
        except Exception as err:  # noqa: BLE001 - latency is a figure for the table, not worth a failure
            warnings.warn(f"costaware: Quantize could not time {type(model).__name__}'s forward "
                          f"({type(err).__name__}: {err}); pass forward_fn=", RuntimeWarning, stacklevel=2)
            return None


# ---------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------


def quantize_linear_layers(
    module: nn.Module,
    bits: int = 8,
    *,
    skip_modules: Sequence[str] = (),
    quant_type: str = "nf4",
    blocksize: int = 64,
    int8_threshold: float = 0.0,
) -> list[str]:
    """Replace, in place, the ``nn.Linear`` layers of a CPU module by bitsandbytes layers.

    The bitsandbytes way (load float weights into the layer, then move it to a device) is
    followed on CPU: the float weight goes into an ``Int8Params``/``Params4bit`` of a layer built
    on the meta device, and ``.to("cpu")`` quantizes it (bitsandbytes quantizes on the first
    move of an unquantized parameter). Biases stay float.

    Returns:
        The qualified names of the replaced layers.

    Example::

        model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        quantize_linear_layers(model, bits=4)  # ['0', '2']
        # Reload a saved state_dict: quantize the same float architecture, then load_quantized.
    """
    bnb = import_bitsandbytes()
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
    if bits == 8:
        _drop_cast_notice()
    shared = _shared_weights(module)
    replaced = []
    for name, parent in list(module.named_modules()):
        if isinstance(parent, nn.MultiheadAttention):
            continue  # it reads out_proj.weight directly
        for child_name, child in list(parent.named_children()):
            qualified = f"{name}.{child_name}" if name else child_name
            if not _quantizable(child, bnb) or _skipped(qualified, skip_modules) or id(child.weight) in shared:
                continue
            weight = child.weight.detach().to("cpu", torch.float32).contiguous()
            has_bias = child.bias is not None
            if bits == 8:
                layer = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=has_bias,
                                            has_fp16_weights=False, threshold=int8_threshold, device="meta")
                layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
            else:
                layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=has_bias,
                                          compute_dtype=torch.float32, compress_statistics=False,
                                          quant_type=quant_type, device="meta")
                layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, blocksize=blocksize,
                                                 compress_statistics=False, quant_type=quant_type, module=layer)
            if has_bias:
                layer.bias = nn.Parameter(child.bias.detach().to("cpu", torch.float32), requires_grad=False)
            with _quiet():
                layer = layer.to("cpu")  # quantizes
            layer.train(child.training)
            setattr(parent, child_name, layer)
            replaced.append(qualified)
    return replaced


class _CastNotice(logging.Filter):
    """Drops bitsandbytes' "inputs will be cast to float16" notice, logged on every int8 forward
    of a float32 input: that cast is how LLM.int8() quantizes activations, not a problem."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "inputs will be cast from" not in str(record.msg)


def _drop_cast_notice() -> None:
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _CastNotice) for f in logger.filters):
        logger.addFilter(_CastNotice())


def load_quantized(module: nn.Module, state_dict: Union[str, Path, dict], bits: int = 8, **kwargs: Any) -> nn.Module:
    """Rebuild a quantized model from its float architecture and a state_dict saved by ``Quantize``.

    ``module`` is a freshly built float model of the same architecture (its weights are
    overwritten); ``kwargs`` are the conversion's (``skip_modules``, ``quant_type``...), as when
    it was saved. Returns ``module``, quantized in place, on CPU.

    Example::

        model = load_quantized(MyModel(), "logs/version_0/costaware/quantized.pt", bits=8)
    """
    bnb = import_bitsandbytes()
    if not isinstance(state_dict, dict):
        state_dict = torch.load(state_dict, map_location="cpu", weights_only=False)
    module = module.to("cpu")
    quantize_linear_layers(module, bits, **kwargs)
    state_dict = dict(state_dict)
    for name, layer in module.named_modules():
        if isinstance(layer, bnb.nn.Linear4bit):
            prefix = f"{name}.weight" if name else "weight"
            stats = {k[len(prefix) + 1:]: state_dict.pop(k) for k in list(state_dict) if k.startswith(prefix + ".")}
            layer.weight = bnb.nn.Params4bit.from_prequantized(state_dict.pop(prefix), stats, device="cpu",
                                                               module=layer)
    module.load_state_dict(state_dict, strict=not any(isinstance(m, bnb.nn.Linear4bit) for m in module.modules()))
    return module


def _quantizable(child: nn.Module, bnb: Any) -> bool:
    if not isinstance(child, nn.Linear) or isinstance(child, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)):
        return False
    if type(child).__name__ == "NonDynamicallyQuantizableLinear":
        return False
    return child.weight.is_floating_point() and child.weight.device.type != "meta"


def _skipped(name: str, skip_modules: Sequence[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in skip_modules)


def _shared_weights(module: nn.Module) -> set:
    """ids of Linear weights that another module also holds (tied weights stay float)."""
    holders: dict = {}
    for sub in module.modules():
        for param in sub.parameters(recurse=False):
            holders.setdefault(id(param), set()).add(id(sub))
    return {pid for pid, subs in holders.items() if len(subs) > 1}


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------


class LightningMetric:
    """``metric_fn`` that runs a LightningModule's own ``validation_step`` in a fresh CPU Trainer.

    The module is moved to CPU (``Quantize`` passes it CPU copies) and given back to its own
    Trainer, if it had one, afterwards.

    The Trainer has one CPU device, no callbacks, logger, checkpointing, progress bar or
    summary, and an explicit ``LightningEnvironment`` so that it also works inside a DDP process
    (where the launcher's environment variables would otherwise make it a cluster job).

    Args:
        metric_name: a key the module logs during validation (``"val_acc"``).
        trainer_cls: the Trainer class (namespace); default: the module's namespace.
        limit_val_batches: as the Trainer argument.

    Example::

        acc = LightningMetric("val_acc")(model, val_loader)
    """

    def __init__(self, metric_name: str, trainer_cls: Optional[type] = None,
                 limit_val_batches: Union[int, float] = 1.0) -> None:
        if not isinstance(metric_name, str) or not metric_name:
            raise ValueError(f"metric_name must be a metric's name, got {metric_name!r}")
        self.metric_name = metric_name
        self.trainer_cls = trainer_cls
        self.limit_val_batches = limit_val_batches

    def __call__(self, model: nn.Module, dataloader: Any) -> float:
        namespace = _lightning.namespace_of(self.trainer_cls or model) or _lightning.DEFAULT_NAMESPACE
        pl = _lightning.load(namespace)
        environments = importlib.import_module(f"{namespace}.plugins.environments")
        trainer_cls = self.trainer_cls or pl.Trainer
        previous = getattr(model, "_trainer", None)
        with _quiet():
            trainer = trainer_cls(accelerator="cpu", devices=1, num_nodes=1, logger=False, callbacks=[],
                                  enable_checkpointing=False, enable_progress_bar=False,
                                  enable_model_summary=False, limit_val_batches=self.limit_val_batches,
                                  plugins=[environments.LightningEnvironment()], default_root_dir=None)
            try:
                trainer.validate(model, dataloaders=dataloader, verbose=False)
            finally:
                model.trainer = previous
        metrics = trainer.callback_metrics
        if self.metric_name not in metrics:
            raise KeyError(f"the module logged no {self.metric_name!r} in validation (it logged "
                           f"{sorted(metrics) or 'nothing'}): pass metric_fn=")
        return float(metrics[self.metric_name])


def cpu_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` on CPU, detached from any Trainer (LightningModule pickles without it).

    Tensors on an accelerator are copied straight to CPU (through ``deepcopy``'s memo), so the
    device never holds two models and the original is not moved.
    """
    memo: dict = {}
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.device.type != "cpu" and id(tensor) not in memo:
            data = tensor.detach().to("cpu")
            memo[id(tensor)] = nn.Parameter(data, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else data
    copied = copy.deepcopy(module, memo)
    return copied.to("cpu")  # (a LightningModule also records its device)


def default_forward(model: nn.Module, batch: Any) -> Any:
    """``model(batch)`` for a tensor, ``model(batch[0])`` for a tuple or list, ``model(**batch)`` for a dict."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def _call_metric(metric_fn: Callable, model: nn.Module, dataloader: Any) -> float:
    training = training_modes(model)
    try:
        with _quiet():
            value = metric_fn(model, dataloader)
    finally:
        restore_training_modes(training)
    value = float(value.item() if isinstance(value, torch.Tensor) else value)
    return value


def _worsening(before: float, after: float, mode: str) -> Optional[float]:
    if not (math.isfinite(before) and math.isfinite(after)):
        return None
    return before - after if mode == "max" else after - before


def _first_batches(dataloader: Optional[Iterable], count: int) -> list:
    if dataloader is None:
        return []
    batches = []
    try:
        for batch in dataloader:
            batches.append(to_device(batch, "cpu"))
            if len(batches) >= count:
                break
    except TypeError:
        return []
    return batches


def _whole_batch(batch: Any) -> tuple[Any, None]:
    """The split for timing: ``forward_fn`` takes the whole batch; its first tensor counts the examples."""
    return batch, None


def _all_float32(module: nn.Module) -> bool:
    return all(p.dtype == torch.float32 for p in module.parameters() if p.is_floating_point())


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence the notices of a throwaway Trainer and of bitsandbytes' CPU casts."""
    loggers = [logging.getLogger(n) for n in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric",
                                              "lightning.fabric", "bitsandbytes")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=r".*inputs will be cast from.*")
            warnings.filterwarnings("ignore", message=r".*GPU available but not used.*")
            warnings.filterwarnings("ignore", message=r".*LightningModule.*has parameters that were not used.*")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


# ---------------------------------------------------------------------------------------------
# Reading the Trainer (no collectives: after_fit may run on rank zero alone)
# ---------------------------------------------------------------------------------------------


def _provider_metric_fn(trainer: Any, metric_name: str) -> Optional[MetricFn]:
    """A callback that logs ``metric_name`` itself and scores any model (``OnlineProbe``)."""
    if not metric_name:
        return None
    for callback in getattr(trainer, "callbacks", []):
        if getattr(callback, "log_name", None) == metric_name and callable(getattr(callback, "score", None)):
            return lambda model, _dataloader, cb=callback: cb.score(model)
    return None


def _val_dataloader(trainer: Any, pl_module: Any) -> Optional[Any]:
    """The Trainer's validation data (``val_loader``), else the datamodule's or the module's hook."""
    loaders = val_loader(trainer)
    if loaders is not None:
        return loaders
    for source in (getattr(trainer, "datamodule", None), pl_module):
        hook = getattr(source, "val_dataloader", None)
        if hook is None:
            continue
        try:
            loaders = hook()
        except Exception:  # noqa: BLE001 - Lightning's default hook raises when not overridden
            continue
        if isinstance(loaders, (list, tuple)):
            loaders = loaders[0] if loaders else None
        elif isinstance(loaders, dict):
            loaders = next(iter(loaders.values()), None)
        if loaders is not None:
            return loaders
    return None
