"""``Distill``: once the teacher stops, train a smaller student on its soft targets."""

from __future__ import annotations

import inspect
import math
import random
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
from lightning_utilities.core.rank_zero import rank_zero_info
from torch import nn

from costaware import _lightning
from costaware._torch import device_of
from costaware.records import DistillEvent, Event, QuantizeEvent, StrategyResultEvent
from costaware.strategies.base import (
    ModelRow,
    StopContext,
    StopStrategy,
    ledger_folder,
    restore_training_modes,
    training_modes,
)
from costaware.strategies.early_stop import (
    EarlyStop,
    accuracy,
    call_model,
    count_examples,
    count_params,
    cpu_threads,
    describe_model,
    split_batch,
    timed_latency,
    to_device,
    train_loader,
    val_loader,
)
from costaware.validation import check_amount, check_count

STUDENT_FILENAME = "student.pt"

#: ``metric_fn(model, dataloader) -> float``, as for ``Quantize``.
MetricFn = Callable[[nn.Module, Any], float]



class StudentShapeError(ValueError):
    """The student's output does not have the teacher's shape: it cannot learn its soft targets."""


class Distill(StopStrategy):
    r"""Distill the stopped teacher into a compact student, within what is left of the budget.

    At the end of the teacher's fit, the best teacher weights are restored (as ``EarlyStop``
    does) and the ``student`` (any ``nn.Module``) is trained by knowledge distillation on the
    teacher's training data, in a new fit: a fresh Trainer of the teacher's Lightning namespace
    (``type(trainer)``) on the same accelerator, device and precision, with no logger, no
    checkpointing, and its own ``CostMonitor`` at the teacher's prices. The loss is::

        alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))
            + (1 - alpha) * cross_entropy(student, labels)

    (only the first term, with weight 1, for batches without labels). A ``BudgetCap(max_usd=...)``
    holds the student's fit to what is left under the teacher's ``BudgetCap``; with nothing left
    the student is not trained and its row says so.

    The batch protocol (see ``costaware.strategies.early_stop``): each batch is split into
    ``(inputs, labels)`` by ``inputs_fn(batch)`` if given, else by the teacher's
    ``distill_inputs(batch)`` if it defines one, else a ``(x, y)`` tuple is split in two and a
    dict loses its ``"labels"`` key; teacher and student are both called as ``model(**inputs)``
    for a dict, ``model(*inputs)`` for a tuple, ``model(inputs)`` otherwise, and must return
    logits of the same shape, ``(batch, classes)`` or ``(batch, ..., classes)``. The shapes are
    checked on one batch when training starts, before the teacher spends anything, and again
    before the student trains (:class:`StudentShapeError`). The data is the teacher's
    ``trainer.train_dataloader`` (else its datamodule's ``train_dataloader()``) and, for the
    figures, ``trainer.val_dataloaders``.

    Costs: the student's spend is metered by its own ``CostMonitor`` (its ledger is
    ``<teacher ledger folder>/student/ledger.jsonl``) and recorded in the teacher's ledger as a
    ``distill`` event (``student_usd``, ``student_totals``, loss figures); the teacher's ledger
    totals stay the teacher's own. The student's row has ``train_usd`` = the student's spend
    alone; the run's total is the sum of the two rows.

    Rows: ``teacher`` and ``student``, each with ``metric`` = ``metric_fn`` on the validation
    set (default: accuracy of the logits' arg-max against the labels), parameters, size of the
    saved ``state_dict``, CPU latency per example over ``latency_batches`` validation batches and
    training cost. The student's weights are saved to ``student.pt`` next to its ledger. Then
    each strategy in ``then`` with an ``apply`` method (``Quantize``) is applied to the student,
    and its row for the result (role ``"quantized"``) is added.

    It runs inside the teacher's ``on_fit_end`` (a nested ``Trainer.fit``, verified to leave the
    teacher's Trainer finishing cleanly in both namespaces); one process only: with a DDP
    teacher it raises at the start of training. After a fit without ``MarginalGainStopping``,
    call :meth:`run` instead.

    Args:
        student: the model to train; called like the teacher's ``forward``.
        temperature: softmax temperature T of the soft targets (> 0).
        alpha: weight of the soft-target term, in [0, 1]; 1 - alpha weighs the hard labels.
        max_epochs: epochs of the student's fit.
        max_steps: steps of the student's fit (-1: no limit but ``max_epochs``).
        lr: AdamW learning rate of the student.
        weight_decay: AdamW weight decay.
        inputs_fn: ``inputs_fn(batch) -> (inputs, labels)``, overriding the batch protocol.
        metric_fn: ``metric_fn(model, dataloader) -> float`` for the rows (and for ``then``),
            higher is better unless ``metric_mode="min"``; default: accuracy.
        metric_mode: ``"max"`` or ``"min"``: the direction of ``metric_fn``.
        restore_best: restore the teacher's best weights before distilling (``EarlyStop``).
        then: strategies applied to the trained student (e.g. ``Quantize(bits=8)``): one, or a
            list, each with ``apply(module, val_dataloader, metric_fn, mode=, role=, save_path=,
            train_usd=, metric_name=)``.
        save_dir: folder for ``student.pt`` and the student's ledger; default
            ``<teacher ledger folder>/student``.
        latency_batches: validation batches timed for the latency figures; 0 skips them.
        latency_threads: torch CPU threads while the latencies are measured (and while ``then``
            strategies measure theirs), e.g. 1 for single-request serving; figures with one
            thread are also steadier on a shared machine. Default: the current setting.
        trainer_kwargs: more arguments for the student's Trainer (``{"gradient_clip_val": 1}``).

    Raises:
        ValueError: at construction, naming the argument: a student that is not an
            ``nn.Module``, T <= 0, alpha outside [0, 1], bad epochs/steps/lr, a ``then``
            without ``apply``, an unknown ``metric_mode``.

    Example::

        from pytorch_lightning import Trainer
        from costaware import CostMonitor, MarginalGainStopping
        from costaware.strategies import Distill

        student = nn.Sequential(nn.EmbeddingBag(30522, 64), nn.Linear(64, 2))
        trainer = Trainer(callbacks=[
            CostMonitor(usd_per_host_hour=0.1),
            MarginalGainStopping(monitor="val_acc", usd_per_point=0.01,
                                 then=Distill(student, temperature=2.0, alpha=0.5, max_epochs=2)),
        ])
        trainer.fit(teacher, train_loader, val_loader)
        stopping = trainer.callbacks[1]
        print(stopping.results)        # [ModelRow(role="teacher", ...), ModelRow(role="student", ...)]
    """

    name = "distill"

    def __init__(
        self,
        student: nn.Module,
        temperature: float = 2.0,
        alpha: float = 0.5,
        max_epochs: int = 1,
        max_steps: int = -1,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        inputs_fn: Optional[Callable[[Any], tuple]] = None,
        metric_fn: Optional[MetricFn] = None,
        metric_mode: str = "max",
        restore_best: bool = True,
        then: Optional[Union[Any, Sequence[Any]]] = None,
        save_dir: Optional[str] = None,
        latency_batches: int = 3,
        latency_threads: Optional[int] = None,
        trainer_kwargs: Optional[dict] = None,
    ) -> None:
        if not isinstance(student, nn.Module):
            raise ValueError(f"student must be a torch.nn.Module, got {type(student).__name__}")
        check_amount("temperature", temperature, minimum=0, strict=True)
        check_amount("alpha", alpha, minimum=0, maximum=1)
        check_amount("lr", lr, minimum=0, strict=True)
        check_amount("weight_decay", weight_decay, minimum=0)
        if isinstance(max_epochs, bool) or not isinstance(max_epochs, int) or (max_epochs < 1 and max_epochs != -1):
            raise ValueError(f"max_epochs must be an int >= 1 (or -1 with max_steps), got {max_epochs!r}")
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or (max_steps < 1 and max_steps != -1):
            raise ValueError(f"max_steps must be an int >= 1 or -1 (no limit), got {max_steps!r}")
        if max_epochs == -1 and max_steps == -1:
            raise ValueError("max_epochs=-1 needs max_steps >= 1: the student's fit must end")
        for arg, fn in (("inputs_fn", inputs_fn), ("metric_fn", metric_fn)):
            if fn is not None and not callable(fn):
                raise ValueError(f"{arg} must be a callable or None, got {fn!r}")
        if metric_mode not in ("max", "min"):
            raise ValueError(f"metric_mode must be one of ('max', 'min'), got {metric_mode!r}")
        check_count("latency_batches", latency_batches)
        check_count("latency_threads", latency_threads, minimum=1, allow_none=True)
        if trainer_kwargs is not None and not isinstance(trainer_kwargs, dict):
            raise ValueError(f"trainer_kwargs must be a dict of Trainer arguments, got {trainer_kwargs!r}")
        followers = [] if then is None else list(then) if isinstance(then, (list, tuple)) else [then]
        for follower in followers:
            if not callable(getattr(follower, "apply", None)):
                raise ValueError(f"then must hold strategies with an apply(module, val_dataloader, metric_fn, ...) "
                                 f"method such as Quantize, got {follower!r}")
        self.student = student
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.max_epochs = max_epochs
        self.max_steps = max_steps
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.inputs_fn = inputs_fn
        self.metric_fn = metric_fn
        self.metric_mode = metric_mode
        self.then = followers
        self.save_dir = save_dir
        self.latency_batches = latency_batches
        self.latency_threads = latency_threads
        self.trainer_kwargs = dict(trainer_kwargs or {})
        self.teacher_strategy = EarlyStop(restore_best=restore_best, latency_batches=0)
        self.losses: list[float] = []  # the student's training loss, step by step
        self.rows: list[ModelRow] = []
        self.student_trainer: Optional[Any] = None
        self.student_monitor: Optional[Any] = None

    # ------------------------------------------------------------------------------------------
    # Hooks called by MarginalGainStopping
    # ------------------------------------------------------------------------------------------

    def on_train_start(self, context: StopContext) -> None:
        """Fail before the teacher trains: one process only, and a student of the right shape."""
        trainer = context.trainer
        if trainer.world_size > 1:
            raise ValueError(f"Distill trains its student in one process, but this run has world_size="
                             f"{trainer.world_size}: drop Distill from `then` and call Distill.run(trainer, model) "
                             "in a one-device script after the fit")
        loader = val_loader(trainer) or train_loader(trainer)
        if loader is None:
            return
        with _kept_rng():
            batch = next(iter(loader), None)
        if batch is not None:
            device = trainer.strategy.root_device
            with trainer.precision_plugin.forward_context():
                self._check_shapes(context.pl_module, to_device(batch, device), device)

    def on_validation(self, context: StopContext, value: float) -> None:
        self.teacher_strategy.on_validation(context, value)

    def on_stop(self, context: StopContext) -> None:
        self.teacher_strategy.on_stop(context)

    def after_fit(self, context: StopContext) -> list[ModelRow]:
        """Restore the best teacher, distill the student, measure both; returns their rows."""
        return self.run(context.trainer, context.pl_module, monitor=context.monitor,
                        budget_left_usd=context.budget_left_usd, _context=context)

    def state_dict(self) -> dict:
        return {"teacher": self.teacher_strategy.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.teacher_strategy.load_state_dict(state_dict.get("teacher", {}))

    # ------------------------------------------------------------------------------------------
    # The distillation
    # ------------------------------------------------------------------------------------------

    def run(self, trainer: Any, pl_module: Any, monitor: Optional[Any] = None, budget_left_usd: Optional[float] = None,
            train_dataloader: Optional[Iterable] = None, val_dataloader: Optional[Iterable] = None,
            _context: Optional[StopContext] = None) -> list[ModelRow]:
        """Distill ``pl_module`` (the teacher, after ``trainer.fit``) into the student.

        The explicit API for a teacher trained without ``MarginalGainStopping`` (or with DDP:
        call it in a one-device process on the saved teacher).

        Args:
            trainer: the teacher's Trainer, after its fit (for the namespace, devices, data).
            pl_module: the teacher.
            monitor: the teacher's ``CostMonitor`` (default: the one among ``trainer.callbacks``),
                for prices, the ledger and the teacher's cost.
            budget_left_usd: dollars the student may spend (None: uncapped).
            train_dataloader: default ``trainer.train_dataloader``.
            val_dataloader: default ``trainer.val_dataloaders``.

        Returns:
            The ``teacher`` and ``student`` rows, then one per ``then`` strategy.

        Raises:
            StudentShapeError: the student's logits do not have the teacher's shape.
            ValueError: no training data.
        """
        from costaware.callbacks.metering import run_meter

        monitor = run_meter(trainer) if monitor is None else getattr(monitor, "meter", monitor)  # a CostMonitor's
        context = _context or StopContext(trainer=trainer, pl_module=pl_module, monitor=monitor,
                                          budget_left_usd=budget_left_usd)
        teacher_row = self.teacher_strategy.after_fit(context)[0]  # restores the best weights
        train_data = train_dataloader if train_dataloader is not None else train_loader(trainer)
        val_data = val_dataloader if val_dataloader is not None else val_loader(trainer)
        if train_data is None:
            raise ValueError("Distill found no training data: the teacher's Trainer has no train_dataloader; "
                             "pass train_dataloader=")
        device = trainer.strategy.root_device
        with _kept_rng():
            first = next(iter(train_data))
        self._check_shapes(pl_module, to_device(first, device), device)

        split = self._split(pl_module)
        metric_fn = self.metric_fn or _AccuracyMetric(split)
        ledger = getattr(monitor, "ledger", None)
        save_dir = Path(self.save_dir) if self.save_dir is not None else ledger_folder(trainer, monitor) / "student"
        teacher_usd = float(monitor.totals.usd) if monitor is not None else None
        best = self.teacher_strategy.best_value
        measured_metric = _safe_metric(metric_fn, pl_module, val_data, device)
        if measured_metric is not None:  # else (no labels to score with): the best monitored value
            teacher_row.metric = measured_metric
        with cpu_threads(self.latency_threads):  # (EarlyStop's row has the size: no second torch.save)
            teacher_row.latency_ms_per_example, latency_note = timed_latency(pl_module, val_data, split,
                                                                             self.latency_batches)
        teacher_row.train_usd = teacher_usd
        teacher_row.note = "; ".join(x for x in (
            f"metric: {self._metric_name()} on the validation set" if measured_metric is not None else
            f"metric: best {context.metric_name}",
            f"best {context.metric_name}={best:.6g}" if best is not None and context.metric_name else "",
            self.teacher_strategy.note, latency_note) if x)

        if budget_left_usd is not None and budget_left_usd <= 1e-12:  # (not a rounding error's worth)
            note = f"not trained: no budget left (${budget_left_usd:.4g} under the teacher's BudgetCap)"
            if ledger is not None:
                ledger.record(DistillEvent(trained=False, note=note))
            rank_zero_info(f"costaware: Distill: {note}")
            with cpu_threads(self.latency_threads):
                row = describe_model(self.student, "student", val_data, split, self.latency_batches, train_usd=0.0)
            row.note = note
            self.rows = [teacher_row, row]
            return self.rows

        started_s = time.perf_counter()
        self._fit_student(trainer, pl_module, monitor, train_data, split, budget_left_usd, save_dir)
        seconds = time.perf_counter() - started_s
        student_totals = self.student_monitor.totals
        stopped_by_budget = any(getattr(cb, "stopped", None) is not None for cb in self.student_trainer.callbacks
                                if type(cb).__name__ == "BudgetCap")
        self.student.cpu()
        path = save_dir / STUDENT_FILENAME
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.student.state_dict(), path)
        row = ModelRow(role="student", params=count_params(self.student), size_bytes=path.stat().st_size,
                       train_usd=float(student_totals.usd), path=str(path))
        with cpu_threads(self.latency_threads):
            row.latency_ms_per_example, row.note = timed_latency(self.student, val_data, split, self.latency_batches)
        row.metric = _safe_metric(metric_fn, self.student, val_data, device)
        steps = self.student_trainer.global_step
        row.note = "; ".join(x for x in (
            f"metric: {self._metric_name()} on the validation set",
            f"distilled for {steps} steps (T={self.temperature:g}, alpha={self.alpha:g})",
            "stopped by the budget cap" if stopped_by_budget else "", row.note) if x)
        if ledger is not None:
            ledger.record(DistillEvent(
                trained=True, student_usd=float(student_totals.usd), student_totals=student_totals.to_dict(),
                steps=steps, first_loss=self.losses[0] if self.losses else None,
                last_loss=self.losses[-1] if self.losses else None, temperature=self.temperature, alpha=self.alpha,
                budget_left_usd=budget_left_usd, stopped_by_budget=stopped_by_budget, duration_s=seconds,
                student_ledger=str(self.student_monitor.ledger.path) if self.student_monitor.ledger else None,
                path=str(path)))
        rank_zero_info(f"costaware: Distill trained the student for {steps} steps, ${student_totals.usd:.4g}: "
                       f"{self._metric_name()} {_fmt(row.metric)} (teacher {_fmt(teacher_row.metric)}); "
                       f"saved to {path}")
        self.rows = [teacher_row, row]
        for follower in self.then:
            with cpu_threads(self.latency_threads):
                self.rows += self._apply_follower(follower, val_data, split, metric_fn, row, save_dir, context)
        return self.rows

    # ------------------------------------------------------------------------------------------

    def _split(self, pl_module: Any) -> Callable[[Any], tuple]:
        return lambda batch: split_batch(pl_module, batch, self.inputs_fn)

    def _metric_name(self) -> str:
        return getattr(self.metric_fn, "__name__", "metric_fn") if self.metric_fn is not None else "accuracy"

    @torch.no_grad()
    def _check_shapes(self, teacher: Any, batch: Any, device: torch.device) -> None:
        """Call teacher and student on one batch (on ``device``) and compare their logits' shapes."""
        inputs, _ = split_batch(teacher, batch, self.inputs_fn)
        models = (teacher, self.student)
        places = [device_of(m) for m in models]
        modes = [training_modes(m) for m in models]
        try:
            for m in models:
                m.to(device).eval()
            t_out = call_model(teacher, inputs)
            s_out = call_model(self.student, inputs)
        finally:
            for m, place, mode in zip(models, places, modes):
                m.to(place)
                restore_training_modes(mode)
        if not isinstance(s_out, torch.Tensor) or not isinstance(t_out, torch.Tensor):
            raise StudentShapeError(f"Distill needs logits tensors from teacher and student, got "
                                    f"{type(t_out).__name__} and {type(s_out).__name__}")
        if s_out.shape != t_out.shape:
            raise StudentShapeError(
                f"Distill: the student's output has shape {tuple(s_out.shape)} but the teacher's has "
                f"{tuple(t_out.shape)} on the same batch: the student must map the teacher's inputs to logits of "
                "the same shape (same number of classes)")

    def _fit_student(self, trainer: Any, pl_module: Any, monitor: Optional[Any], train_data: Iterable,
                     split: Callable, budget_left_usd: Optional[float], save_dir: Path) -> None:
        namespace = _lightning.namespace_of(trainer)
        if namespace is None:
            raise TypeError(f"{type(trainer).__name__} is neither a pytorch_lightning nor a lightning.pytorch Trainer")
        from costaware.callbacks import BudgetCap, CostMonitor  # (a Callback of either namespace)

        student_monitor = CostMonitor(**_monitor_kwargs(monitor), ledger_dir=str(save_dir))
        callbacks: list = [student_monitor]
        if budget_left_usd is not None:
            callbacks.append(BudgetCap(max_usd=budget_left_usd))
        device = trainer.strategy.root_device
        kwargs = dict(
            accelerator={"cuda": "gpu"}.get(device.type, device.type),
            devices=[device.index] if device.type == "cuda" and device.index is not None else 1,
            num_nodes=1, precision=str(trainer.precision), max_epochs=self.max_epochs, max_steps=self.max_steps,
            logger=False, enable_checkpointing=False, enable_model_summary=False,
            enable_progress_bar=trainer.progress_bar_callback is not None, limit_val_batches=0,
            num_sanity_val_steps=0, log_every_n_steps=trainer.log_every_n_steps, default_root_dir=str(save_dir),
            callbacks=callbacks,
        )
        kwargs.update(self.trainer_kwargs)
        pl = _lightning.load(namespace)
        module = _distill_module_class(pl)(self.student, pl_module, split, self.temperature, self.alpha, self.lr,
                                           self.weight_decay)
        teacher_modes = training_modes(pl_module)
        self.student_trainer = type(trainer)(**kwargs)
        self.student_monitor = student_monitor
        rank_zero_info(f"costaware: Distill: training the student ({count_params(self.student):,} parameters) "
                       + (f"within ${budget_left_usd:.4g}" if budget_left_usd is not None else "uncapped"))
        try:
            self.student_trainer.fit(module, train_dataloaders=train_data)
        finally:
            pl_module.cpu()
            restore_training_modes(teacher_modes)
        self.losses = [float(x) for x in module.losses]

    def _apply_follower(self, follower: Any, val_data: Optional[Iterable], split: Callable, metric_fn: MetricFn,
                        student_row: ModelRow, save_dir: Path, context: StopContext) -> list[ModelRow]:
        """Apply ``Quantize``-like strategies to the student; keep their row for the result."""
        kwargs = dict(mode=self.metric_mode, role="student",
                      save_path=save_dir / f"student_{getattr(follower, 'name', 'then')}.pt",
                      train_usd=student_row.train_usd, metric_name=self._metric_name())
        if _accepts(follower.apply, "forward_fn"):  # the student is called by the batch protocol
            kwargs["forward_fn"] = lambda model, batch: call_model(model, split(batch)[0])
        started_s = time.perf_counter()
        _, rows = follower.apply(self.student, val_data, metric_fn, **kwargs)
        ledger = getattr(context.monitor, "ledger", None)
        if ledger is not None:
            ledger.record(_follower_event(follower, rows, of="student", metric=self._metric_name(),
                                         mode=self.metric_mode, duration_s=time.perf_counter() - started_s))
        return [r for r in rows if r.role != "student"]


# ----------------------------------------------------------------------------------------------
# The student's LightningModule
# ----------------------------------------------------------------------------------------------


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: Optional[torch.Tensor],
                      temperature: float, alpha: float) -> torch.Tensor:
    """``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, labels)``.

    Logits of shape ``(..., classes)`` are flattened to ``(-1, classes)``; without labels only
    the soft term counts (weight 1). The ``T^2`` keeps the soft term's gradients the size of the
    hard term's whatever the temperature (Hinton et al., 2015).
    """
    classes = student_logits.shape[-1]
    s = student_logits.reshape(-1, classes).float()
    t = teacher_logits.reshape(-1, classes).float()
    soft = nn.functional.kl_div(nn.functional.log_softmax(s / temperature, dim=-1),
                                nn.functional.log_softmax(t / temperature, dim=-1),
                                reduction="batchmean", log_target=True) * temperature**2
    if labels is None or alpha >= 1.0:
        return soft
    hard = nn.functional.cross_entropy(s, labels.reshape(-1).long())
    return alpha * soft + (1.0 - alpha) * hard


_MODULE_CLASSES: dict = {}


def _distill_module_class(pl: Any) -> type:
    """A LightningModule of namespace ``pl`` that trains the student on the frozen teacher."""
    if pl.__name__ in _MODULE_CLASSES:
        return _MODULE_CLASSES[pl.__name__]

    class DistillModule(pl.LightningModule):
        def __init__(self, student: nn.Module, teacher: nn.Module, split: Callable, temperature: float, alpha: float,
                     lr: float, weight_decay: float) -> None:
            super().__init__()
            self.student = student
            object.__setattr__(self, "teacher", teacher)  # not a submodule: not trained, not checkpointed
            self.split = split
            self.temperature, self.alpha, self.lr, self.weight_decay = temperature, alpha, lr, weight_decay
            self.losses: list = []

        def on_fit_start(self) -> None:
            self.teacher.to(self.device)
            self.teacher.eval()

        def forward(self, inputs: Any) -> torch.Tensor:
            return call_model(self.student, inputs)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            inputs, labels = self.split(batch)
            with torch.no_grad():
                teacher_logits = call_model(self.teacher, inputs)
            student_logits = call_model(self.student, inputs)
            loss = distillation_loss(student_logits, teacher_logits.detach(), labels, self.temperature, self.alpha)
            self.losses.append(loss.detach())
            self.log("distill_loss", loss, prog_bar=True, batch_size=count_examples(inputs, labels))
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            params = [p for p in self.student.parameters() if p.requires_grad]
            return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)

    DistillModule.__qualname__ = DistillModule.__name__
    _MODULE_CLASSES[pl.__name__] = DistillModule
    return DistillModule


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


class _AccuracyMetric:
    """``metric_fn(model, dataloader)``: accuracy of the arg-max over the loader (CPU or GPU)."""

    __name__ = "accuracy"

    def __init__(self, split: Callable) -> None:
        self.split = split

    @torch.no_grad()
    def __call__(self, model: nn.Module, dataloader: Iterable) -> float:
        device = device_of(model)
        modes = training_modes(model)
        model.eval()
        try:
            correct, examples = 0.0, 0
            for batch in dataloader:
                inputs, labels = self.split(to_device(batch, device))
                if labels is None:
                    return math.nan
                n = count_examples(inputs, labels)
                correct += accuracy(call_model(model, inputs), labels) * n
                examples += n
            return correct / examples if examples else math.nan
        finally:
            restore_training_modes(modes)


def _safe_metric(metric_fn: MetricFn, model: nn.Module, loader: Optional[Iterable],
                 device: torch.device) -> Optional[float]:
    """``metric_fn`` on the Trainer's device (faster than the CPU on a GPU run), then back."""
    if loader is None:
        return None
    original = device_of(model)
    model.to(device)
    try:
        value = metric_fn(model, loader)
    finally:
        model.to(original)
    value = float(value.item() if isinstance(value, torch.Tensor) else value)
    return value if math.isfinite(value) else None


def _follower_event(follower: Any, rows: list, **settings: Any) -> Event:
    """A follower's result as one record: a ``Quantize`` as the quantize event (with its verdict), others as rows."""
    if hasattr(follower, "bits") and hasattr(follower, "kept"):
        path = getattr(follower, "path", None)
        return QuantizeEvent.from_rows(rows, bits=follower.bits, quant_type=getattr(follower, "label", None),
                                       kept=follower.kept, max_drop=getattr(follower, "max_drop", None),
                                       path=str(path) if path else None, **settings)
    return StrategyResultEvent(strategy=getattr(follower, "name", type(follower).__name__),
                               rows=[dict(vars(r)) for r in rows])


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _monitor_kwargs(monitor: Optional[Any]) -> dict:
    """The teacher meter's prices and meter settings, for the student's."""
    if monitor is None:
        return {}
    return {k: v for k, v in monitor.settings().items() if k != "ledger_dir"}


def _accepts(fn: Callable, keyword: str) -> bool:
    """Whether ``fn`` takes ``keyword=`` (a ``then`` strategy other than ``Quantize`` may not)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == keyword or p.kind is p.VAR_KEYWORD for p in params)


class _kept_rng:
    """Draw a batch without moving the global random state (the teacher's run stays the same)."""

    def __enter__(self) -> None:
        self._torch = torch.random.get_rng_state()
        self._python = random.getstate()

    def __exit__(self, *exc: Any) -> None:
        torch.random.set_rng_state(self._torch)
        random.setstate(self._python)

