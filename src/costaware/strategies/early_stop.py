"""``EarlyStop``: stop, and keep the best weights the run has seen."""

from __future__ import annotations

import math
from typing import Optional

import torch
from lightning_utilities.core.rank_zero import rank_zero_info

from costaware.strategies.base import ModelRow, StopContext, StopStrategy
from costaware.strategies.batches import split_batch, val_loader
from costaware.strategies.measure import describe_model
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
    validation batches (when the LightningModule can be called on them, see
    ``costaware.strategies.batches``) and the teacher's training cost.

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
