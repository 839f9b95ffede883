"""``Quantize``: shrink a trained model's linear layers to 8 or 4 bits, kept only if it pays.

Post-training quantization of a CPU copy of the model, with bitsandbytes (int8 ``Linear8bitLt``,
NF4/FP4 ``Linear4bit``) or torch's own dynamic int8 (``quantize_dynamic``), see
:mod:`costaware.strategies.conversion`. The trained model on its device is never touched, and
the latency it reports is what CPU inference would see.

Each quantized copy is validated with the same measurement as the float one, and kept only if
the monitored metric drops by at most ``max_drop`` AND it lowers the stated objective (latency,
memory, or serving dollars under a ``Deployment``) by at least ``min_gain``, by measurement;
with ``backend="auto"`` on CPU both bitsandbytes and torch int8 are tried and the better kept.
The table row says which and why.
"""

from __future__ import annotations

import importlib
import math
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
from lightning_utilities.core.rank_zero import rank_zero_info
from torch import nn

from costaware import _lightning
from costaware.deploy import Deployment, measure_serving_many, serving_examples
from costaware.records import QuantizeEvent
from costaware.strategies.base import (
    ModelRow,
    StopContext,
    StopStrategy,
    cpu_copy,
    ledger_folder,
    restore_training_modes,
    training_modes,
)
from costaware.strategies.batches import call_model, split_batch, to_device, val_loader
from costaware.strategies.conversion import (
    BITS,
    QuantizationUnavailableError,
    _quiet,
    bitsandbytes_available,
    import_bitsandbytes,
    load_quantized,
    quantize_linear_layers,
    torch_dynamic_int8,
    torch_quantization_available,
)
from costaware.strategies.measure import count_params, saved_size_bytes
from costaware.validation import check_amount, check_count

__all__ = [
    "LightningMetric",
    "QuantizationUnavailableError",
    "Quantize",
    "load_quantized",
    "quantize_linear_layers",
    "torch_dynamic_int8",
]

QUANT_TYPES_4BIT = ("nf4", "fp4")
MODES = ("max", "min")
BACKENDS = ("auto", "bitsandbytes", "torch")
OBJECTIVES = ("latency", "memory", "usd")
QUANTIZED_FILENAME = "quantized.pt"

#: ``metric_fn(model, dataloader) -> float``: the monitored metric of ``model`` on ``dataloader``.
MetricFn = Callable[[nn.Module, Any], float]
#: ``forward_fn(model, batch) -> Any``: one inference call on a validation batch (for latency).
ForwardFn = Callable[[nn.Module, Any], Any]


class Quantize(StopStrategy):
    r"""Quantize the trained model's ``nn.Linear`` layers to int8 or 4 bits, if the metric allows and it pays.

    At the end of the fit (``after_fit``, on global rank zero only: the others return no rows),
    a CPU copy of the model is measured (metric, parameters, size on disk, CPU latency per
    example), quantized copies are made with each backend, and the same is measured again. A
    copy is acceptable when the metric drops by at most ``max_drop`` (metric units: for
    ``mode="max"`` a fall, for ``mode="min"`` a rise) and its ``objective`` is at least
    ``min_gain`` (a fraction) lower than the float model's:

    * ``"latency"``: CPU milliseconds per example (on the deployment's batch size, if one is given);
    * ``"memory"``: bytes of the saved ``state_dict``;
    * ``"usd"``: serving dollars per 1,000 requests under ``deployment`` (needs one).

    The best acceptable copy is kept: its ``state_dict`` is saved to
    ``<log dir>/costaware/quantized.pt`` (next to the ledger) and the ledger records a
    ``quantize`` event. Otherwise nothing is saved and the float model stays the result. The two
    rows returned (the float model's and ``"quantized"``) fill the report's model table; the
    quantized row's ``note`` says kept or rejected, and why, with every backend's figures.

    Backends: ``"bitsandbytes"`` (int8 ``Linear8bitLt``, or NF4/FP4 for ``bits=4``), ``"torch"``
    (``torch.ao.quantization.quantize_dynamic``, int8 only, CPU), ``"auto"``: every one installed
    that supports ``bits`` (on CPU, for int8, both: whichever is better is kept). GPU
    quantization is not done here: the copies run on the CPU.

    How the metric is measured, first match wins:

    1. ``metric_fn(model, dataloader) -> float`` if given;
    2. a callback of the Trainer that logs the monitored metric itself and can score any model:
       it has ``log_name == metric`` and a ``score(model) -> float`` method (``OnlineProbe``);
    3. otherwise the module's own ``validation_step``, in a fresh one-device CPU Trainer of the
       same Lightning namespace (:class:`LightningMetric`), on ``trainer.val_dataloaders``
       (else the datamodule's or the module's ``val_dataloader()``).

    Latency: ``latency_batches`` batches' worth of validation examples, drawn across the
    validation set, timed with ``forward_fn`` in ``latency_repeats`` interleaved rounds on
    ``latency_threads`` CPU threads (one by default: on a shared or busy machine, multi-threaded
    timings of small models mostly measure thread contention); each batch counts its fastest
    round. Models are called by the batch protocol (``costaware.strategies.batches``), as
    ``Distill`` calls them: a dict batch loses its ``"labels"``.

    Direct use (for instance on a distilled student)::

        model, rows = Quantize(bits=8, max_drop=0.01).apply(student, val_loader, metric_fn)

    Args:
        bits: 8 (int8) or 4 (bitsandbytes ``Linear4bit``).
        max_drop: the largest worsening of the metric accepted, in metric units (0.01 is one
            point of accuracy), >= 0.
        backend: ``"auto"``, ``"bitsandbytes"`` or ``"torch"``.
        objective: ``"latency"``, ``"memory"`` or ``"usd"``: what a kept copy must lower.
        min_gain: the fraction by which it must lower it (0.05: 5% lower; timings within a few
            percent are noise).
        deployment: the serving load and price for the ``"usd"`` objective (and the batch size
            and threads of the latency figures); ``apply(deployment=)`` overrides it.
        quant_type: for ``bits=4``, ``"nf4"`` (normal float, the QLoRA format) or ``"fp4"``.
        blocksize: for ``bits=4``, weights per quantization block (64, 128, ... 4096).
        int8_threshold: for bitsandbytes int8, LLM.int8()'s outlier threshold on activations (0
            turns the mixed-precision decomposition off, the right choice for small models).
        skip_modules: names of layers (``"head"``, ``"encoder.fc1"``) or name suffixes to keep in
            float. Layers inside ``nn.MultiheadAttention`` and layers whose weight is shared
            (tied) with another module are always kept in float.
        metric_fn: ``metric_fn(model, dataloader) -> float``, overriding the ways above.
        forward_fn: ``forward_fn(model, batch)``: one inference call, for latency; default:
            ``apply``'s ``forward_fn``, else the batch protocol.
        latency_batches: batches' worth of validation examples timed.
        latency_repeats: timed rounds; each batch counts its fastest.
        latency_threads: torch CPU threads while timing; None: leave ``torch.get_num_threads()``.
        filename: the saved file's name, in the ledger's folder.

    Raises:
        ValueError: at construction, for ``bits`` not 4 or 8, ``max_drop`` negative or not a
            number, an unknown ``backend``, ``objective`` or ``quant_type``, ``objective="usd"``
            with a deployment that is not a ``Deployment``, a bad ``blocksize`` or count.
        QuantizationUnavailableError: (an ``ImportError``) at construction, when no backend
            that supports ``bits`` can be imported (bitsandbytes for 4 bits).

    Example::

        from pytorch_lightning import Trainer
        from costaware import CostMonitor, MarginalGainStopping
        from costaware.strategies import Quantize

        trainer = Trainer(callbacks=[CostMonitor(usd_per_host_hour=0.1),
                                     MarginalGainStopping(monitor="val_acc", mode="max", usd_per_point=1,
                                                          then=Quantize(bits=8, max_drop=0.01,
                                                                        objective="latency"))])
    """

    name = "quantize"

    def __init__(
        self,
        bits: int = 8,
        max_drop: float = 0.01,
        backend: str = "auto",
        objective: str = "latency",
        min_gain: float = 0.05,
        deployment: Optional[Deployment] = None,
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
        _check_arguments(bits=bits, max_drop=max_drop, backend=backend, objective=objective, min_gain=min_gain,
                         deployment=deployment, quant_type=quant_type, blocksize=blocksize,
                         int8_threshold=int8_threshold, skip_modules=skip_modules, metric_fn=metric_fn,
                         forward_fn=forward_fn, latency_batches=latency_batches, latency_repeats=latency_repeats,
                         latency_threads=latency_threads, filename=filename)
        self.bits = int(bits)
        self.backend = backend
        self.backends = _backends(backend, self.bits)  # fail now, before any compute is spent
        self.max_drop = float(max_drop)
        self.objective = objective
        self.min_gain = float(min_gain)
        self.deployment = deployment
        self.quant_type = quant_type
        self.blocksize = blocksize
        self.int8_threshold = float(int8_threshold)
        self.skip_modules = tuple(skip_modules)
        self.metric_fn = metric_fn
        self.forward_fn = forward_fn  # None: apply's forward_fn, else the batch protocol
        self.latency_batches = latency_batches
        self.latency_repeats = latency_repeats
        self.latency_threads = latency_threads
        self.filename = filename
        self.rows: list[ModelRow] = []
        self.model: Optional[nn.Module] = None  # the result of the last apply: quantized if kept, else float
        self.kept: Optional[bool] = None
        self.kept_backend: Optional[str] = None
        self.path: Optional[Path] = None
        self.variants: list[_Variant] = []  # every quantized copy of the last apply, measured

    @property
    def label(self) -> str:
        return "int8" if self.bits == 8 else self.quant_type

    # ----------------------------------------------------------------------------------------
    # As a strategy of MarginalGainStopping
    # ----------------------------------------------------------------------------------------

    def check_before_fit(self, deployment: Optional[Deployment] = None) -> None:
        """In a fit, ``after_fit`` gets no deployment of its own: the ``"usd"`` objective needs one now.

        ``deployment``: the one a caller will pass to ``apply`` (``Distill`` passes its own).
        """
        if self.objective == "usd" and self.deployment is None and deployment is None:
            raise ValueError("Quantize(objective='usd') after a fit needs a deployment: "
                             "Quantize(objective='usd', deployment=Deployment(...)), set before the fit")

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
        try:
            ledger = getattr(monitor, "ledger", None)
            if ledger is not None:
                ledger.record(self.event(context.metric_name, context.mode,
                                         duration_s=time.perf_counter() - started_s))
        except Exception as err:  # noqa: BLE001 - the model is quantized (or not) as the rows say: keep them
            warnings.warn(f"costaware: Quantize could not record its ledger event ({type(err).__name__}: {err})",
                          RuntimeWarning, stacklevel=2)
        rank_zero_info(f"costaware: Quantize({self.label}): {rows[-1].note}")
        return rows

    def event(self, metric_name: str = "", mode: str = "max", **extra: Any) -> QuantizeEvent:
        """The ``quantize`` ledger record: the float model's figures (``float_*``, whatever its
        role, named in ``of``), the kept (or best) copy's, and each backend tried."""
        float_row, quantized = self.rows[0], self.rows[-1]
        variants = {v.backend: {"metric": v.metric, "size_bytes": v.size_bytes,
                                "latency_ms_per_example": v.latency_ms, "acceptable": v.acceptable}
                    for v in self.variants}
        fields = dict(
            bits=self.bits, quant_type=self.label, kept=self.kept, backend=self.kept_backend, objective=self.objective,
            min_gain=self.min_gain, metric=metric_name, mode=mode, max_drop=self.max_drop, of=float_row.role,
            float_metric=float_row.metric, quantized_metric=quantized.metric, float_size_bytes=float_row.size_bytes,
            quantized_size_bytes=quantized.size_bytes, float_latency_ms_per_example=float_row.latency_ms_per_example,
            quantized_latency_ms_per_example=quantized.latency_ms_per_example,
            path=str(self.path) if self.path else None, note=quantized.note, variants=variants or None)
        return QuantizeEvent(**{**fields, **extra})

    def _skip(self, context: StopContext, why: str) -> list[ModelRow]:
        """No quantized model: the results of an earlier ``apply`` are cleared, not left behind."""
        self.kept = False
        self.model = None
        self.path = None
        self.kept_backend = None
        self.variants = []
        self.rows = [ModelRow(role="quantized", note=f"not quantized: {why}")]
        ledger = getattr(context.monitor, "ledger", None)
        if ledger is not None:
            try:
                ledger.record(QuantizeEvent(bits=self.bits, quant_type=self.label, kept=False,
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
        deployment: Optional[Deployment] = None,
    ) -> tuple[nn.Module, list[ModelRow]]:
        """Quantize CPU copies of ``module``, measure all, keep the best copy if it is acceptable.

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
            forward_fn: the caller's way to call the model, used when this ``Quantize`` was
                given no ``forward_fn`` of its own.
            deployment: overrides the constructor's ``deployment``.

        Returns:
            ``(model, [float_row, quantized_row])``: ``model`` is the kept quantized CPU copy,
            else ``module`` itself. ``self.kept``, ``self.model``, ``self.path``, ``self.rows``
            and ``self.variants`` hold the same.

        Raises:
            ValueError: an unknown ``mode``, a ``metric_fn`` that is not callable, the ``"usd"``
                objective without a deployment.
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if isinstance(metric_fn, str):
            metric_name = metric_name or metric_fn
            metric_fn = LightningMetric(metric_fn)
        if not callable(metric_fn):
            raise ValueError(f"metric_fn must be a callable (model, dataloader) -> float or a metric name, got "
                             f"{metric_fn!r}")
        deployment = deployment or self.deployment
        if self.objective == "usd" and deployment is None:
            raise ValueError("objective='usd' needs a deployment: Quantize(deployment=Deployment(...)) or "
                             "apply(deployment=...)")
        float_model = cpu_copy(module)
        float_metric = _call_metric(metric_fn, float_model, val_dataloader)
        self.path = None
        self.variants = self._variants(float_model, metric_fn, val_dataloader)
        timings = self._time([float_model] + [v.model for v in self.variants], val_dataloader,
                             self.forward_fn or forward_fn or default_forward, deployment)
        float_row = ModelRow(role=role, metric=float_metric, params=count_params(float_model),
                             size_bytes=saved_size_bytes(float_model), latency_ms_per_example=timings[0],
                             train_usd=train_usd,
                             note="float32 weights" if _all_float32(float_model) else "float weights")
        for variant, latency_ms in zip(self.variants, timings[1:]):
            variant.latency_ms = latency_ms
            # measured after the timing: saving a bitsandbytes 4-bit layer un-packs its CPU weights
            variant.size_bytes = saved_size_bytes(variant.model) if variant.layers else None
            variant.judge(float_row, mode, self.max_drop, self.objective, self.min_gain, deployment)
        return self._choose(module, float_row, save_path, train_usd, metric_name or "the metric", mode)

    def _variants(self, float_model: nn.Module, metric_fn: MetricFn, val_dataloader: Any) -> list[_Variant]:
        """One quantized copy per backend, with its metric; a backend that fails is a failed variant."""
        variants = []
        for backend in self.backends:
            label = f"{backend}_{'int8' if self.bits == 8 else self.quant_type}"
            copy_ = cpu_copy(float_model)
            try:
                layers = self._convert(backend, copy_)
                variant = _Variant(label, copy_, layers)
                if layers:
                    variant.metric = _call_metric(metric_fn, copy_, val_dataloader)
            except Exception as err:  # noqa: BLE001 - one backend's failure leaves the others (and the float model)
                warnings.warn(f"costaware: Quantize: {label} failed ({type(err).__name__}: {err})", RuntimeWarning,
                              stacklevel=3)
                variant = _Variant(label, copy_, [])
                variant.reason = f"{label} failed: {type(err).__name__}: {err}"
            variants.append(variant)
        return variants

    def _convert(self, backend: str, model: nn.Module) -> list[str]:
        if backend == "torch":
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r".*quantize_per_tensor.*are deprecated.*")
                return torch_dynamic_int8(model, skip_modules=self.skip_modules)
        return quantize_linear_layers(model, self.bits, skip_modules=self.skip_modules, quant_type=self.quant_type,
                                      blocksize=self.blocksize, int8_threshold=self.int8_threshold)

    def _time(self, models: list[nn.Module], val_dataloader: Any, forward: ForwardFn,
              deployment: Optional[Deployment]) -> list[Optional[float]]:
        """CPU milliseconds per example of each model, timed interleaved; None where it fails."""
        first = next(iter(_first_batches(val_dataloader, 1)), None)
        if first is None:
            return [None] * len(models)
        batch_size = deployment.batch_size if deployment is not None else _batch_size(first)
        timing = Deployment(requests=1, usd_per_hour=0.0, device="cpu", batch_size=batch_size,
                            threads=deployment.threads if deployment is not None else self.latency_threads,
                            examples=max(self.latency_batches * batch_size, deployment.examples if deployment else 1),
                            repeats=self.latency_repeats)
        examples = serving_examples(val_dataloader, timing.examples)
        try:
            with _quiet():
                timings = measure_serving_many({str(i): m for i, m in enumerate(models)}, examples, forward, timing)
        except Exception as err:  # noqa: BLE001 - latency is a figure for the table, not worth a failure
            warnings.warn(f"costaware: Quantize could not time the models' forward ({type(err).__name__}: {err}); "
                          "pass forward_fn=", RuntimeWarning, stacklevel=3)
            return [None] * len(models)
        return [timings[str(i)].latency_ms_per_example if str(i) in timings else None for i in range(len(models))]

    def _choose(self, module: nn.Module, float_row: ModelRow, save_path: Optional[Union[str, Path]],
                train_usd: Optional[float], what: str, mode: str) -> tuple[nn.Module, list[ModelRow]]:
        """Keep the acceptable copy of lowest objective; the quantized row says why."""
        acceptable = [v for v in self.variants if v.acceptable]
        best = min(acceptable, key=lambda v: v.objective_value) if acceptable else None
        measured = [v for v in self.variants if v.layers]
        shown = best or (min(measured, key=lambda v: v.measured_objective) if measured else None)
        figures = "; ".join(v.summary(what) for v in self.variants)
        if shown is None:
            why = "; ".join(v.reason for v in self.variants) or "no nn.Linear layer to quantize"
            row = ModelRow(role="quantized", params=float_row.params, train_usd=train_usd,
                           note=f"rejected: {why}; the {float_row.role} is kept")
            return self._result(module, False, None, [float_row, row])
        size_bytes = shown.size_bytes
        if best is not None and save_path is not None:
            self.path = Path(save_path)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(best.model.state_dict(), self.path)
            size_bytes = self.path.stat().st_size
        verdict = (f"kept {best.backend}: {best.reason}" if best is not None else
                   f"rejected: {shown.reason}; the {float_row.role} is kept")
        row = ModelRow(role="quantized", metric=shown.metric, params=float_row.params, size_bytes=size_bytes,
                       latency_ms_per_example=shown.latency_ms, train_usd=train_usd,
                       path=str(self.path) if self.path else None, note=f"{verdict} ({figures})")
        return self._result(best.model if best else module, best is not None, best.backend if best else None,
                            [float_row, row])

    def _result(self, model: nn.Module, kept: bool, backend: Optional[str],
                rows: list[ModelRow]) -> tuple[nn.Module, list[ModelRow]]:
        self.model, self.kept, self.kept_backend, self.rows = model, kept, backend, rows
        return model, rows


class _Variant:
    """One quantized copy and its measurements, judged against the float model."""

    def __init__(self, backend: str, model: nn.Module, layers: list[str]) -> None:
        self.backend, self.model, self.layers = backend, model, layers
        self.metric: Optional[float] = None
        self.size_bytes: Optional[int] = None
        self.latency_ms: Optional[float] = None
        self.acceptable = False
        self.objective_value = math.inf
        self.measured_objective = math.inf  # the objective's value even when not acceptable
        self.reason = "no nn.Linear layer to quantize" if not layers else ""

    def judge(self, float_row: ModelRow, mode: str, max_drop: float, objective: str, min_gain: float,
              deployment: Optional[Deployment]) -> None:
        """Acceptable: the metric within ``max_drop`` and the objective ``min_gain`` lower, measured."""
        if not self.layers:
            return
        float_metric = float_row.metric
        drop = (_worsening(float_metric, self.metric, mode)
                if float_metric is not None and self.metric is not None else None)
        before, after, unit = _objective(float_row, self, objective, deployment)
        self.measured_objective = after if after is not None else math.inf
        if drop is None:
            self.reason = f"the metric could not be compared ({float_row.metric} -> {self.metric})"
            return
        change = (f"metric {'drops' if mode == 'max' else 'rises'} by {drop:.4g}" if drop > 0 else
                  f"metric improves by {-drop:.4g}" if drop < 0 else "metric unchanged")
        if drop > max_drop + 1e-12:
            self.reason = f"{change} > max_drop {max_drop:g}"
            return
        if before is None or after is None:
            self.reason = f"{change}, but its {objective} could not be measured"
            return
        gain = 1.0 - after / before if before > 0 else 0.0
        lowered = f"{objective} {before:.4g} -> {after:.4g} {unit} ({-100 * gain:+.1f}%)"
        if gain < min_gain:
            self.reason = f"{change} (within max_drop {max_drop:g}) but {lowered}, not {100 * min_gain:g}% lower"
            return
        self.acceptable, self.objective_value = True, after
        self.reason = f"{change}, within max_drop {max_drop:g}; {lowered}"

    def summary(self, what: str) -> str:
        if not self.layers:
            return f"{self.backend}: {self.reason or 'no layer'}"
        latency = f"{self.latency_ms:.4g} ms/example" if self.latency_ms is not None else "latency n/a"
        layers = f"{len(self.layers)} layer{'s' if len(self.layers) != 1 else ''}"
        return (f"{self.backend}: {layers}, {what} {_fmt(self.metric)}, {latency}, "
                f"{(self.size_bytes or 0) / 2**20:.2f} MiB")


def _objective(float_row: ModelRow, variant: _Variant, objective: str,
               deployment: Optional[Deployment]) -> tuple[Optional[float], Optional[float], str]:
    """(float's, variant's, unit) of the objective."""
    if objective == "memory":
        return float_row.size_bytes, variant.size_bytes, "bytes"
    if objective == "usd" and deployment is not None:
        scale = deployment.usd_per_hour / 3600.0  # ms per example -> $ per 1k requests
        as_usd = [None if v is None else v * scale for v in (float_row.latency_ms_per_example, variant.latency_ms)]
        return as_usd[0], as_usd[1], "$/1k requests"
    return float_row.latency_ms_per_example, variant.latency_ms, "ms/example"


def _check_arguments(bits: Any, max_drop: Any, backend: Any, objective: Any, min_gain: Any, deployment: Any,
                     quant_type: Any, blocksize: Any, int8_threshold: Any, skip_modules: Any, metric_fn: Any,
                     forward_fn: Any, latency_batches: Any, latency_repeats: Any, latency_threads: Any,
                     filename: Any) -> None:
    """``Quantize``'s arguments, checked before anything is spent (a ValueError names the argument)."""
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
    check_amount("max_drop", max_drop, why=" (in units of the monitored metric)")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    check_amount("min_gain", min_gain, maximum=1, strict_maximum=True)
    if deployment is not None and not isinstance(deployment, Deployment):
        raise ValueError(f"deployment must be a costaware.deploy.Deployment or None, got {deployment!r}")
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


def _backends(backend: str, bits: int) -> tuple[str, ...]:
    """The backends to try, checked now (before any compute): bitsandbytes for 4 bits."""
    if backend == "torch":
        if bits != 8:
            raise ValueError(f"backend='torch' quantizes to int8 only, got bits={bits}: use backend='bitsandbytes'")
        if not torch_quantization_available():
            raise QuantizationUnavailableError("this torch has no torch.ao.quantization.quantize_dynamic or int8 CPU "
                                               "engine: use backend='bitsandbytes'")
        return ("torch",)
    if backend == "bitsandbytes" or bits == 4:
        import_bitsandbytes()  # raises, saying how to install it
        return ("bitsandbytes",)
    found = tuple(b for b, ok in (("bitsandbytes", bitsandbytes_available()),
                                  ("torch", torch_quantization_available())) if ok)
    if not found:
        raise QuantizationUnavailableError("Quantize found neither bitsandbytes nor torch's dynamic int8 "
                                           "quantization: pip install costaware[quant]")
    return found


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _batch_size(batch: Any) -> int:
    from costaware.deploy import batch_size_of

    return batch_size_of(batch)


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
                model.trainer = previous  # type: ignore[assignment]  # torch stubs Module.__setattr__ as Tensor/Module
        metrics = trainer.callback_metrics
        if self.metric_name not in metrics:
            raise KeyError(f"the module logged no {self.metric_name!r} in validation (it logged "
                           f"{sorted(metrics) or 'nothing'}): pass metric_fn=")
        return float(metrics[self.metric_name])


def default_forward(model: nn.Module, batch: Any) -> Any:
    """The batch protocol, as ``Distill`` calls models: ``call_model(model, split_batch(None, batch)[0])``.

    A dict batch loses its ``"labels"`` key; ``(x, y)`` calls ``model(x)``; ``[x]`` too.
    """
    return call_model(model, split_batch(None, batch)[0])


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


def _all_float32(module: nn.Module) -> bool:
    return all(p.dtype == torch.float32 for p in module.parameters() if p.is_floating_point())


# ---------------------------------------------------------------------------------------------
# Reading the Trainer (no collectives: after_fit may run on rank zero alone)
# ---------------------------------------------------------------------------------------------


def _provider_metric_fn(trainer: Any, metric_name: str) -> Optional[MetricFn]:
    """A callback that logs ``metric_name`` itself and scores any model (``OnlineProbe``)."""
    if not metric_name:
        return None
    for callback in getattr(trainer, "callbacks", []):
        if getattr(callback, "log_name", None) == metric_name and callable(getattr(callback, "score", None)):
            return lambda model, _dataloader: callback.score(model)
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
