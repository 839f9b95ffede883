"""``OnlineProbe``: an accuracy to watch during self-supervised pretraining, measured cheaply."""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Iterable, Optional, Union

import torch
from lightning_utilities.core.rank_zero import rank_zero_warn

from costaware._lightning import CALLBACK_BASES
from costaware._torch import device_of
from costaware.callbacks.metering import run_meter
from costaware.meter import CostMeter
from costaware.records import OnlineProbeEvent
from costaware.validation import check_amount, check_count, check_flag

PROBES = ("knn", "linear")

#: ``embed_fn(pl_module, inputs) -> Tensor``: one embedding row per input.
EmbedFn = Callable[[Any, torch.Tensor], torch.Tensor]
#: ``(inputs, labels)`` tensors, an iterable of such batches, or the path of a ``torch.save``d pair.
LabeledData = Union[str, os.PathLike, tuple, Iterable]


class OnlineProbe(*CALLBACK_BASES):  # type: ignore[misc]  # a Callback of each installed Lightning namespace
    r"""Fit a k-NN or linear probe on frozen embeddings of a small labeled set, and log its accuracy.

    Self-supervised pretraining has no accuracy of its own to watch, so neither
    ``EarlyStopping`` nor ``MarginalGainStopping`` can tell when more training stops paying.
    Every ``every_n_val`` validations (at validation epoch end, so the value is in
    ``trainer.callback_metrics`` when ``EarlyStopping``/``MarginalGainStopping`` check it) and/or
    every ``every_n_steps`` training steps, this callback embeds the labeled ``train`` and
    ``val`` sets with the current model, fits the probe on ``train`` and logs its accuracy on
    ``val`` as ``log_name`` (``probe/acc``) through ``pl_module.log``, so that
    ``MarginalGainStopping(monitor="probe/acc")`` can price it.

    The probe is kept cheap: no gradients, the model in eval mode (each submodule's mode is
    restored after), the labeled sets held in memory on CPU and moved in ``batch_size`` chunks,
    and a closed-form fit (k-NN: one similarity matmul; linear: one ridge solve). Its own cost is
    measured: wall seconds (logged as ``<prefix>/seconds``, cumulative) and, with a
    ``CostMonitor`` among the callbacks, dollars as the monitor's totals delta
    (``<prefix>/cost_usd``, cumulative), where ``<prefix>`` is ``log_name`` up to its last
    ``/``; each probe is also a ledger event ``online_probe`` (accuracy, seconds, dollars, step).
    Skipped during the sanity check.

    Under DDP every rank computes the probe on the same data with the same weights (the data is
    small), so every rank logs the same value at the same hook (with ``sync_dist``, a mean over
    ranks of equal values) and monitors agree; only rank zero writes the ledger.

    Labeled data: ``(inputs, labels)`` tensors, an iterable of ``(inputs, labels)`` batches (a
    ``DataLoader``, read once at construction: random augmentations are frozen then), or the
    path of a file that ``torch.save`` wrote with such a pair or a dict
    ``{"inputs": ..., "labels": ...}`` (the form a LightningCLI config can give). Labels are
    integers of any values (they are mapped to class indices).

    Args:
        train: labeled examples the probe is fitted on.
        val: labeled examples its accuracy is measured on.
        probe: ``"knn"`` (cosine similarity, ``k`` neighbours, votes weighted by
            ``exp(similarity / knn_temperature)`` as in InstDisc/DINO) or ``"linear"``
            (closed-form ridge regression on one-hot labels over standardized embeddings).
        k: neighbours for ``"knn"`` (capped at the training set's size).
        knn_temperature: vote temperature for ``"knn"``; None for a plain majority vote.
        ridge: for ``"linear"``, the L2 penalty relative to the mean feature variance.
        every_n_val: probe every this many validations; None: not at validations.
        every_n_steps: probe every this many training steps (logged on step); None: not.
        log_name: the logged accuracy's key.
        embed_fn: ``embed_fn(pl_module, inputs) -> Tensor``; default ``pl_module.embed(inputs)``
            if the module has ``embed``, else ``pl_module(inputs)``. Outputs are flattened to
            one row per example.
        batch_size: examples embedded per forward.
        prog_bar: show the accuracy in the progress bar.

    Raises:
        ValueError: at construction, for an unknown ``probe``, counts < 1, both schedules None,
            labeled data that is not ``(inputs, labels)`` of matching lengths, or an empty set.

    Example::

        from pytorch_lightning import Trainer
        from costaware import CostMonitor, OnlineProbe

        probe = OnlineProbe(train=(x_labeled, y_labeled), val=(x_held_out, y_held_out), k=20)
        trainer = Trainer(callbacks=[CostMonitor(usd_per_host_hour=0.1), probe,
                                     EarlyStopping(monitor="probe/acc", mode="max", patience=3)])
    """

    def __init__(
        self,
        train: Any,
        val: Any,
        probe: str = "knn",
        k: int = 20,
        knn_temperature: Optional[float] = 0.07,
        ridge: float = 1e-2,
        every_n_val: Optional[int] = 1,
        every_n_steps: Optional[int] = None,
        log_name: str = "probe/acc",
        embed_fn: Optional[EmbedFn] = None,
        batch_size: int = 512,
        prog_bar: bool = True,
    ) -> None:
        if probe not in PROBES:
            raise ValueError(f"probe must be one of {PROBES}, got {probe!r}")
        check_count("k", k, minimum=1)
        check_count("batch_size", batch_size, minimum=1)
        check_count("every_n_val", every_n_val, minimum=1, allow_none=True)
        check_count("every_n_steps", every_n_steps, minimum=1, allow_none=True)
        if every_n_val is None and every_n_steps is None:
            raise ValueError("every_n_val and every_n_steps are both None: give at least one (every_n_val=1 probes "
                             "at every validation)")
        knn_temperature = check_amount("knn_temperature", knn_temperature, minimum=0, strict=True, allow_none=True)
        ridge = check_amount("ridge", ridge, minimum=0)
        if not isinstance(log_name, str) or not log_name:
            raise ValueError(f"log_name must be a metric name such as 'probe/acc', got {log_name!r}")
        check_flag("prog_bar", prog_bar)
        if embed_fn is not None and not callable(embed_fn):
            raise ValueError(f"embed_fn must be a callable (pl_module, inputs) -> Tensor, got {embed_fn!r}")
        self.train_inputs, train_labels = _labeled("train", train)
        self.val_inputs, val_labels = _labeled("val", val)
        # Any integer labels (e.g. 3 and 7 only, or -1/1) become class indices 0..C-1.
        self.classes = torch.unique(torch.cat([train_labels, val_labels]))
        self.train_labels = torch.searchsorted(self.classes, train_labels)
        self.val_labels = torch.searchsorted(self.classes, val_labels)
        self.probe = probe
        self.k = k
        self.knn_temperature = knn_temperature
        self.ridge = ridge
        self.every_n_val = every_n_val
        self.every_n_steps = every_n_steps
        self.log_name = log_name
        prefix = log_name.rsplit("/", 1)[0] if "/" in log_name else log_name
        self.seconds_name = f"{prefix}/seconds"
        self.cost_name = f"{prefix}/cost_usd"
        self.embed_fn = embed_fn
        self.batch_size = batch_size
        self.prog_bar = prog_bar
        self.meter: Optional[CostMeter] = None  # the run's meter, if any, from fit start on
        self.last_acc: Optional[float] = None
        self.history: list[dict] = []  # one dict per probe: step, acc, seconds, cost_usd
        self.validations = 0
        self.total_seconds = 0.0
        self.total_usd = 0.0
        self._fitting = True  # whether a checkpoint Lightning restores now is a fit's (see load_state_dict)

    # ----------------------------------------------------------------------------------------
    # Lightning hooks
    # ----------------------------------------------------------------------------------------

    @property
    def state_key(self) -> str:
        # Several probes (a k-NN and a linear one) can share a Trainer and a checkpoint.
        # As Lightning's Callback._generate_state_key(log_name=...) builds it (checkpoints keep their keys).
        return f"{type(self).__qualname__}{({'log_name': self.log_name})!r}"

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._fitting = stage == "fit"

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self.meter = run_meter(trainer)

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking or self.every_n_val is None:
            return
        self.validations += 1
        if self.validations % self.every_n_val == 0:
            self._probe_and_log(trainer, pl_module, on_step=False)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.every_n_steps is None or trainer.global_step == 0 or trainer.global_step % self.every_n_steps:
            return
        if self.history and self.history[-1]["step"] == trainer.global_step and self.history[-1]["on_step"]:
            return  # gradient accumulation: several batches end on the same optimizer step
        self._probe_and_log(trainer, pl_module, on_step=True)

    def state_dict(self) -> dict:
        return {"validations": self.validations, "total_seconds": self.total_seconds, "total_usd": self.total_usd,
                "last_acc": self.last_acc}

    def load_state_dict(self, state_dict: dict) -> None:
        """Continue the probe's counts on a resumed fit only (Lightning restores callbacks for a
        ``trainer.validate`` or ``test`` from a checkpoint too, and a fit after those is a new run)."""
        if not self._fitting:
            return
        self.validations = int(state_dict.get("validations", 0))
        self.total_seconds = float(state_dict.get("total_seconds", 0.0))
        self.total_usd = float(state_dict.get("total_usd", 0.0))
        self.last_acc = state_dict.get("last_acc")

    # ----------------------------------------------------------------------------------------
    # The probe
    # ----------------------------------------------------------------------------------------

    def score(self, model: Any) -> float:
        """The probe's accuracy on ``val`` with ``model``'s embeddings (any module ``embed_fn`` takes).

        This is what ``Quantize`` and ``Distill`` call to compare a compressed model with the
        trained one on the metric this callback logs.
        """
        train = self._embed(model, self.train_inputs)
        val = self._embed(model, self.val_inputs)
        if self.probe == "knn":
            predicted = knn_predict(train, self.train_labels, val, self.k, self.knn_temperature)
        else:
            predicted = ridge_predict(train, self.train_labels, val, self.ridge)
        return float((predicted == self.val_labels).float().mean())

    def _probe_and_log(self, trainer: Any, pl_module: Any, on_step: bool) -> None:
        usd_before = self._usd_now()
        if self.meter is not None:
            self.meter.phase_start("probe")
        start_s = time.perf_counter()
        acc = self.score(pl_module)
        seconds = time.perf_counter() - start_s
        if self.meter is not None:
            self.meter.phase_end("probe")
        usd_after = self._usd_now()
        usd = max(usd_after - usd_before, 0.0) if usd_before is not None and usd_after is not None else None
        self.last_acc = acc
        self.total_seconds += seconds
        if usd is not None:
            self.total_usd += usd
        self.history.append({"step": trainer.global_step, "acc": acc, "seconds": seconds, "cost_usd": usd,
                             "on_step": on_step})
        # Every rank computed the same value at the same hook: the mean over ranks changes nothing
        # but guarantees agreement (and is what Lightning expects of epoch-level logs under DDP).
        log = dict(on_step=on_step, on_epoch=not on_step, logger=True, batch_size=1,
                   sync_dist=trainer.world_size > 1)
        pl_module.log(self.log_name, acc, prog_bar=self.prog_bar, **log)
        pl_module.log(self.seconds_name, self.total_seconds, **log)
        if self.meter is not None:
            pl_module.log(self.cost_name, self.total_usd, **log)
        ledger = self.meter.ledger if self.meter is not None else None
        if ledger is not None and not ledger.closed:
            ledger.record(OnlineProbeEvent(metric=self.log_name, acc=acc, duration_s=seconds, cost_usd=usd,
                                           probe=self.probe, step=trainer.global_step,
                                           train_examples=len(self.train_labels), val_examples=len(self.val_labels)))

    def _usd_now(self) -> Optional[float]:
        if self.meter is None:
            return None
        try:  # (before the meter starts, as in a standalone validate, there are no totals)
            return float(self.meter.current_totals().usd)
        except Exception:  # noqa: BLE001 - measuring the probe must never break training
            return None

    def _embed(self, model: Any, inputs: torch.Tensor) -> torch.Tensor:
        """Embeddings of ``inputs`` as a float32 CPU matrix, computed without gradients in eval mode."""
        device = device_of(model)
        modes = {m: m.training for m in model.modules()}
        model.eval()
        chunks = []
        try:
            with torch.no_grad():
                for start in range(0, len(inputs), self.batch_size):
                    batch = inputs[start:start + self.batch_size].to(device)
                    if self.embed_fn is not None:
                        out = self.embed_fn(model, batch)
                    elif callable(getattr(model, "embed", None)):
                        out = model.embed(batch)
                    else:
                        out = model(batch)
                    if not isinstance(out, torch.Tensor):
                        raise TypeError(f"the embedding of a batch must be a Tensor, got {type(out).__name__}: pass "
                                        "embed_fn=(pl_module, inputs) -> Tensor to OnlineProbe")
                    chunks.append(out.reshape(len(batch), -1).float().cpu())
        finally:
            for m, training in modes.items():
                m.training = training
        embeddings = torch.cat(chunks)
        if not torch.isfinite(embeddings).all():
            rank_zero_warn("costaware: OnlineProbe got non-finite embeddings; they are zeroed for the probe")
            embeddings = torch.nan_to_num(embeddings, nan=0.0, posinf=0.0, neginf=0.0)
        return embeddings


# ---------------------------------------------------------------------------------------------
# Probes (pure torch, CPU)
# ---------------------------------------------------------------------------------------------


def knn_predict(train: torch.Tensor, train_labels: torch.Tensor, query: torch.Tensor, k: int = 20,
                temperature: Optional[float] = 0.07) -> torch.Tensor:
    """Cosine k-nearest-neighbour labels of ``query`` rows among ``train`` rows.

    Votes are weighted by ``exp(similarity / temperature)`` (plain majority if None); ties go to
    the smaller class index.
    """
    train = torch.nn.functional.normalize(train, dim=1)
    query = torch.nn.functional.normalize(query, dim=1)
    k = min(k, len(train))
    classes = int(train_labels.max()) + 1
    predictions = []
    for start in range(0, len(query), 1024):
        similarity = query[start:start + 1024] @ train.T
        top_sim, top_idx = similarity.topk(k, dim=1)
        weights = torch.ones_like(top_sim) if temperature is None else (top_sim / temperature).exp()
        votes = torch.zeros(len(top_sim), classes)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)


def ridge_predict(train: torch.Tensor, train_labels: torch.Tensor, query: torch.Tensor,
                  ridge: float = 1e-2) -> torch.Tensor:
    """Labels of ``query`` from a ridge regression on one-hot ``train_labels`` (closed form).

    Features are standardized with the training set's statistics; the penalty is ``ridge``
    times the mean feature variance (1 after standardizing), so it does not depend on scale.
    """
    train, query = train.double(), query.double()
    mean, std = train.mean(0), train.std(0, unbiased=False).clamp_min(1e-8)
    x = torch.cat([(train - mean) / std, torch.ones(len(train), 1, dtype=torch.float64)], dim=1)
    q = torch.cat([(query - mean) / std, torch.ones(len(query), 1, dtype=torch.float64)], dim=1)
    classes = int(train_labels.max()) + 1
    targets = torch.nn.functional.one_hot(train_labels, classes).double()
    penalty = max(ridge, 1e-8) * len(train) * torch.eye(x.shape[1], dtype=torch.float64)
    penalty[-1, -1] = 0.0  # the bias is not penalized
    if x.shape[1] <= len(train):
        weights = torch.linalg.solve(x.T @ x + penalty, x.T @ targets)
    else:  # more features than examples: the dual form is the smaller solve
        weights = x.T @ torch.linalg.solve(x @ x.T + max(ridge, 1e-8) * len(train) * torch.eye(len(train),
                                                                                              dtype=torch.float64),
                                           targets)
    return (q @ weights).argmax(dim=1)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _labeled(arg: str, data: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, labels)`` tensors on CPU, labels as int64."""
    if isinstance(data, (str, os.PathLike)):
        if not os.path.isfile(data):
            raise ValueError(f"{arg}={str(data)!r} is not a file (a torch.save of (inputs, labels))")
        data = torch.load(data, map_location="cpu", weights_only=True)
        if isinstance(data, dict):
            keys = ("inputs", "labels") if "inputs" in data else ("x", "y")
            if not all(k in data for k in keys):
                raise ValueError(f"{arg}: a saved dict must have 'inputs' and 'labels' keys, got {sorted(data)}")
            data = (data[keys[0]], data[keys[1]])
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        inputs, labels = data
    else:
        try:
            batches = list(data)
        except TypeError:
            raise ValueError(f"{arg} must be (inputs, labels) tensors or an iterable of (inputs, labels) batches, "
                             f"got {type(data).__name__}") from None
        if not batches or not all(isinstance(b, (tuple, list)) and len(b) >= 2 and isinstance(b[0], torch.Tensor)
                                  and isinstance(b[1], torch.Tensor) for b in batches):
            raise ValueError(f"{arg} must be (inputs, labels) tensors or an iterable of (inputs, labels) batches of "
                             "tensors")
        inputs = torch.cat([b[0] for b in batches])
        labels = torch.cat([b[1] for b in batches])
    labels = labels.reshape(-1)
    if len(inputs) != len(labels) or len(labels) == 0:
        raise ValueError(f"{arg} must hold as many labels as inputs, at least one: got {len(inputs)} inputs and "
                         f"{len(labels)} labels")
    if (labels.is_floating_point() or labels.is_complex()) and not torch.equal(labels, labels.round()):
        raise ValueError(f"{arg}'s labels must be class indices (integers), got {labels.dtype} values")
    return inputs.detach().cpu(), labels.detach().cpu().long()
