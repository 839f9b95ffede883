"""What a ``trainer.test``, ``validate`` or ``predict`` after a fit spends, for that fit's ledger and report.

A Lightning user tests the model a fit made (``trainer.fit(model); trainer.test(model)``). That pass
runs on the same rented machine, so the bill holds it; it is not training, so the fit's totals (what
the caps and the policy judged) stay as they ended. It is metered apart, at the fit's prices, and the
fit's meter appends it to the fit's ledger as a :class:`~costaware.records.StageAfterFitEvent`; the
report shows it after the fit, as it shows the strategies.

No collective at the end of a stage: under DDP every rank's GPU is taken to spend what rank zero's
did, and every node's host what rank zero's host did (ranks evaluate alike).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional

from costaware.meters import Sampler, open_gpu, open_host
from costaware.records import StageAfterFitEvent

if TYPE_CHECKING:
    import pytorch_lightning as pl


class StageMeter:
    """The GPU and host meters of one stage after a fit, read by a sampler thread of their own."""

    def __init__(self, trainer: pl.Trainer, stage: str, clock: Callable[[], float], sample_interval_s: float,
                 nvml_index: Optional[int], cpu_tdp_w: Optional[float], ram_power_w: Optional[float]) -> None:
        self.stage, self._clock = stage, clock
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
