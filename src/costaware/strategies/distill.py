"""``Distill``: once the teacher stops, train a smaller student on its soft targets."""

from __future__ import annotations

import inspect
import math
import random
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Sized, Union

import torch
from lightning_utilities.core.rank_zero import rank_zero_info
from torch import nn

from costaware import _lightning
from costaware._torch import device_of
from costaware.deploy import Deployment
from costaware.records import DistillEvent, DistillOrAnnotateEvent, QuantizeEvent
from costaware.strategies.base import (
    ModelRow,
    StopContext,
    StopStrategy,
    ledger_folder,
    restore_training_modes,
    training_modes,
)
from costaware.strategies.batches import call_model, count_examples, split_batch, to_device, train_loader, val_loader
from costaware.strategies.distill_module import distill_module_class
from costaware.strategies.early_stop import EarlyStop
from costaware.strategies.lifetime import Candidate, LifetimeJudge
from costaware.strategies.measure import accuracy, count_params, cpu_threads, describe_model, timed_latency
from costaware.strategies.students import TruncatedStudent, served_copy
from costaware.validation import check_amount, check_count

STUDENT_FILENAME = "student.pt"

#: ``metric_fn(model, dataloader) -> float``, as for ``Quantize``.
MetricFn = Callable[[nn.Module, Any], float]
#: A student, or ``factory(trained_teacher) -> student`` called when the distillation starts.
StudentSpec = Union[nn.Module, Callable[[nn.Module], nn.Module]]


class StudentShapeError(ValueError):
    """The student's output does not have the teacher's shape: it cannot learn its soft targets."""


class Distill(StopStrategy):
    r"""Distill the stopped teacher into a compact student, within what is left of the budget.

    At the end of the teacher's fit, the best teacher weights are restored (as ``EarlyStop``
    does) and the student is trained by knowledge distillation on the teacher's training data
    (and ``unlabelled_dataloader``'s, if given), in a new fit: a fresh Trainer of the teacher's
    Lightning namespace (``type(trainer)``) on the same accelerator, device and precision, with no
    logger, no checkpointing, and its own ``CostMonitor`` at the teacher's prices. The loss is::

        alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))
            + (1 - alpha) * cross_entropy(student, labels)

    (only the first term, with weight 1, for batches without labels). A ``BudgetCap(max_usd=...)``
    holds the student's fit to what is left under the teacher's ``BudgetCap``; with nothing left
    the student is not trained and its row says so.

    The student: any ``nn.Module``, or a factory ``student(trained_teacher) -> nn.Module`` called
    when the distillation starts. The default, :class:`TruncatedStudent` ``(layers=2)``, is a copy
    of the trained teacher (adapters merged) with 2 of its transformer layers. On SST-2 with the
    packaged MiniLM (6 layers), trained on soft targets over 9,000 phrases, 2 layers keep 98% of
    the teacher's test accuracy at 1/2.8 of its CPU latency, 1 layer 96-100% at about 1/5
    (``benchmarks/results/distill_sst2.txt``).

    The student contract (the batch protocol, ``costaware.strategies.batches``): each batch is
    split into ``(inputs, labels)`` by ``inputs_fn(batch)`` if given, else by the teacher's
    ``distill_inputs(batch)`` if it defines one, else a ``(x, y)`` tuple is split in two and a
    dict loses its ``"labels"`` key; teacher and student are both called as ``model(**inputs)``
    for a dict, ``model(*inputs)`` for a tuple, ``model(inputs)`` otherwise, and must return
    logits of the same shape, ``(batch, classes)`` or ``(batch, ..., classes)``. The shapes are
    checked on one batch when training starts, before the teacher spends anything, and again
    before the student trains (:class:`StudentShapeError`). ``Quantize`` calls the student the
    same way. The data is the teacher's ``trainer.train_dataloader`` (else its datamodule's) and,
    for the figures, ``trainer.val_dataloaders``.

    Costs: the student's spend is metered by its own ``CostMonitor`` (its ledger is
    ``<teacher ledger folder>/student/ledger.jsonl``) and recorded in the teacher's ledger as a
    ``distill`` event; the teacher's ledger totals stay the teacher's own. The student's row has
    ``train_usd`` = the student's spend alone; the run's total is the sum of the rows.

    With a :class:`~costaware.deploy.Deployment` (the serving load and price), the choice is made
    by what each model costs over its life (the teacher is timed as it would be served: a CPU copy
    with its LoRA/peft adapters merged, which costs nothing in accuracy): before training, the
    teacher and the untrained student are timed on the serving device, and a student whose serving
    savings could not repay its estimated training cost (at the teacher's dollars per training
    batch) is not trained; after
    training, teacher, student and quantized student get serving dollars per 1,000 requests,
    lifetime dollars and value (metric points x ``usd_per_point`` - lifetime dollars), and the row
    of highest value that meets the SLA has ``deploy=True`` (ledger: ``deploy_candidate`` and
    ``deploy_recommendation`` events). With ``usd_per_label``, a ``distill_or_annotate`` event
    says how many labels the switch's dollars would have bought.

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
        student: the model to train, or a factory of it (see above); default
            ``TruncatedStudent(layers=2)``.
        temperature: softmax temperature T of the soft targets (> 0).
        alpha: weight of the soft-target term, in [0, 1]; 1 - alpha weighs the hard labels.
        max_epochs: epochs of the student's fit.
        max_steps: steps of the student's fit (-1: no limit but ``max_epochs``).
        lr: AdamW learning rate of the student (the peak, with ``warmup_fraction``).
        weight_decay: AdamW weight decay.
        warmup_fraction: with a number, the learning rate rises linearly over that share of the
            student's steps, then falls linearly to zero; None: constant.
        unlabelled_dataloader: more in-domain batches (labels absent or ignored... as the batch
            protocol splits them), distilled on the teacher's soft targets alongside the
            training data.
        inputs_fn: ``inputs_fn(batch) -> (inputs, labels)``, overriding the batch protocol.
        metric_fn: ``metric_fn(model, dataloader) -> float`` for the rows (and for ``then``),
            higher is better unless ``metric_mode="min"``; default: accuracy.
        metric_mode: ``"max"`` or ``"min"``: the direction of ``metric_fn``.
        restore_best: restore the teacher's best weights before distilling (``EarlyStop``).
        then: strategies applied to the trained student (e.g. ``Quantize(bits=8)``): one, or a
            list, each with ``apply(module, val_dataloader, metric_fn, mode=, role=, save_path=,
            train_usd=, metric_name=)``.
        deployment: the serving load and price that decide whether the student pays.
        usd_per_label: what one more labelled example would cost, dollars (distill or annotate).
        save_dir: folder for ``student.pt`` and the student's ledger; default
            ``<teacher ledger folder>/student``.
        latency_batches: validation batches timed for the latency figures; 0 skips them.
        latency_threads: torch CPU threads while the latencies are measured (and while ``then``
            strategies measure theirs), e.g. 1 for single-request serving. Default: the current
            setting.
        trainer_kwargs: more arguments for the student's Trainer (``{"gradient_clip_val": 1}``).

    Raises:
        ValueError: at construction, naming the argument: a student that is neither an
            ``nn.Module`` nor a callable, T <= 0, alpha outside [0, 1], bad epochs/steps/lr, a
            ``then`` without ``apply``, an unknown ``metric_mode``, a ``deployment`` that is not
            a ``Deployment``.

    Example::

        from pytorch_lightning import Trainer
        from costaware import CostMonitor, MarginalGainStopping
        from costaware.deploy import Deployment
        from costaware.strategies import Distill, Quantize, TruncatedStudent

        distill = Distill(TruncatedStudent(layers=2), temperature=2.0, alpha=0.5, max_epochs=2,
                          then=Quantize(bits=8), deployment=Deployment(requests=10**6, usd_per_hour=0.05))
        trainer = Trainer(callbacks=[
            CostMonitor(usd_per_host_hour=0.1),
            MarginalGainStopping(monitor="val_acc", usd_per_point=0.01, then=distill),
        ])
        trainer.fit(teacher, train_loader, val_loader)
        print(trainer.callbacks[1].results)  # teacher, student, quantized rows; deploy=True on the one to serve
    """

    name = "distill"

    def __init__(
        self,
        student: Optional[StudentSpec] = None,
        temperature: float = 2.0,
        alpha: float = 0.5,
        max_epochs: int = 1,
        max_steps: int = -1,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_fraction: Optional[float] = None,
        unlabelled_dataloader: Optional[Iterable] = None,
        inputs_fn: Optional[Callable[[Any], tuple]] = None,
        metric_fn: Optional[MetricFn] = None,
        metric_mode: str = "max",
        restore_best: bool = True,
        then: Optional[Union[Any, Sequence[Any]]] = None,
        deployment: Optional[Deployment] = None,
        usd_per_label: Optional[float] = None,
        save_dir: Optional[str] = None,
        latency_batches: int = 3,
        latency_threads: Optional[int] = None,
        trainer_kwargs: Optional[dict] = None,
    ) -> None:
        student = TruncatedStudent(layers=2) if student is None else student
        _check_arguments(student=student, temperature=temperature, alpha=alpha, lr=lr, weight_decay=weight_decay,
                         warmup_fraction=warmup_fraction, usd_per_label=usd_per_label, max_epochs=max_epochs,
                         max_steps=max_steps, inputs_fn=inputs_fn, metric_fn=metric_fn, metric_mode=metric_mode,
                         deployment=deployment, latency_batches=latency_batches, latency_threads=latency_threads,
                         trainer_kwargs=trainer_kwargs)
        self.then = _followers(then)
        self.student: Optional[nn.Module] = student if isinstance(student, nn.Module) else None
        self.student_factory: Optional[Callable[[nn.Module], nn.Module]] = (
            None if isinstance(student, nn.Module) else student)
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.max_epochs = max_epochs
        self.max_steps = max_steps
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.warmup_fraction = warmup_fraction
        self.unlabelled_dataloader = unlabelled_dataloader
        self.inputs_fn = inputs_fn
        self.metric_fn = metric_fn
        self.metric_mode = metric_mode
        self.deployment = deployment
        self.usd_per_label = usd_per_label
        self.save_dir = save_dir
        self.latency_batches = latency_batches
        self.latency_threads = latency_threads
        self.trainer_kwargs = dict(trainer_kwargs or {})
        self.teacher_strategy = EarlyStop(restore_best=restore_best, latency_batches=0)
        self.losses: list[float] = []  # the student's training loss, step by step
        self.rows: list[ModelRow] = []
        self.student_trainer: Optional[Any] = None
        self.student_monitor: Optional[Any] = None
        self.judge: Optional[LifetimeJudge] = None  # the lifetime figures, with a deployment
        self._curve: list[tuple[int, float]] = []  # (training batches, monitored value) of the teacher

    # ------------------------------------------------------------------------------------------
    # Hooks called by MarginalGainStopping
    # ------------------------------------------------------------------------------------------

    def check_before_fit(self) -> None:
        """The ``then`` strategies run after the teacher and the student have trained: check them now, with the
        deployment Distill will pass them."""
        for follower in self.then:
            check = getattr(follower, "check_before_fit", None)
            if check is None:
                continue
            if self.deployment is not None and _accepts(check, "deployment"):
                check(deployment=self.deployment)
            else:
                check()

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
            student = self.student
            if student is None:
                assert self.student_factory is not None, "__init__ keeps a student or its factory"
                student = self.student_factory(context.pl_module)
            with trainer.precision_plugin.forward_context():
                self._check_shapes(context.pl_module, student, to_device(batch, device), device)

    def on_validation(self, context: StopContext, value: float) -> None:
        self.teacher_strategy.on_validation(context, value)
        if math.isfinite(value):
            self._curve.append((int(context.trainer.global_step), float(value)))

    def on_stop(self, context: StopContext) -> None:
        self.teacher_strategy.on_stop(context)

    def after_fit(self, context: StopContext) -> list[ModelRow]:
        """Restore the best teacher, distill the student, measure both; returns their rows."""
        return self.run(context.trainer, context.pl_module, monitor=context.monitor,
                        budget_left_usd=context.budget_left_usd, _context=context)

    def state_dict(self) -> dict:
        return {"teacher": self.teacher_strategy.state_dict(), "curve": list(self._curve)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.teacher_strategy.load_state_dict(state_dict.get("teacher", {}))
        self._curve = [tuple(p) for p in state_dict.get("curve", [])]

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

        # The run's meter (a CostMonitor's, or a cap's or policy's own): its prices price the student.
        monitor = run_meter(trainer) if monitor is None else getattr(monitor, "meter", monitor)
        context = _context or StopContext(trainer=trainer, pl_module=pl_module, monitor=monitor,
                                          budget_left_usd=budget_left_usd)
        run = _Run(self, context, train_dataloader, val_dataloader)
        teacher_row = run.teacher_row = self._teacher_row(run)
        self._prepare_student(run)
        skip = self._reason_not_to_train(run, budget_left_usd)
        if skip:
            return self._untrained(run, teacher_row, skip)
        student_row = self._train(run, budget_left_usd)
        self.rows = [teacher_row, student_row]
        for follower in self.then:
            with cpu_threads(self.latency_threads):
                self.rows += self._apply_follower(follower, run, student_row)
        if self.judge is not None:
            self.judge.decide(self.rows, run.ledger, switch_usd=(student_row.train_usd or 0.0) + run.quantize_usd)
        self._distill_or_annotate(run)
        return self.rows

    def _teacher_row(self, run: _Run) -> ModelRow:
        """Restore the best teacher; its row, measured as the student will be."""
        context = run.context
        teacher_row = self.teacher_strategy.after_fit(context)[0]  # restores the best weights
        best = self.teacher_strategy.best_value
        measured_metric = _safe_metric(run.metric_fn, run.teacher, run.val_data, run.device)
        if measured_metric is not None:  # else (no labels to score with): the best monitored value
            teacher_row.metric = measured_metric
        with cpu_threads(self.latency_threads):  # (EarlyStop's row has the size: no second torch.save)
            teacher_row.latency_ms_per_example, latency_note = timed_latency(run.teacher, run.val_data, run.split,
                                                                             self.latency_batches)
        teacher_row.train_usd = run.teacher_usd
        teacher_row.note = "; ".join(x for x in (
            f"metric: {self._metric_name()} on the validation set" if measured_metric is not None else
            f"metric: best {context.metric_name}",
            f"best {context.metric_name}={best:.6g}" if best is not None and context.metric_name else "",
            self.teacher_strategy.note, latency_note) if x)
        return teacher_row

    def _prepare_student(self, run: _Run) -> None:
        """Build the student (from the trained teacher, for a factory) and check its shape."""
        if self.student_factory is not None:
            self.student = self.student_factory(run.teacher)
        assert self.student is not None, "__init__ keeps a student or its factory"
        with _kept_rng():
            first = next(iter(run.train_data))
        self._check_shapes(run.teacher, self.student, to_device(first, run.device), run.device)
        if self.deployment is not None:
            self.judge = LifetimeJudge(self.deployment, run.split, run.val_data, mode=self.metric_mode,
                                       usd_per_point=run.context.usd_per_point, usd_per_s=run.usd_per_s,
                                       points_per_unit=run.context.points_per_unit)
            served = served_copy(run.teacher)
            self.judge.add(Candidate("teacher", served, train_usd=run.teacher_usd or 0.0, metric=run.teacher_row.metric,
                                     note="adapters merged for serving" if served is not run.teacher else ""))
            self.judge.add(Candidate("student", self.student, train_usd=run.teacher_usd or 0.0, parent="teacher"))
            self.judge.time_all()

    def _reason_not_to_train(self, run: _Run, budget_left_usd: Optional[float]) -> str:
        """Why the student is not worth training (no budget left; it cannot pay), or ``""``."""
        if budget_left_usd is not None and budget_left_usd <= 1e-12:  # (not a rounding error's worth)
            return f"not trained: no budget left (${budget_left_usd:.4g} under the teacher's BudgetCap)"
        if self.judge is None:
            return ""
        estimate_usd = self._estimated_student_usd(run)
        saving_usd = self.judge.best_case_saving_usd("teacher", "student")
        if estimate_usd is None or saving_usd is None or saving_usd > estimate_usd:
            return ""
        assert self.deployment is not None, "a judge exists only with a deployment"
        return (f"not trained: it cannot pay: serving {self.deployment.requests:,} requests with the student "
                f"saves at most ${saving_usd:.4g}, training it would cost about ${estimate_usd:.4g}")

    def _estimated_student_usd(self, run: _Run) -> Optional[float]:
        """The student's fit at the teacher's dollars per training batch (a student step runs the
        teacher forward only and a smaller model forward and backward: at most a teacher step)."""
        totals = getattr(run.context.monitor, "totals", None)
        if totals is None or not getattr(totals, "train_batches", 0):
            return None
        try:
            per_epoch = _len(run.student_data)
        except TypeError:
            per_epoch = None
        steps = [s for s in (self.max_steps if self.max_steps > 0 else None,
                             self.max_epochs * per_epoch if per_epoch and self.max_epochs > 0 else None) if s]
        if not steps:
            return None
        return float(totals.usd) / float(totals.train_batches) * min(steps)

    def _untrained(self, run: _Run, teacher_row: ModelRow, note: str) -> list[ModelRow]:
        """The rows when the student is not trained: the teacher stays the model."""
        if run.ledger is not None:
            run.ledger.record(DistillEvent(trained=False, note=note))
        rank_zero_info(f"costaware: Distill: {note}")
        assert self.student is not None, "built by _prepare_student"
        with cpu_threads(self.latency_threads):
            row = describe_model(self.student, "student", run.val_data, run.split, self.latency_batches,
                                 train_usd=0.0)
        row.note = note
        teacher_row.deploy = True if self.judge is not None else None
        row.deploy = False if self.judge is not None else None
        self.rows = [teacher_row, row]
        return self.rows

    def _train(self, run: _Run, budget_left_usd: Optional[float]) -> ModelRow:
        """The student's fit, its saved weights and its row; records the ``distill`` event."""
        started_s = time.perf_counter()
        self._fit_student(run, budget_left_usd)
        seconds = time.perf_counter() - started_s
        assert self.student is not None and self.student_trainer is not None and self.student_monitor is not None, \
            "set by _fit_student"
        student_totals = self.student_monitor.totals
        stopped_by_budget = any(getattr(cb, "stopped", None) is not None for cb in self.student_trainer.callbacks
                                if type(cb).__name__ == "BudgetCap")
        self.student.cpu()
        path = run.save_dir / STUDENT_FILENAME
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.student.state_dict(), path)
        row = ModelRow(role="student", params=count_params(self.student), size_bytes=path.stat().st_size,
                       train_usd=float(student_totals.usd), path=str(path))
        with cpu_threads(self.latency_threads):
            row.latency_ms_per_example, row.note = timed_latency(self.student, run.val_data, run.split,
                                                                 self.latency_batches)
        row.metric = _safe_metric(run.metric_fn, self.student, run.val_data, run.device)
        steps = self.student_trainer.global_step
        row.note = "; ".join(x for x in (
            f"metric: {self._metric_name()} on the validation set",
            f"distilled for {steps} steps (T={self.temperature:g}, alpha={self.alpha:g})",
            "stopped by the budget cap" if stopped_by_budget else "", row.note) if x)
        if self.judge is not None:
            self.judge.update("student", train_usd=(run.teacher_usd or 0.0) + float(student_totals.usd),
                              metric=row.metric)
        if run.ledger is not None:
            run.ledger.record(DistillEvent(
                trained=True, student_usd=float(student_totals.usd), student_totals=student_totals.to_dict(),
                steps=steps, first_loss=self.losses[0] if self.losses else None,
                last_loss=self.losses[-1] if self.losses else None, temperature=self.temperature, alpha=self.alpha,
                budget_left_usd=budget_left_usd, stopped_by_budget=stopped_by_budget, duration_s=seconds,
                student_ledger=str(self.student_monitor.ledger.path) if self.student_monitor.ledger else None,
                path=str(path), student_params=row.params, student_metric=row.metric))
        rank_zero_info(f"costaware: Distill trained the student for {steps} steps, ${student_totals.usd:.4g}: "
                       f"{self._metric_name()} {_fmt(row.metric)}; saved to {path}")
        return row

    def _apply_follower(self, follower: Any, run: _Run, student_row: ModelRow) -> list[ModelRow]:
        """Apply ``Quantize``-like strategies to the student; keep their row for the result."""
        kwargs: dict = dict(mode=self.metric_mode, role="student",
                            save_path=run.save_dir / f"student_{getattr(follower, 'name', 'then')}.pt",
                            train_usd=student_row.train_usd, metric_name=self._metric_name())
        if _accepts(follower.apply, "forward_fn"):  # the student is called by the batch protocol
            kwargs["forward_fn"] = lambda model, batch: call_model(model, run.split(batch)[0])
        if self.deployment is not None and _accepts(follower.apply, "deployment"):
            kwargs["deployment"] = self.deployment
        started_s = time.perf_counter()
        result, rows = follower.apply(self.student, run.val_data, run.metric_fn, **kwargs)
        seconds = time.perf_counter() - started_s
        if run.ledger is not None:
            run.ledger.record(_follower_event(follower, rows, self._metric_name(), self.metric_mode, seconds,
                                              seconds * run.usd_per_s if run.usd_per_s is not None else None))
        others = [r for r in rows if r.role != "student"]
        run.quantize_usd += seconds * run.usd_per_s if run.usd_per_s is not None else 0.0
        if self.judge is not None and getattr(follower, "kept", False) and result is not self.student and others:
            spent = (seconds * run.usd_per_s) if run.usd_per_s is not None else 0.0
            chain = (run.teacher_usd or 0.0) + (student_row.train_usd or 0.0) + spent
            self.judge.add(Candidate(others[-1].role, result, train_usd=chain, metric=others[-1].metric,
                                     parent="student", device="cpu"))
        return others

    def _distill_or_annotate(self, run: _Run) -> None:
        """With ``usd_per_label``: what the switch's dollars would have bought as labels, and the
        metric the teacher's own curve (metric against training examples) predicts for them."""
        if self.usd_per_label is None or run.ledger is None or len(self.rows) < 2:
            return
        spent_usd = (self.rows[1].train_usd or 0.0) + run.quantize_usd  # (a quantized row repeats its float's)
        labels = int(spent_usd / self.usd_per_label)
        per_batch = run.examples_per_batch or 0  # (unknown: no curve in examples)
        points = [(step * per_batch, value) for step, value in self._curve if step > 0 and per_batch]
        predicted = log_linear_prediction(points, points[-1][0] + labels) if points else None
        run.ledger.record(DistillOrAnnotateEvent(
            switch_usd=spent_usd, usd_per_label=self.usd_per_label, labels=labels,
            examples_seen=points[-1][0] if points else None, teacher_metric=self.rows[0].metric,
            predicted_metric_with_labels=predicted, student_metric=self.rows[1].metric,
            assumption="the teacher's metric grows linearly in log(examples seen), fitted on its validations, and "
                       "more labelled examples are trained on at no extra compute cost"))

    # ------------------------------------------------------------------------------------------

    def _metric_name(self) -> str:
        return getattr(self.metric_fn, "__name__", "metric_fn") if self.metric_fn is not None else "accuracy"

    @torch.no_grad()
    def _check_shapes(self, teacher: Any, student: nn.Module, batch: Any, device: torch.device) -> None:
        """Call teacher and student on one batch (on ``device``) and compare their logits' shapes."""
        inputs, _ = split_batch(teacher, batch, self.inputs_fn)
        models = (teacher, student)
        places = [device_of(m) for m in models]
        modes = [training_modes(m) for m in models]
        try:
            for m in models:
                m.to(device).eval()
            t_out = call_model(teacher, inputs)
            s_out = call_model(student, inputs)
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

    def _fit_student(self, run: _Run, budget_left_usd: Optional[float]) -> None:
        assert self.student is not None, "built by _prepare_student"
        trainer, monitor = run.context.trainer, run.context.monitor
        namespace = _lightning.namespace_of(trainer)
        if namespace is None:
            raise TypeError(f"{type(trainer).__name__} is neither a pytorch_lightning nor a lightning.pytorch Trainer")
        from costaware.callbacks import BudgetCap, CostMonitor  # (a Callback of either namespace)

        student_monitor = CostMonitor(**_monitor_kwargs(monitor), ledger_dir=str(run.save_dir))
        callbacks: list = [student_monitor]
        if budget_left_usd is not None:
            callbacks.append(BudgetCap(max_usd=budget_left_usd))
        kwargs = dict(self._student_trainer_kwargs(trainer, run.save_dir), callbacks=callbacks)
        kwargs.update(self.trainer_kwargs)
        if kwargs.get("enable_progress_bar") and kwargs["callbacks"] is callbacks:  # not Lightning's default (Rich)
            callbacks.append(_lightning.load(namespace).callbacks.TQDMProgressBar())
        module = distill_module_class(_lightning.load(namespace))(
            self.student, run.teacher, run.split, self.temperature, self.alpha, self.lr, self.weight_decay,
            self.warmup_fraction)
        teacher_modes = training_modes(run.teacher)
        self.student_trainer = type(trainer)(**kwargs)
        self.student_monitor = student_monitor
        rank_zero_info(f"costaware: Distill: training the student ({count_params(self.student):,} parameters) "
                       + (f"within ${budget_left_usd:.4g}" if budget_left_usd is not None else "uncapped"))
        try:
            self.student_trainer.fit(module, train_dataloaders=run.student_data)
        finally:
            run.teacher.cpu()
            restore_training_modes(teacher_modes)
        self.losses = [float(x) for x in module.losses]

    def _student_trainer_kwargs(self, trainer: Any, save_dir: Path) -> dict:
        """The student's Trainer: the teacher's device and precision, no logger, no checkpoints."""
        device = trainer.strategy.root_device
        return dict(
            accelerator={"cuda": "gpu"}.get(device.type, device.type),
            devices=[device.index] if device.type == "cuda" and device.index is not None else 1,
            num_nodes=1, precision=str(trainer.precision), max_epochs=self.max_epochs, max_steps=self.max_steps,
            logger=False, enable_checkpointing=False, enable_model_summary=False,
            enable_progress_bar=_student_shows_progress(trainer), limit_val_batches=0,
            num_sanity_val_steps=0, log_every_n_steps=trainer.log_every_n_steps, default_root_dir=str(save_dir),
        )


def _student_shows_progress(trainer: Any) -> bool:
    """Whether the student's nested fit shows a progress bar (a TQDM one): where the teacher's does, unless the
    teacher's is Lightning's ``RichProgressBar`` (the default where ``rich`` is installed). That bar cannot nest: a
    second one, starting, clears the console's live display (the teacher's), and the teacher's fit then failed at
    its teardown (``IndexError: pop from empty list`` in rich's ``Console.clear_live``), after the student was saved.
    """
    bar = trainer.progress_bar_callback
    return bar is not None and not any(cls.__name__ == "RichProgressBar" for cls in type(bar).__mro__)


class _Run:
    """What one distillation works with: data, split, metric, folders, the teacher's cost."""

    def __init__(self, distill: Distill, context: StopContext, train_dataloader: Optional[Iterable],
                 val_dataloader: Optional[Iterable]) -> None:
        trainer, monitor = context.trainer, context.monitor
        self.context = context
        self.teacher = context.pl_module
        train_data = train_dataloader if train_dataloader is not None else train_loader(trainer)
        self.val_data = val_dataloader if val_dataloader is not None else val_loader(trainer)
        if train_data is None:
            raise ValueError("Distill found no training data: the teacher's Trainer has no train_dataloader; "
                             "pass train_dataloader=")
        self.train_data: Iterable = train_data
        unlabelled = distill.unlabelled_dataloader
        self.student_data = Interleaved(self.train_data, unlabelled) if unlabelled is not None else self.train_data
        self.device = trainer.strategy.root_device
        self.split = lambda batch: split_batch(self.teacher, batch, distill.inputs_fn)
        self.metric_fn = distill.metric_fn or _AccuracyMetric(self.split)
        self.ledger = getattr(monitor, "ledger", None)
        self.save_dir = (Path(distill.save_dir) if distill.save_dir is not None else
                         ledger_folder(trainer, monitor) / "student")
        totals = getattr(monitor, "totals", None)
        self.teacher_usd = float(totals.usd) if totals is not None else None
        elapsed_s = float(getattr(totals, "elapsed_s", 0.0) or 0.0) if totals is not None else 0.0
        #: the run's dollars per wall second, to price what the switch spends outside a metered fit
        self.usd_per_s = self.teacher_usd / elapsed_s if self.teacher_usd is not None and elapsed_s > 0 else None
        self.quantize_usd = 0.0  # what the ``then`` strategies spent, at ``usd_per_s``
        self.examples_per_batch = getattr(self.train_data, "batch_size", None) or _first_batch_examples(
            self.train_data, self.split)
        self.teacher_row = ModelRow(role="teacher")  # set by Distill.run


class Interleaved:
    """The training batches and the unlabelled ones, mixed evenly within each epoch."""

    def __init__(self, labelled: Iterable, unlabelled: Iterable) -> None:
        self.labelled, self.unlabelled = labelled, unlabelled

    def __len__(self) -> int:
        return _len(self.labelled) + _len(self.unlabelled)

    def __iter__(self) -> Iterator[Any]:
        first, second = iter(self.labelled), iter(self.unlabelled)
        n_first, n_second = _len(self.labelled), _len(self.unlabelled)
        taken_first = taken_second = 0
        while taken_first < n_first or taken_second < n_second:
            # take from whichever stream is further behind its share
            if taken_second >= n_second or (taken_first < n_first and taken_first * n_second <= taken_second * n_first):
                taken_first += 1
                yield next(first)
            else:
                taken_second += 1
                yield next(second)


def _len(data: Iterable) -> int:
    """``len(data)``, with the TypeError ``len`` raises for an iterable of unknown length (an
    ``IterableDataset``'s loader raises it from its own ``__len__``)."""
    if not isinstance(data, Sized):
        raise TypeError(f"object of type {type(data).__name__!r} has no len()")
    return len(data)


def log_linear_prediction(points: Sequence[tuple[float, float]], examples: float) -> Optional[float]:
    """The metric at ``examples``, from a least-squares line of metric against log(examples) over ``points``."""
    usable = [(math.log(x), y) for x, y in points if x > 0 and math.isfinite(y)]
    if len(usable) < 2 or examples <= 0:
        return None
    n = len(usable)
    mean_x = sum(x for x, _ in usable) / n
    mean_y = sum(y for _, y in usable) / n
    var_x = sum((x - mean_x) ** 2 for x, _ in usable)
    if var_x <= 0:
        return None
    slope = sum((x - mean_x) * (y - mean_y) for x, y in usable) / var_x
    return mean_y + slope * (math.log(examples) - mean_x)


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


def _check_arguments(student: Any, temperature: Any, alpha: Any, lr: Any, weight_decay: Any, warmup_fraction: Any,
                     usd_per_label: Any, max_epochs: Any, max_steps: Any, inputs_fn: Any, metric_fn: Any,
                     metric_mode: Any, deployment: Any, latency_batches: Any, latency_threads: Any,
                     trainer_kwargs: Any) -> None:
    """``Distill``'s arguments, checked before anything is spent (a ValueError names the argument)."""
    if not isinstance(student, nn.Module) and not callable(student):
        raise ValueError(f"student must be a torch.nn.Module or a factory student(teacher) -> nn.Module, got "
                         f"{type(student).__name__}")
    check_amount("temperature", temperature, minimum=0, strict=True)
    check_amount("alpha", alpha, minimum=0, maximum=1)
    check_amount("lr", lr, minimum=0, strict=True)
    check_amount("weight_decay", weight_decay, minimum=0)
    check_amount("warmup_fraction", warmup_fraction, maximum=1, allow_none=True)
    check_amount("usd_per_label", usd_per_label, minimum=0, strict=True, allow_none=True)
    _check_epochs_and_steps(max_epochs, max_steps)
    for arg, fn in (("inputs_fn", inputs_fn), ("metric_fn", metric_fn)):
        if fn is not None and not callable(fn):
            raise ValueError(f"{arg} must be a callable or None, got {fn!r}")
    if metric_mode not in ("max", "min"):
        raise ValueError(f"metric_mode must be one of ('max', 'min'), got {metric_mode!r}")
    if deployment is not None and not isinstance(deployment, Deployment):
        raise ValueError(f"deployment must be a costaware.deploy.Deployment or None, got {deployment!r}")
    check_count("latency_batches", latency_batches)
    check_count("latency_threads", latency_threads, minimum=1, allow_none=True)
    if trainer_kwargs is not None and not isinstance(trainer_kwargs, dict):
        raise ValueError(f"trainer_kwargs must be a dict of Trainer arguments, got {trainer_kwargs!r}")
    # Distill sets these itself: a caller's would drop the student's meter and budget cap, or its plan.
    owned = sorted(set(trainer_kwargs or {}) & {"callbacks", "logger", "max_steps", "max_epochs", "default_root_dir"})
    if owned:
        raise ValueError(f"trainer_kwargs may not set {', '.join(owned)}: Distill sets them (use its max_steps/"
                         "max_epochs/save_dir arguments)")


def _check_epochs_and_steps(max_epochs: Any, max_steps: Any) -> None:
    if isinstance(max_epochs, bool) or not isinstance(max_epochs, int) or (max_epochs < 1 and max_epochs != -1):
        raise ValueError(f"max_epochs must be an int >= 1 (or -1 with max_steps), got {max_epochs!r}")
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or (max_steps < 1 and max_steps != -1):
        raise ValueError(f"max_steps must be an int >= 1 or -1 (no limit), got {max_steps!r}")
    if max_epochs == -1 and max_steps == -1:
        raise ValueError("max_epochs=-1 needs max_steps >= 1: the student's fit must end")


def _followers(then: Any) -> list:
    followers = [] if then is None else list(then) if isinstance(then, (list, tuple)) else [then]
    for follower in followers:
        if not callable(getattr(follower, "apply", None)):
            raise ValueError(f"then must hold strategies with an apply(module, val_dataloader, metric_fn, ...) "
                             f"method such as Quantize, got {follower!r}")
    return followers


def _first_batch_examples(loader: Iterable, split: Callable) -> Optional[int]:
    """Examples in the loader's first batch (the batch size, when the loader does not say it)."""
    try:
        with _kept_rng():
            batch = next(iter(loader))
        return count_examples(*split(batch))
    except Exception:  # noqa: BLE001 - a figure for the distill-or-annotate estimate only
        return None


def _follower_event(follower: Any, rows: list, metric_name: str, mode: str, duration_s: float,
                    usd: Optional[float]) -> QuantizeEvent:
    """The ``quantize`` record of a strategy Distill ran on its student, whoever wrote the strategy.

    ``Quantize`` describes itself (``event``); another strategy is recorded from its rows.
    """
    extra = dict(of="student", rows=[dict(vars(r)) for r in rows], duration_s=duration_s, usd=usd,
                 kept=bool(getattr(follower, "kept", False)))
    if callable(getattr(follower, "event", None)):
        return follower.event(metric_name, mode, **extra)
    return QuantizeEvent.from_rows(rows, metric=metric_name, mode=mode, **extra)
