"""Handing a written report to the experiment trackers a Trainer logs to.

Users look for run artifacts in their tracker, not on the training host's disk: the Markdown goes
to TensorBoard's text tab, the files to MLflow's and W&B's artifact stores. The code is
duck-typed (MLflow and W&B are optional and never imported here) and never raises: a tracker
that refuses the files costs a warning, not the run.

Example::

    from costaware.report import publish_to_loggers, write_report

    publish_to_loggers(trainer.loggers, write_report(trainer.log_dir))
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

#: TensorBoard text tag the Markdown report is written under.
TENSORBOARD_TAG = "costaware/report"
#: Artifact sub-folder in MLflow and W&B.
ARTIFACT_DIR = "costaware"


def publish_to_loggers(trainer_loggers: Any, paths: Union[Mapping[str, Any], Iterable[Any]],
                       step: Optional[int] = None) -> list[str]:
    """Give the report files to every TensorBoard, MLflow and W&B logger; never raises.

    Args:
        trainer_loggers: ``trainer.loggers`` (a list), a single logger, or None.
        paths: what ``write_report`` returned (``{"json", "md", "html"}`` -> path), or a list of paths.
        step: the step TensorBoard files the text under (``trainer.global_step``); default 0.

    Returns:
        One line per logger that received the report, e.g. ``"TensorBoardLogger: text costaware/report"``.
    """
    done: list[str] = []
    try:
        loggers = _as_list(trainer_loggers)
        files = _as_paths(paths)
    except Exception as err:  # noqa: BLE001 - publishing must never break the caller
        warnings.warn(f"costaware: could not hand the report to the loggers: {err}", RuntimeWarning, stacklevel=2)
        return done
    for logger in loggers:
        kind = _kind(logger)
        if kind is None:
            continue
        try:
            done.append(_PUBLISHERS[kind](logger, files, step))
        except Exception as err:  # noqa: BLE001
            warnings.warn(f"costaware: could not hand the report to {type(logger).__name__}: "
                          f"{type(err).__name__}: {err}", RuntimeWarning, stacklevel=2)
    return done


def _tensorboard(logger: Any, files: dict[str, Path], step: Optional[int]) -> str:
    md = files.get("md")
    if md is None:
        return f"{type(logger).__name__}: nothing (no Markdown report)"
    experiment = logger.experiment
    experiment.add_text(TENSORBOARD_TAG, Path(md).read_text(encoding="utf-8"), global_step=step or 0)
    if hasattr(experiment, "flush"):
        experiment.flush()
    return f"{type(logger).__name__}: text {TENSORBOARD_TAG}"


def _mlflow(logger: Any, files: dict[str, Path], step: Optional[int]) -> str:
    for path in files.values():
        logger.experiment.log_artifact(logger.run_id, str(path), artifact_path=ARTIFACT_DIR)
    return f"{type(logger).__name__}: {len(files)} artifacts in {ARTIFACT_DIR}/"


def _wandb(logger: Any, files: dict[str, Path], step: Optional[int]) -> str:
    experiment = logger.experiment
    for path in files.values():
        try:
            experiment.save(str(path), base_path=str(Path(path).parent.parent), policy="now")
        except TypeError:  # older wandb, or a run object with a plain save(path)
            experiment.save(str(path))
    return f"{type(logger).__name__}: {len(files)} files saved"


_PUBLISHERS = {"tensorboard": _tensorboard, "mlflow": _mlflow, "wandb": _wandb}
_CLASS_NAMES = {"TensorBoardLogger": "tensorboard", "MLFlowLogger": "mlflow", "WandbLogger": "wandb"}


def _kind(logger: Any):
    for cls in type(logger).__mro__:
        if cls.__name__ in _CLASS_NAMES:
            return _CLASS_NAMES[cls.__name__]
    return None


def _as_list(loggers: Any) -> list:
    if loggers is None or loggers is False:
        return []
    if isinstance(loggers, (list, tuple)):
        return list(loggers)
    return [loggers]


def _as_paths(paths: Any) -> dict[str, Path]:
    if isinstance(paths, Mapping):
        return {str(k): Path(v) for k, v in paths.items()}
    if isinstance(paths, (str, bytes, os.PathLike)):
        paths = [paths]  # one path, not a sequence of one-letter ones
    out = {}
    for p in paths:
        p = Path(os.fsdecode(p))
        out[p.suffix.lstrip(".") or p.name] = p
    return out
