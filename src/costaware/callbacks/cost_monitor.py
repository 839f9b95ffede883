"""``CostMonitor``: what the run has spent so far, in every logger, the progress bar and a ledger."""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from lightning_utilities.core.rank_zero import rank_zero_info

from costaware.ledger import LEDGER_FILENAME, Ledger, LedgerError, Totals, header_run_id, read_ledger
from costaware.meters import FlopsCounter, Sampler, open_gpu, open_host, peak_flops_per_s
from costaware.prices import make_prices
from costaware.records import End, ExceptionEvent, Header, MeterDegradedEvent, Metric, RecordedTotals, Sample
from costaware.validation import check_amount, check_count, check_path

# Per-rank figures summed across ranks at log intervals, in this order.
_SUMMED = ("gpu_hours", "host_hours", "gpu_energy_j", "cpu_energy_j", "ram_energy_j", "flops", "usd", "co2_kg",
           "train_batches", "power_w", "utilization_pct", "memory_used_bytes", "gpus_reporting", "cpu_power_w")


class CostMonitor:
    r"""Measure what a run spends: time, GPU-hours, energy, FLOPs, dollars and CO2.

    Meters are read by one background thread; the training hooks only read cached values and
    log at the Trainer's ``log_every_n_steps``, through ``pl_module.log``, so ``EarlyStopping``
    and ``ModelCheckpoint`` can monitor ``cost/usd`` like any metric and the progress bar shows
    dollars spent. Under DDP each rank meters its own GPU, local rank 0 meters its node's host,
    and totals are summed across ranks at log intervals only. Rank zero appends everything to
    ``<trainer.log_dir>/costaware/ledger.jsonl``. Totals survive a resume from a checkpoint.

    Through ``pl_module.log`` (monitorable, and ``cost/usd`` in the progress bar): ``cost/usd``,
    ``cost/kwh``, ``cost/co2_kg``, ``cost/gpu_hours``, ``cost/flops``. Straight to the loggers
    (and ``self.readings``): ``cost/elapsed_s``, ``throughput/batches_per_s``,
    ``throughput/flops_per_s``, and where measured ``throughput/mfu_pct``, ``gpu/power_w``,
    ``gpu/utilization_pct``, ``gpu/memory_used_gib``, ``host/cpu_power_w``. A meter that cannot
    read is left out, never shown as zero.

    Args:
        gpu: GPU model for prices and peak FLOPs (``"H100"``, ``"A10G"``...); default: what NVML
            reports for the training device.
        usd_per_gpu_hour: rental price per GPU-hour; default: the built-in table for ``gpu``. In
            ``on_prem`` mode: amortised hardware per GPU-hour (default 0).
        usd_per_host_hour: price of the host per node-hour (CPU-only runs, or hosts billed apart).
        usd_per_kwh: energy price; required in ``on_prem`` mode, ignored for dollars in ``cloud``.
        pue: data-centre power usage effectiveness (>= 1), applied to energy for dollars and CO2.
        mode: ``"cloud"`` (you pay the rental) or ``"on_prem"`` (you pay the energy).
        country: ISO 3166 code of the grid (``"USA"``, ``"FR"``) for carbon intensity.
        region: a US state within ``country="USA"`` (``"CA"``).
        cloud_provider: with ``cloud_region``, carbon intensity of a cloud region (``"gcp"``).
        cloud_region: e.g. ``"us-central1"``.
        g_co2_per_kwh: grid intensity given directly, grams CO2-eq per kWh.
        sample_interval_s: how often the background thread reads the meters.
        flush_interval_s: how often the ledger reaches the disk.
        flops_measure_batches: batches counted with ``FlopCounterMode`` (later ones reuse the mean).
        cpu_tdp_w: CPU TDP in watts, to skip codecarbon's CPU detection (and RAPL).
        ram_power_w: RAM power in watts, instead of codecarbon's estimate.
        nvml_index: meter this NVML device instead of the training device.
        ledger_dir: where to write ``ledger.jsonl``; default ``<trainer.log_dir>/costaware``.

    Example::

        from pytorch_lightning import Trainer
        from costaware import CostMonitor

        trainer = Trainer(callbacks=[CostMonitor(gpu="H100", usd_per_gpu_hour=2.5, country="USA")])
    """

    clock = staticmethod(time.monotonic)

    def __init__(
        self,
        gpu: Optional[str] = None,
        usd_per_gpu_hour: Optional[float] = None,
        usd_per_host_hour: float = 0.0,
        usd_per_kwh: Optional[float] = None,
        pue: float = 1.0,
        mode: str = "cloud",
        country: Optional[str] = None,
        region: Optional[str] = None,
        cloud_provider: Optional[str] = None,
        cloud_region: Optional[str] = None,
        g_co2_per_kwh: Optional[float] = None,
        sample_interval_s: float = 0.5,
        flush_interval_s: float = 10.0,
        flops_measure_batches: int = 3,
        cpu_tdp_w: Optional[float] = None,
        ram_power_w: Optional[float] = None,
        nvml_index: Optional[int] = None,
        ledger_dir: Optional[str] = None,
    ) -> None:
        self._price_args: dict[str, Any] = dict(
            gpu=gpu, usd_per_gpu_hour=usd_per_gpu_hour, usd_per_host_hour=usd_per_host_hour, usd_per_kwh=usd_per_kwh,
            pue=pue, mode=mode, country=country, region=region, cloud_provider=cloud_provider,
            cloud_region=cloud_region, g_co2_per_kwh=g_co2_per_kwh)
        self.prices = make_prices(**self._price_args)
        self.sample_interval_s = check_amount("sample_interval_s", sample_interval_s, minimum=1e-3)
        self.flush_interval_s = check_amount("flush_interval_s", flush_interval_s)
        check_amount("cpu_tdp_w", cpu_tdp_w, allow_none=True)
        check_amount("ram_power_w", ram_power_w, allow_none=True)
        self.flops_measure_batches = check_count("flops_measure_batches", flops_measure_batches, minimum=1)
        self.cpu_tdp_w = cpu_tdp_w
        self.ram_power_w = ram_power_w
        self.nvml_index = check_count("nvml_index", nvml_index, allow_none=True)
        self.ledger_dir = check_path("ledger_dir", ledger_dir)
        self.ledger: Optional[Ledger] = None
        self.totals = Totals()
        self._base = Totals()
        self._resumed_from: Optional[dict] = None
        self._run_id: Optional[str] = None
        self._sampler: Optional[Sampler] = None
        self.readings: dict = {}  # the latest logged figures, keyed as logged
        self.report_paths: dict = {}  # report.json / .md / .html once the fit has ended

    # ----------------------------------------------------------------------------------------
    # Lightning hooks
    # ----------------------------------------------------------------------------------------

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        self._start_s = self.clock()
        root = trainer.strategy.root_device
        cuda_index = root.index if root.type == "cuda" else None
        self._gpu = open_gpu(cuda_index, self._start_s, nvml_index=self.nvml_index)
        self._gpus_held = 1 if (cuda_index is not None or self.nvml_index is not None) else 0
        nvml_name = self._gpu.name if self._gpu.present and self._gpu.name != "unknown GPU" else None
        detected = nvml_name or (torch.cuda.get_device_name(cuda_index) if cuda_index is not None else None)
        if self._price_args["gpu"] is None and detected is not None:
            # The price depends on the detected GPU: resolve it now, before any compute.
            self.prices = make_prices(**{**self._price_args, "gpu": detected})
        elif self._gpu.present and detected is None and self._price_args["usd_per_gpu_hour"] is None \
                and self._price_args["gpu"] is None and self.prices.mode == "cloud":
            warnings.warn("costaware: NVML could not name this GPU, so it has no price: GPU-hours are counted at $0; "
                          "give CostMonitor(gpu=...) or usd_per_gpu_hour=...", RuntimeWarning, stacklevel=2)
        if self._gpus_held == 0 and self._price_args["usd_per_gpu_hour"] is not None:
            warnings.warn("costaware: usd_per_gpu_hour is set but this rank trains on no GPU: no GPU-hours are "
                          "counted for it", RuntimeWarning, stacklevel=2)
        self._counts_host = 1 if trainer.local_rank == 0 else 0  # a node's host is held once, by local rank 0
        self._host = open_host(self._start_s, counts_host=bool(self._counts_host),
                               cpu_tdp_w=self.cpu_tdp_w, ram_power_w=self.ram_power_w)
        self._sampler = Sampler([self._gpu, self._host], self.sample_interval_s, clock=self.clock)
        self._sampler.start()
        self._flops = FlopsCounter(self.flops_measure_batches)
        self._batches = 0
        self._world_size = trainer.world_size
        self._num_nodes = max(int(getattr(trainer, "num_nodes", 1) or 1), 1)
        self._peak_flops_per_s = peak_flops_per_s(self.prices.gpu_model or self._gpu.name, str(trainer.precision),
                                                  torch.get_float32_matmul_precision())
        self._last_log = (0.0, 0.0, 0.0)  # elapsed_s, train_batches, flops at the previous log
        self._mine_at_refresh = Totals()
        self._meter_faults_seen: set = set()
        log_dir = trainer.log_dir  # a broadcast under DDP: every rank must ask
        path = None
        if trainer.is_global_zero:
            default = Path(log_dir or trainer.default_root_dir) / "costaware"
            folder = Path(self.ledger_dir) if self.ledger_dir else default
            path = folder / LEDGER_FILENAME
        self.ledger = Ledger(path, flush_interval_s=self.flush_interval_s, clock=self.clock)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if self._run_id is not None:  # known only now: the checkpoint is restored after setup
            self.ledger.run_id = self._run_id
        path = self.ledger.path
        if path is not None and path.is_file() and header_run_id(path) != self.ledger.run_id:
            # Another run's ledger (logger=False, or a logger whose log_dir every run shares).
            self.ledger.path = path.parent / self.ledger.run_id / LEDGER_FILENAME
            warnings.warn(f"costaware: {path} is another run's ledger; this run's ledger and report go to "
                          f"{self.ledger.path.parent}", RuntimeWarning, stacklevel=2)
        self.totals = self._base
        self._mine_at_refresh = self._base  # the checkpoint's totals are loaded after setup
        self.ledger.totals = self._base
        self.ledger.record(Header(
            prices=self.prices.to_dict(),
            meters=self._meter_status(),
            world_size=trainer.world_size,
            num_nodes=trainer.num_nodes,
            precision=str(trainer.precision),
            peak_flops_per_s=self._peak_flops_per_s,
            max_steps=trainer.max_steps,
            max_epochs=trainer.max_epochs,
            accumulate_grad_batches=trainer.accumulate_grad_batches,
            resumed_from=self._resumed_from,
        ))

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._flops.batch_start(pl_module, self._batches)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._flops.batch_end(pl_module)
        self._batches += 1
        if trainer._logger_connector.should_update_logs:  # Lightning's own LR and device monitors ask this
            self._log(trainer, pl_module, on_step=True)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._flops.abort()  # a module's on_train_batch_start returned -1: that batch never ended
        self._log(trainer, pl_module, on_step=False)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking or self._sampler is None:  # sanity check, or validate() outside fit
            return
        self.refresh(trainer, pl_module)
        for name, value in trainer.callback_metrics.items():
            if not name.startswith(("cost/", "throughput/", "gpu/", "host/")) and _is_scalar(value):
                spent = self.ledger.totals
                self.ledger.record(Metric(name=name, value=float(value), step=trainer.global_step, usd=spent.usd,
                                          elapsed_s=spent.elapsed_s))
        self.ledger.flush()

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        # The ledger stays open until teardown: callbacks later in the list (the marginal-gain
        # policy's strategies) still record their results in their own on_fit_end.
        self._stop_meters()
        self.refresh(trainer, pl_module)
        if trainer.is_global_zero:
            t = self.totals
            rank_zero_info(
                f"costaware: run spent ${t.usd:.4f} ({t.kwh:.4f} kWh, {t.co2_kg:.4f} kg CO2, {t.gpu_hours:.3f} "
                f"GPU-h, {t.flops:.3g} FLOPs) in {t.elapsed_s:.0f} s; report: {self.ledger.path.parent}"
            )

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self.ledger is None or self.ledger.closed:
            return
        self._flops.abort()
        self._stop_meters()
        # No collective here: other ranks may be gone. Keep the larger of the last run-wide
        # totals and this rank's own, so nothing recorded is lost.
        local = self._session_totals(self._read_session())
        if local.usd > self.totals.usd:
            self.totals = local
        interrupted = isinstance(exception, KeyboardInterrupt)
        self.ledger.record(ExceptionEvent(error=f"{type(exception).__name__}: {exception}", interrupted=interrupted))
        # Lightning calls no teardown after an exception.
        self._finish("interrupted" if interrupted else "crashed", trainer)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._stop_meters()
        if stage == "fit" and self.ledger is not None and not self.ledger.closed:
            self._finish("completed", trainer)

    def state_dict(self) -> dict:
        # Spend up to this moment (between DDP syncs, the estimate BudgetCap uses), not the last log's.
        totals = self.current_totals() if self._sampler is not None else self.totals
        return {"run_id": self.ledger.run_id if self.ledger else self._run_id, "totals": totals.to_dict(),
                "ledger_path": str(self.ledger.path) if self.ledger and self.ledger.path else None}

    def load_state_dict(self, state_dict: dict) -> None:
        """Continue the totals of the checkpointed run, and what its ledger recorded after it."""
        self._run_id = state_dict.get("run_id")
        self._base = Totals.from_dict(state_dict.get("totals", {}))
        self._resumed_from = {"run_id": self._run_id, "checkpoint_usd": self._base.usd,
                              "ledger_path": state_dict.get("ledger_path")}
        old = state_dict.get("ledger_path")
        if old and Path(old).is_file():
            try:
                contents = read_ledger(old)
            except LedgerError:
                return
            same_run = contents.header is not None and contents.header.run_id == self._run_id
            if same_run and contents.last_totals.usd > self._base.usd:
                # The run went on (and paid) after this checkpoint before it stopped.
                self._base = contents.last_totals
                self._resumed_from["ledger_usd"] = self._base.usd

    # ----------------------------------------------------------------------------------------
    # Totals
    # ----------------------------------------------------------------------------------------

    def refresh(self, trainer: Any, pl_module: Any) -> Totals:
        """Recompute the run's totals, summing ranks (a collective: every rank must call it)."""
        session = self._read_session()
        self._mine_at_refresh = self._session_totals(session)
        if trainer.world_size > 1:
            vector = torch.tensor([session[k] for k in _SUMMED], dtype=torch.float64, device=pl_module.device)
            vector = trainer.strategy.reduce(vector, reduce_op="sum")
            session = {**session, **dict(zip(_SUMMED, vector.tolist()))}
        self.totals = self._session_totals(session)
        if self.ledger is not None:
            self.ledger.totals = self.totals  # metric points and events carry the spend at that moment
        self._readings = session
        self._note_meter_faults()
        return self.totals

    def current_totals(self) -> Totals:
        """The run's totals now, without a collective, cheap enough for every training step.

        Exact on one process. Under DDP: the last summed totals plus this rank's spend since then
        scaled to the run (ranks spend alike between log intervals): GPU figures times the world
        size, host figures times the node count (only local rank 0 meters its host; the other
        ranks extrapolate the run's host rate), dollars and CO2 priced from those.
        """
        session = self._session_totals(self._read_session())
        if self._world_size == 1:
            return session
        last, then = self.totals, self._mine_at_refresh
        d = {f: getattr(session, f) - getattr(then, f) for f in Totals.__dataclass_fields__}
        ws, nodes = self._world_size, self._num_nodes
        gpu_j = d["gpu_energy_j"] * ws
        if self._counts_host:
            host = {f: d[f] * nodes for f in ("host_hours", "cpu_energy_j", "ram_energy_j")}
        else:
            span_s = last.elapsed_s - self._base.elapsed_s
            rate = (lambda f: (getattr(last, f) - getattr(self._base, f)) / span_s) if span_s > 0 else (lambda f: 0.0)
            host = {"host_hours": nodes * d["elapsed_s"] / 3600.0,
                    "cpu_energy_j": rate("cpu_energy_j") * d["elapsed_s"],
                    "ram_energy_j": rate("ram_energy_j") * d["elapsed_s"]}
        delta = Totals(elapsed_s=d["elapsed_s"], gpu_hours=d["gpu_hours"] * ws, gpu_energy_j=gpu_j,
                       flops=d["flops"] * ws, train_batches=d["train_batches"] * ws, **host)
        delta.usd = self.prices.usd(delta.gpu_hours, delta.host_hours, delta.kwh)
        delta.co2_kg = self.prices.co2_kg(delta.kwh)
        return last + delta

    def _read_session(self) -> dict:
        """This rank's figures since setup, from the meters' cached readings."""
        elapsed_s = self.clock() - self._start_s
        gpu, host = self._gpu.latest, self._host.latest
        gpu_hours = self._gpus_held * elapsed_s / 3600.0
        host_hours = self._counts_host * elapsed_s / 3600.0
        gpu_j = gpu.energy_j or 0.0
        kwh = (gpu_j + host.cpu_energy_j + host.ram_energy_j) / 3.6e6
        return {
            "elapsed_s": elapsed_s,
            "gpu_hours": gpu_hours,
            "host_hours": host_hours,
            "gpu_energy_j": gpu_j,
            "cpu_energy_j": host.cpu_energy_j,
            "ram_energy_j": host.ram_energy_j,
            "flops": self._flops.total_flops,
            "usd": self.prices.usd(gpu_hours, host_hours, kwh),
            "co2_kg": self.prices.co2_kg(kwh),
            "train_batches": float(self._batches),
            "power_w": gpu.power_w or 0.0,
            "utilization_pct": gpu.utilization_pct or 0.0,
            "memory_used_bytes": gpu.memory_used_bytes or 0.0,
            "gpus_reporting": 1.0 if gpu.power_w is not None else 0.0,
            "cpu_power_w": host.cpu_power_w or 0.0,
        }

    def _session_totals(self, session: dict) -> Totals:
        now = Totals(elapsed_s=session["elapsed_s"], **{k: session[k] for k in _SUMMED[:9]})
        return self._base + now

    # ----------------------------------------------------------------------------------------
    # Logging
    # ----------------------------------------------------------------------------------------

    def _log(self, trainer: Any, pl_module: Any, on_step: bool) -> None:
        """Cost keys through ``pl_module.log`` (monitorable); readings straight to the loggers.

        Each ``pl_module.log`` call walks Lightning's whole result collection (hundreds of
        microseconds), so only the five keys a user may monitor take that path; the readings go
        to the loggers directly, the way Lightning's ``DeviceStatsMonitor`` sends its own.
        """
        t = self.refresh(trainer, pl_module)
        r = self._readings
        d_elapsed = t.elapsed_s - self._last_log[0]
        monitored = {"cost/usd": t.usd, "cost/kwh": t.kwh, "cost/co2_kg": t.co2_kg, "cost/gpu_hours": t.gpu_hours,
                     "cost/flops": t.flops}
        readings = {"cost/elapsed_s": t.elapsed_s}
        if d_elapsed > 0:
            readings["throughput/batches_per_s"] = (t.train_batches - self._last_log[1]) / d_elapsed
            flops_per_s = (t.flops - self._last_log[2]) / d_elapsed
            readings["throughput/flops_per_s"] = flops_per_s
            gpus = r["gpus_reporting"] or self._gpus_held * self._world_size
            if self._peak_flops_per_s and gpus:
                readings["throughput/mfu_pct"] = 100.0 * flops_per_s / (self._peak_flops_per_s * gpus)
        if r["gpus_reporting"]:
            readings.update({"gpu/power_w": r["power_w"],
                             "gpu/utilization_pct": r["utilization_pct"] / r["gpus_reporting"],
                             "gpu/memory_used_gib": r["memory_used_bytes"] / r["gpus_reporting"] / 2**30})
        if self._host.present:
            readings["host/cpu_power_w"] = r["cpu_power_w"]
        self._last_log = (t.elapsed_s, t.train_batches, t.flops)
        for key, value in monitored.items():
            pl_module.log(key, value, on_step=on_step, on_epoch=not on_step, prog_bar=key == "cost/usd",
                          logger=bool(trainer.loggers), batch_size=1, sync_dist=False)
        self.readings.update({**monitored, **readings})
        log_at_lightning_step(trainer, readings)
        self.ledger.totals = t
        self.ledger.record(Sample(totals=RecordedTotals.of(t), readings={
            k.replace("/", "_"): v for k, v in readings.items() if not k.startswith("cost/")}))

    def _meter_status(self) -> dict:
        return {
            "gpu": {"present": self._gpu.present, "name": self._gpu.name, "status": self._gpu.status,
                    "energy_source": getattr(self._gpu, "energy_source", "unavailable"),
                    "disabled_fields": list(self._gpu.disabled_fields)},
            "host": {"present": self._host.present, "status": self._host.status, "method": self._host.method},
            "flops": {"source": self._flops.source, "status": self._flops.failed or "ok"},
        }

    def _note_meter_faults(self) -> None:
        for name, meter in (("gpu", self._gpu), ("host", self._host)):
            if meter.degraded and name not in self._meter_faults_seen:
                self._meter_faults_seen.add(name)
                self.ledger.record(MeterDegradedEvent(meter=name, status=meter.status))

    def _stop_meters(self) -> None:
        """Take a last reading, stop the sampler thread and close the meters (idempotent)."""
        if self._sampler is not None:
            self._sampler.stop()
            self._sampler = None

    def _finish(self, how: str, trainer: Any) -> None:
        """Close the ledger and build the run's report from it (rank zero)."""
        self._note_meter_faults()
        self.ledger.totals = self.totals
        self.ledger.record(End(totals=RecordedTotals.of(self.totals), how=how, meters=self._meter_status()))
        # A later fit with this monitor continues the same run, from what it has spent.
        self._run_id, self._base = self.ledger.run_id, self.totals
        self._resumed_from = {"run_id": self._run_id, "previous_fit_usd": self.totals.usd}
        if self.ledger.path is None:
            return
        try:
            from costaware.report import publish_to_loggers, write_report

            self.report_paths = write_report(self.ledger.path)
        except Exception as err:  # noqa: BLE001 - a report must never break the run
            warnings.warn(f"costaware: could not write the budget report ({type(err).__name__}: {err}); "
                          f"`costaware report {self.ledger.path.parent}` rebuilds it", RuntimeWarning, stacklevel=2)
            return
        publish_to_loggers(trainer.loggers, self.report_paths, step=trainer.global_step)


def log_at_lightning_step(trainer: Any, metrics: dict) -> None:
    """Write ``metrics`` to every logger at the step Lightning logs the current batch's metrics at.

    For figures logged around ``pl_module.log`` (too many for it, or in a hook that forbids it),
    so they line up with the run's own metrics. That step is a private Lightning counter: it is
    read here only. (Not in ``attach``, which imports this module.)
    """
    step = trainer.fit_loop.epoch_loop._batches_that_stepped
    for logger in trainer.loggers:  # rank-zero-only methods
        logger.log_metrics(metrics, step=step)


def _is_scalar(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and math.isfinite(float(value))
    return isinstance(value, (int, float)) and math.isfinite(value)
