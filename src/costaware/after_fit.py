"""What a ``trainer.test``, ``validate`` or ``predict`` after a fit spends, for that fit's ledger and report.

A Lightning user tests the model a fit made (``trainer.fit(model); trainer.test(model)``). That pass
runs on the same rented machine, so the bill holds it; it is not training, so the fit's totals (what
the caps and the policy judged) stay as they ended. It is metered apart, at the fit's prices, and the
fit's meter appends it to the fit's ledger as a :class:`~costaware.records.StageAfterFitEvent`; the
report shows it after the fit, as it shows the strategies. In a process that ran no fit (LightningCLI's
``test --ckpt_path=...`` after its ``fit``), the stage is charged to the run that saved the checkpoint, when
that run's ledger is still where the checkpoint says (:func:`run_of_checkpoint`).

No collective at the end of a stage: under DDP every rank's GPU is taken to spend what rank zero's
did, and every node's host what rank zero's host did (ranks evaluate alike).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

from costaware.ledger import Ledger, LedgerError, Totals, header_run_id, read_ledger
from costaware.meters import Sampler, open_gpu, open_host
from costaware.records import StageAfterFitEvent

if TYPE_CHECKING:
    import pytorch_lightning as pl


class StageMeter:
    """The GPU and host meters of one stage after a fit, read by a sampler thread of their own, and
    where it is recorded: the fit's ledger (``ledger_path``), its run id and its totals as it ended."""

    def __init__(self, trainer: pl.Trainer, stage: str, fit: tuple[Path, str, Totals], clock: Callable[[], float],
                 sample_interval_s: float, nvml_index: Optional[int], cpu_tdp_w: Optional[float],
                 ram_power_w: Optional[float]) -> None:
        self.stage, self._clock = stage, clock
        self.ledger_path, self._run_id, self._fit_totals = fit
        self._start_s = clock()
        root = trainer.strategy.root_device
        cuda_index = root.index if root.type == "cuda" else None
        self._gpu = open_gpu(cuda_index, self._start_s, nvml_index=nvml_index)
        self._gpus = trainer.world_size if (cuda_index is not None or nvml_index is not None) else 0
        self._hosts = max(int(getattr(trainer, "num_nodes", 1) or 1), 1)
        self._host = open_host(self._start_s, counts_host=True, cpu_tdp_w=cpu_tdp_w, ram_power_w=ram_power_w)
        self._sampler = Sampler([self._gpu, self._host], sample_interval_s, clock=clock)
        self._sampler.start()

    def close(self, prices: Any) -> StageAfterFitEvent:
        """Stop the meters (a last reading) and price what the stage spent, for every rank and node."""
        self._sampler.stop()
        duration_s = max(self._clock() - self._start_s, 0.0)
        gpu_j = (self._gpu.latest.energy_j or 0.0) * self._gpus
        host = self._host.latest
        kwh = (gpu_j + (host.cpu_energy_j + host.ram_energy_j) * self._hosts) / 3.6e6
        gpu_hours, host_hours = self._gpus * duration_s / 3600.0, self._hosts * duration_s / 3600.0
        return StageAfterFitEvent(stage=self.stage, duration_s=duration_s, usd=prices.usd(gpu_hours, host_hours, kwh),
                                  kwh=kwh, co2_kg=prices.co2_kg(kwh), gpu_hours=gpu_hours, host_hours=host_hours)

    def append(self, event: StageAfterFitEvent) -> None:
        """Append the stage's record to the fit's ledger (its totals: the fit's, as it ended)."""
        ledger = Ledger(self.ledger_path, run_id=self._run_id)
        ledger.totals = self._fit_totals
        ledger.record(event)
        ledger.close()


def run_of_checkpoint(ckpt_path: Any) -> Optional[tuple[Path, str, Totals]]:
    """The run that saved a checkpoint, as its costaware callback kept it: (ledger path, run id, the
    ledger's totals), or None when the checkpoint holds none or that ledger is gone or another run's.

    Only the checkpoint's structure is read (``mmap``: its tensors stay on disk until Lightning loads
    them), with ``weights_only=True``, as Lightning and torch load by default: nothing in the file runs.
    A checkpoint this cannot read so is one without a run, never an error.
    """
    if not ckpt_path or not Path(str(ckpt_path)).is_file():
        return None
    try:
        checkpoint = torch.load(str(ckpt_path), map_location="cpu", mmap=True, weights_only=True)
        states = list((checkpoint.get("callbacks") or {}).values())
    except Exception:  # noqa: BLE001 - not a zip checkpoint, objects beyond weights, not a dict: no run
        return None
    for state in states + [s.get("meter") for s in states if isinstance(s, dict)]:  # CostMonitor's, or own_meter's
        if not isinstance(state, dict) or not isinstance(state.get("run_id"), str) \
                or not isinstance(state.get("ledger_path"), str):
            continue
        ledger = Path(state["ledger_path"])
        if ledger.is_file() and header_run_id(ledger) == state["run_id"]:
            try:
                return ledger, state["run_id"], read_ledger(ledger, lenient=True).totals
            except LedgerError:
                return None
    return None
