"""``CostMeter``: the run's one metering object, shared by every costaware callback.

It owns the meters (one background sampler thread), the prices, the run's totals and its ledger.
``CostMonitor`` holds one and drives it from its hooks; ``BudgetCap`` and
``MarginalGainStopping`` read the ``CostMonitor``'s, or, alone, hold and drive their own. A
callback that reads a meter it does not drive uses :meth:`current_totals`, :meth:`refresh`,
:attr:`totals`, :attr:`ledger` and the idempotent :meth:`count_batch` only.
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
from lightning_utilities.core.rank_zero import rank_zero_info

from costaware import _lightning_internals as internals
from costaware.after_fit import StageMeter, run_of_checkpoint
from costaware.ledger import (
    LEDGER_FILENAME,
    OPEN_LEDGER_PATHS,
    Ledger,
    LedgerError,
    Totals,
    header_run_id,
    read_ledger,
)
from costaware.meters import FlopsCounter, Sampler, open_gpu, open_host, peak_flops_per_s
from costaware.phases import PHASE_FIGURES, PhaseClock, phase_figures
from costaware.prices import make_prices
from costaware.records import (
    End,
    ExceptionEvent,
    Header,
    MeterDegradedEvent,
    Metric,
    PhasesEvent,
    RecordedTotals,
    Sample,
)
from costaware.validation import check_amount, check_count, check_path

if TYPE_CHECKING:
    import pytorch_lightning as pl

# Per-rank figures summed across ranks at log intervals, in this order.
_SUMMED = ("gpu_hours", "host_hours", "gpu_energy_j", "cpu_energy_j", "ram_energy_j", "flops", "usd", "co2_kg",
           "train_batches", "power_w", "utilization_pct", "memory_used_bytes", "gpus_reporting", "cpu_power_w")
#: The price arguments, as ``CostMonitor`` takes them.
PRICE_ARGS = ("gpu", "usd_per_gpu_hour", "usd_per_host_hour", "usd_per_kwh", "pue", "mode", "country", "region",
              "cloud_provider", "cloud_region", "g_co2_per_kwh")
#: The meter settings, as ``CostMonitor`` takes them.
METER_ARGS = ("sample_interval_s", "flush_interval_s", "flops_measure_batches", "cpu_tdp_w", "ram_power_w",
              "nvml_index", "ledger_dir")
#: How to give a price, for messages: the arguments and the LightningCLI flag.
PRICE_HINT = ("give usd_per_host_hour=... (the machine's $/hour; on a CPU-only machine the only price), or "
              "usd_per_gpu_hour=... / gpu=... for a GPU; with LightningCLI: "
              "--trainer.callbacks.init_args.usd_per_host_hour=0.5")


class CostMeter:
    """Time, GPU-hours, energy, FLOPs, dollars and CO2 of a run, and its ledger.

    Args: those of ``CostMonitor`` (prices and meter settings), validated here.

    Attributes:
        prices: the :class:`~costaware.prices.Prices` in use (the detected GPU's, after :meth:`start`).
        ledger: the run's ledger, from :meth:`start` on (None before).
        readings: the latest figures :meth:`log` sent, keyed as logged.
        report_paths: report.json / .md / .html once :meth:`finish` wrote them.
    """

    clock = staticmethod(time.monotonic)

    def __init__(self, gpu: Optional[str] = None, usd_per_gpu_hour: Optional[float] = None,
                 usd_per_host_hour: float = 0.0, usd_per_kwh: Optional[float] = None, pue: float = 1.0,
                 mode: str = "cloud", country: Optional[str] = None, region: Optional[str] = None,
                 cloud_provider: Optional[str] = None, cloud_region: Optional[str] = None,
                 g_co2_per_kwh: Optional[float] = None, sample_interval_s: float = 0.5, flush_interval_s: float = 10.0,
                 flops_measure_batches: int = 3, cpu_tdp_w: Optional[float] = None,
                 ram_power_w: Optional[float] = None, nvml_index: Optional[int] = None,
                 ledger_dir: Optional[str] = None) -> None:
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
        self.readings: dict = {}
        self.report_paths: dict = {}
        self._totals = Totals()
        self._base = Totals()
        self._resumed_from: Optional[dict] = None
        self._run_id: Optional[str] = None
        self._sampler: Optional[Sampler] = None
        self._counted_batch: Optional[int] = None
        self._gpus_held: Optional[int] = None  # known at start
        self._ledger_open = False
        self._phases: Optional[PhaseClock] = None
        self._phases_before: Optional[dict] = None  # a resumed run's phases up to its checkpoint
        self._phase_totals: Optional[dict] = None
        self._stopped_by: Optional[str] = None  # who stopped the fit, if not costaware (see stopped_by)
        self._stage: Optional[StageMeter] = None  # a test, validate or predict after the fit, being metered

    # ----------------------------------------------------------------------------------------
    # What the meter is
    # ----------------------------------------------------------------------------------------

    def settings(self) -> dict:
        """The arguments this meter was built with (for a second meter at the same prices)."""
        return {**self._price_args, **{name: getattr(self, name) for name in METER_ARGS}}

    def dollars_priced(self) -> Optional[bool]:
        """Whether any price applies, so dollar figures can be above $0: True, False, or None when
        it depends on the GPU :meth:`start` will find (no GPU price given, CUDA present)."""
        if self._gpus_held is not None:  # started: the GPU is known
            return self.prices.usd(1.0 if self._gpus_held else 0.0, 1.0, 1.0) > 0
        if self.prices.usd(1.0, 1.0, 1.0) > 0:
            return True
        a = self._price_args
        if self.prices.mode == "cloud" and a["gpu"] is None and a["usd_per_gpu_hour"] is None \
                and (torch.cuda.is_available() or self.nvml_index is not None):
            return None
        return False

    @property
    def running(self) -> bool:
        return self._sampler is not None

    @property
    def totals(self) -> Totals:
        """The run's totals at the last :meth:`refresh` (summed over ranks)."""
        return self._totals

    # ----------------------------------------------------------------------------------------
    # Driving (by the callback that holds the meter)
    # ----------------------------------------------------------------------------------------

    def start(self, trainer: pl.Trainer) -> None:
        """Open the meters and the ledger, before any compute of a fit (the driver's ``setup``)."""
        self._fit_ended = False
        self._stopped_by = None
        self._start_s = self.clock()
        self._start_wall_s = time.time()  # the span the totals' elapsed_s covers starts here
        root = trainer.strategy.root_device
        cuda_index = root.index if root.type == "cuda" else None
        self._gpu = open_gpu(cuda_index, self._start_s, nvml_index=self.nvml_index)
        self._gpus_held = 1 if (cuda_index is not None or self.nvml_index is not None) else 0
        self._price_detected_gpu(cuda_index)
        self._counts_host = 1 if trainer.local_rank == 0 else 0  # a node's host is held once, by local rank 0
        self._host = open_host(self._start_s, counts_host=bool(self._counts_host),
                               cpu_tdp_w=self.cpu_tdp_w, ram_power_w=self.ram_power_w)
        self._sampler = Sampler([self._gpu, self._host], self.sample_interval_s, clock=self.clock)
        self._sampler.start()
        self._flops = FlopsCounter(self.flops_measure_batches)
        self._batches = 0
        self._counted_batch = None
        self._ledger_open = False
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
        # Written from the ledger's own thread; samples no closer than the meters' own readings.
        self.ledger = Ledger(path, flush_interval_s=self.flush_interval_s, clock=self.clock, background=True,
                             min_sample_interval_s=self.sample_interval_s)
        self._phases, self._phase_totals = PhaseClock(self.current_totals), None

    def _price_detected_gpu(self, cuda_index: Optional[int]) -> None:
        nvml_name = self._gpu.name if self._gpu.present and self._gpu.name != "unknown GPU" else None
        detected = nvml_name or (torch.cuda.get_device_name(cuda_index) if cuda_index is not None else None)
        args = self._price_args
        if args["gpu"] is None and detected is not None:
            # The price depends on the detected GPU: resolve it now, before any compute.
            self.prices = make_prices(**{**args, "gpu": detected})
        elif self._gpu.present and detected is None and args["usd_per_gpu_hour"] is None \
                and args["gpu"] is None and self.prices.mode == "cloud":
            warnings.warn("costaware: NVML could not name this GPU, so it has no price: GPU-hours are counted at $0; "
                          "give CostMonitor(gpu=...) or usd_per_gpu_hour=...", RuntimeWarning, stacklevel=3)
        if self._gpus_held == 0 and args["usd_per_gpu_hour"] is not None:
            warnings.warn("costaware: usd_per_gpu_hour is set but this rank trains on no GPU: no GPU-hours are "
                          "counted for it", RuntimeWarning, stacklevel=3)

    def open_ledger(self, trainer: pl.Trainer) -> None:
        """Write the ledger's header, once per fit, before any record: a holder calls it once a
        resumed run's checkpoint is restored (``on_fit_start``; with a strategy that restores later,
        ``on_sanity_check_start``, ``on_train_start`` or ``on_fit_end``); later calls do nothing."""
        if self._ledger_open:
            return
        self._ledger_open = True
        assert self.ledger is not None, "start() opens the ledger"
        if self._run_id is not None:
            self.ledger.run_id = self._run_id
        path = self.ledger.path
        # Another run's ledger: on disk, or opened by another meter of this process whose header
        # the writer thread has not written yet.
        if path is not None and (path in OPEN_LEDGER_PATHS
                                 or (path.is_file() and header_run_id(path) != self.ledger.run_id)):
            # Another run's ledger (logger=False, or a logger whose log_dir every run shares).
            self.ledger.path = path.parent / self.ledger.run_id / LEDGER_FILENAME
            warnings.warn(f"costaware: {path} is another run's ledger; this run's ledger and report go to "
                          f"{self.ledger.path.parent}", RuntimeWarning, stacklevel=2)
        if self.ledger.path is not None:
            OPEN_LEDGER_PATHS.add(self.ledger.path)
        if self._world_size > 1:  # every rank, resumed or not: a collective none may skip
            # Where the resumed run stands is rank 0's reading (of the checkpoint and of the old
            # ledger, which other nodes may not see in node-local log dirs): every rank adopts it.
            self._base, self._phases_before, self._resumed_from = trainer.strategy.broadcast(
                (self._base, self._phases_before, self._resumed_from), src=0)
        self._totals = self._base
        self._mine_at_refresh = self._base
        self.ledger.totals = self._base
        if self._phases is not None:  # a resumed run's earlier sessions (normalised by _latest_phases)
            self._phases.spent.update(_latest_phases([self._phases_before]) or {})
        self.ledger.record(Header(
            prices=self.prices.to_dict(), meters=self.meter_status(), world_size=trainer.world_size,
            num_nodes=trainer.num_nodes, precision=str(trainer.precision), peak_flops_per_s=self._peak_flops_per_s,
            max_steps=trainer.max_steps, max_epochs=trainer.max_epochs,
            accumulate_grad_batches=trainer.accumulate_grad_batches, resumed_from=self._resumed_from))
        self._last_log = (self._base.elapsed_s, self._base.train_batches, self._base.flops)  # rates: this session

    def phase_start(self, name: str) -> None:
        """A phase (``training``, ``validation``, ``checkpointing``, ``probe``) begins: from now its
        time and cost are charged to it (the driver's hooks; see :mod:`costaware.phases`)."""
        if self._phases is not None and self._sampler is not None:
            if self._phases.current == "checkpointing":
                self._phases.end("checkpointing")
            self._phases.start(name)

    def phase_end(self, name: str) -> None:
        if self._phases is not None and self._sampler is not None:
            self._phases.end(name)

    def begin_batch(self, pl_module: pl.LightningModule) -> None:
        """Count the FLOPs of the training batch that starts (the driver's ``on_train_batch_start``)."""
        if self._phases is not None and self._phases.current == "checkpointing":
            self._phases.end("checkpointing")  # a save runs after on_save_checkpoint: timed to the next hook
        self._flops.batch_start(pl_module, self._batches)

    def count_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Count the training batch that just ended, once: any holder may call it (a cap reads
        totals that include the batch), later calls for the same batch do nothing."""
        index = trainer.fit_loop.total_batch_idx
        if self._counted_batch == index or self._sampler is None:
            return
        self._counted_batch = index
        self._flops.batch_end(pl_module)
        self._batches += 1

    def end_epoch(self) -> None:
        """A module's ``on_train_batch_start`` returned -1: that batch never ended."""
        self._flops.abort()

    def record_validation(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refresh the totals and record the validation's metrics in the ledger (a collective)."""
        if trainer.sanity_checking or self._sampler is None:
            return
        self.refresh(trainer, pl_module)
        assert self.ledger is not None, "start() opens the ledger"
        for name, value in trainer.callback_metrics.items():
            if not name.startswith(("cost/", "throughput/", "gpu/", "host/")) and _is_scalar(value):
                spent = self.ledger.totals
                self.ledger.record(Metric(name=name, value=float(value), step=trainer.global_step, usd=spent.usd,
                                          elapsed_s=spent.elapsed_s))
        if self._phases is not None:  # for the report of a run killed before its end record
            self.ledger.record(PhasesEvent(phases=self._phases.snapshot()))
        self.ledger.flush_soon()  # by the ledger's writer thread, not this one

    def stop(self) -> None:
        """Take a last reading, stop the sampler thread and close the meters (idempotent)."""
        if self._sampler is not None:
            self._sampler.stop()
            self._sampler = None

    def end_fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Stop metering and say what the run spent (the driver's ``on_fit_end``); the ledger
        stays open for the strategies' results until :meth:`finish`.

        Once per fit, whoever asks first: a policy listed before the CostMonitor ends the metering
        before its strategies run, so the teacher's totals never include the student's fit.
        """
        if getattr(self, "_fit_ended", False):
            return
        self._fit_ended = True
        self._stopped_by = stopped_by(trainer)
        self.stop()
        self.refresh(trainer, pl_module)
        self._phase_totals = self._phases.snapshot() if self._phases is not None else None
        if trainer.is_global_zero:
            assert self.ledger is not None and self.ledger.path is not None, "start() gives rank zero a ledger file"
            t = self._totals
            rank_zero_info(
                f"costaware: run spent ${t.usd:.4f} ({t.kwh:.4f} kWh, {t.co2_kg:.4f} kg CO2, {t.gpu_hours:.3f} "
                f"GPU-h, {t.flops:.3g} FLOPs) in {t.elapsed_s:.0f} s; report: {self.ledger.path.parent}")

    def begin_stage(self, trainer: pl.Trainer, stage: str) -> None:
        """Meter a ``test``, ``validate`` or ``predict`` that follows a fit of this meter (the driver's
        ``setup``; rank zero). Before any fit there is no run to charge it to: nothing is metered."""
        stage = str(getattr(stage, "value", stage))  # Lightning passes a TrainerFn (a str enum)
        ledger = self.ledger
        if stage == "fit" or self._run_id is None or ledger is None or not ledger.closed or ledger.path is None:
            return  # no fit yet, or one still writing its ledger
        self._begin_stage(trainer, stage, (ledger.path, self._run_id, self._totals))

    def begin_stage_from_checkpoint(self, trainer: pl.Trainer, stage: str) -> None:
        """Meter a ``test``, ``validate`` or ``predict`` in a process that ran no fit, for the run that saved
        the checkpoint it loaded (the driver's ``on_test_start`` and the like: ``trainer.ckpt_path`` is known
        from then); without one, nothing is metered."""
        if self.ledger is not None or self._stage is not None or not trainer.is_global_zero:  # a fit started here
            return
        fit = run_of_checkpoint(trainer.ckpt_path)
        if fit is not None:
            self.prices = self._prices_on(trainer)
            self._begin_stage(trainer, stage, fit)

    def _begin_stage(self, trainer: pl.Trainer, stage: str, fit: tuple) -> None:
        if self._stage is not None or self._sampler is not None or not trainer.is_global_zero:
            return
        try:
            self._stage = StageMeter(trainer, stage, fit, self.clock, self.sample_interval_s, self.nvml_index,
                                     self.cpu_tdp_w, self.ram_power_w)
        except Exception as err:  # noqa: BLE001 - metering never breaks the user's test
            warnings.warn(f"costaware: could not meter {stage} after the fit ({type(err).__name__}: {err})",
                          RuntimeWarning, stacklevel=3)

    def _prices_on(self, trainer: pl.Trainer) -> Any:
        """The prices, with the GPU this process runs on priced when no model was given (as :meth:`start` does)."""
        root = trainer.strategy.root_device
        if root.type != "cuda" or self._price_args["gpu"] is not None:
            return self.prices
        try:
            return make_prices(**{**self._price_args, "gpu": torch.cuda.get_device_name(root.index)})
        except Exception:  # noqa: BLE001 - a GPU without a known price: as given (GPU-hours at $0 if none)
            return self.prices

    def end_stage(self, trainer: pl.Trainer) -> None:
        """Record what the stage after the fit spent in the fit's ledger and rewrite its report (the driver's
        ``teardown``, or ``on_exception``: a test that fails has spent too)."""
        stage, self._stage = self._stage, None
        if stage is None:
            return
        event = stage.close(self.prices)
        stage.append(event)
        path = stage.ledger_path
        rank_zero_info(f"costaware: {event.stage} after the fit spent ${event.usd:.4f} ({event.kwh:.4f} kWh) in "
                       f"{event.duration_s:.0f} s; report: {path.parent}")
        # To this Trainer's loggers only when they are the fit's (not a new process's, testing a checkpoint).
        self._write_report(trainer, path, publish=self.ledger is not None and path == self.ledger.path)

    def fail(self, trainer: pl.Trainer, exception: BaseException) -> None:
        """Close the ledger after an exception, keeping everything recorded (no collective)."""
        self.end_stage(trainer)  # a test after the fit that failed: what it spent is recorded
        self.stop()  # the meters and their thread, whatever else failed
        if self.ledger is None or self.ledger.closed or not self._ledger_open:
            if self.ledger is not None and not self._ledger_open:
                self.ledger.close()  # failed before any record (a configuration error): no headless ledger
            return
        self._flops.abort()
        # Totals never go backwards: field by field, the larger of the last run-wide (summed)
        # totals, this rank's own, and any the ledger already recorded (a DDP rank that crashed
        # between log intervals holds its own totals only, below the sums recorded before).
        local = self._session_totals(self._read_session())
        self._totals = self._totals.maximum(local).maximum(self.ledger.max_totals)
        if self._phases is not None and self._phase_totals is None:
            self._phase_totals = self._phases.snapshot()
        interrupted = isinstance(exception, KeyboardInterrupt)
        self.ledger.record(ExceptionEvent(error=f"{type(exception).__name__}: {exception}", interrupted=interrupted))
        # Lightning calls no teardown after an exception.
        self.finish("interrupted" if interrupted else "crashed", trainer)

    def teardown(self, trainer: pl.Trainer) -> None:
        """Close the ledger and write the report, if not done (the driver's ``teardown``).

        A fit that ends before its ledger opens (Lightning's Tuner ends its ``lr_find`` and
        ``scale_batch_size`` fits that way, after their trial steps) writes no ledger: what it spent
        is carried into this meter's next fit, counted in its totals as the phase "tuning".
        """
        self.stop()
        if self.ledger is not None and not self._ledger_open and not self.ledger.closed:
            before, self._base = self._base, self._session_totals(self._read_session())  # on an earlier fit's
            tuning = (self._phases_before or {}).get("tuning") or dict.fromkeys(PHASE_FIGURES, 0.0)
            now, then = phase_figures(self._base), phase_figures(before)
            self._phases_before = {**(self._phases_before or {}),
                                   "tuning": {k: float(tuning.get(k, 0.0)) + now[k] - then[k] for k in PHASE_FIGURES}}
            self.ledger.close()  # nothing recorded: no file
            return
        if self.ledger is not None and not self.ledger.closed:
            self.finish("completed", trainer)

    def finish(self, how: str, trainer: pl.Trainer) -> None:
        """Close the ledger and build the run's report from it (rank zero)."""
        assert self.ledger is not None, "start() opens the ledger"
        self._note_meter_faults()
        self._totals = self._totals.maximum(self.ledger.max_totals)  # never below a total already recorded
        self.ledger.totals = self._totals
        self.ledger.record(End(totals=RecordedTotals.of(self._totals), how=how, meters=self.meter_status(),
                               phases=self._phase_totals,
                               stopped_by=self._stopped_by if how == "completed" and self.ledger.stopped_as is None
                               else None,
                               optimizer_steps=_global_step(trainer), **self._metered_span()))
        # A later fit with this meter continues the same run, from what it has spent.
        self._run_id, self._base = self.ledger.run_id, self._totals
        self._phases_before = self._phase_totals  # ... and its phases
        self._resumed_from = {"run_id": self._run_id, "previous_fit_usd": self._totals.usd}
        if self.ledger.path is not None:
            self._write_report(trainer, self.ledger.path, publish=True)

    def _write_report(self, trainer: pl.Trainer, path: Path, publish: bool) -> None:
        """Build the report from the ledger at ``path`` (and hand it to the loggers); never raises."""
        try:
            from costaware.report import publish_to_loggers, write_report

            self.report_paths = write_report(path)
        except Exception as err:  # noqa: BLE001 - a report must never break the run
            warnings.warn(f"costaware: could not write the budget report ({type(err).__name__}: {err}); "
                          f"`costaware report {path.parent}` rebuilds it", RuntimeWarning, stacklevel=3)
            return
        if publish:
            publish_to_loggers(trainer.loggers, self.report_paths, step=trainer.global_step)

    def _metered_span(self) -> dict:
        """This session's metered span as wall times: its length is the totals' elapsed_s (this session's part)."""
        start = getattr(self, "_start_wall_s", None)
        if start is None:
            return {}
        return {"metered_from_wall_s": start,
                "metered_to_wall_s": start + max(self._totals.elapsed_s - self._base.elapsed_s, 0.0)}

    def state_dict(self) -> dict:
        # Spend up to this moment (between DDP syncs, the estimate BudgetCap uses), not the last log's.
        totals = self.current_totals() if self._sampler is not None else self._totals
        phases = self._phases.snapshot() if self._phases is not None and self._sampler is not None else None
        return {"run_id": self.ledger.run_id if self.ledger else self._run_id, "totals": totals.to_dict(),
                "ledger_path": str(self.ledger.path) if self.ledger and self.ledger.path else None,
                "phases": phases}

    def load_state_dict(self, state_dict: dict) -> None:
        """Continue the totals of the checkpointed run, and what its ledger recorded after it.

        Not a checkpoint this very fit saved before its ledger opened: Lightning's Tuner saves the model,
        trains trial steps and restores it, all within one fit; that is no resume (its spend goes on), and the
        time since that save was the tuner's trials (the phase "tuning"), not checkpointing."""
        if self.ledger is not None and not self._ledger_open and state_dict.get("run_id") == self.ledger.run_id:
            if self._phases is not None:
                self._phases.relabel("checkpointing", "tuning")
            return
        self._run_id = state_dict.get("run_id")
        self._base = Totals.from_dict(state_dict.get("totals", {}))
        phases = state_dict.get("phases")  # absent in checkpoints of costaware <= 0.1
        self._phases_before = phases if isinstance(phases, dict) else None
        self._resumed_from = {"run_id": self._run_id, "checkpoint_usd": self._base.usd,
                              "ledger_path": state_dict.get("ledger_path")}
        old = state_dict.get("ledger_path")
        if old and Path(old).is_file():
            try:
                contents = read_ledger(old)
            except LedgerError:
                return
            same_run = contents.header is not None and contents.header.run_id == self._run_id
            later = contents.last_totals
            if same_run and (later.usd > self._base.usd or later.elapsed_s > self._base.elapsed_s):
                # The run went on after this checkpoint before it stopped (an unpriced run too: $0):
                # field by field the larger (a DDP checkpoint holds an extrapolated estimate).
                self._base = self._base.maximum(later)
                self._resumed_from["ledger_usd"] = self._base.usd
                recorded = [e.phases for e in contents.events if isinstance(e, PhasesEvent) and e.phases]
                if contents.end is not None and contents.end.phases:
                    recorded.append(contents.end.phases)
                self._phases_before = _latest_phases([self._phases_before, *recorded])

    # ----------------------------------------------------------------------------------------
    # Totals
    # ----------------------------------------------------------------------------------------

    def refresh(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Totals:
        """Recompute the run's totals, summing ranks (a collective: every rank must call it)."""
        session = self._read_session()
        self._mine_at_refresh = self._session_totals(session)
        if trainer.world_size > 1:
            # On the strategy's device, not the module's: at on_fit_end Lightning has moved the
            # module to the CPU, and NCCL reduces no CPU tensor.
            vector = torch.tensor([session[k] for k in _SUMMED], dtype=torch.float64,
                                  device=trainer.strategy.root_device)
            vector = trainer.strategy.reduce(vector, reduce_op="sum")
            session = {**session, **dict(zip(_SUMMED, vector.tolist()))}
        self._totals = self._session_totals(session)
        if self.ledger is not None:
            self.ledger.totals = self._totals  # metric points and events carry the spend at that moment
        self._readings = session
        self._note_meter_faults()
        return self._totals

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
        last, then = self._totals, self._mine_at_refresh
        d = {f: getattr(session, f) - getattr(then, f) for f in Totals.__dataclass_fields__}
        ws, nodes = self._world_size, self._num_nodes
        if self._counts_host:
            host = {f: d[f] * nodes for f in ("host_hours", "cpu_energy_j", "ram_energy_j")}
        else:
            span_s = last.elapsed_s - self._base.elapsed_s
            rate = (lambda f: (getattr(last, f) - getattr(self._base, f)) / span_s) if span_s > 0 else (lambda f: 0.0)
            host = {"host_hours": nodes * d["elapsed_s"] / 3600.0,
                    "cpu_energy_j": rate("cpu_energy_j") * d["elapsed_s"],
                    "ram_energy_j": rate("ram_energy_j") * d["elapsed_s"]}
        delta = Totals(elapsed_s=d["elapsed_s"], gpu_hours=d["gpu_hours"] * ws, gpu_energy_j=d["gpu_energy_j"] * ws,
                       flops=d["flops"] * ws, train_batches=d["train_batches"] * ws, **host)
        delta.usd = self.prices.usd(delta.gpu_hours, delta.host_hours, delta.kwh)
        delta.co2_kg = self.prices.co2_kg(delta.kwh)
        return last + delta

    def _read_session(self) -> dict:
        """This rank's figures since :meth:`start`, from the meters' cached readings."""
        elapsed_s = self.clock() - self._start_s
        gpu, host = self._gpu.latest, self._host.latest
        assert self._gpus_held is not None, "set by start()"
        gpu_hours = self._gpus_held * elapsed_s / 3600.0
        host_hours = self._counts_host * elapsed_s / 3600.0
        gpu_j = gpu.energy_j or 0.0
        kwh = (gpu_j + host.cpu_energy_j + host.ram_energy_j) / 3.6e6
        return {
            "elapsed_s": elapsed_s, "gpu_hours": gpu_hours, "host_hours": host_hours, "gpu_energy_j": gpu_j,
            "cpu_energy_j": host.cpu_energy_j, "ram_energy_j": host.ram_energy_j, "flops": self._flops.total_flops,
            "usd": self.prices.usd(gpu_hours, host_hours, kwh), "co2_kg": self.prices.co2_kg(kwh),
            "train_batches": float(self._batches), "power_w": gpu.power_w or 0.0,
            "utilization_pct": gpu.utilization_pct or 0.0, "memory_used_bytes": gpu.memory_used_bytes or 0.0,
            "gpus_reporting": 1.0 if gpu.power_w is not None else 0.0, "cpu_power_w": host.cpu_power_w or 0.0,
        }

    def _session_totals(self, session: dict) -> Totals:
        now = Totals(elapsed_s=session["elapsed_s"], **{k: session[k] for k in _SUMMED[:9]})
        return self._base + now

    # ----------------------------------------------------------------------------------------
    # Logging
    # ----------------------------------------------------------------------------------------

    def log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, on_step: bool) -> None:
        """Cost keys and readings: monitorable (callback metrics) and to the loggers, no ``pl_module.log``.

        Each ``pl_module.log`` call walks Lightning's whole result collection (hundreds of
        microseconds), so the figures go into the trainer's callback, logged and progress-bar
        metrics directly (``EarlyStopping``/``ModelCheckpoint`` monitor ``cost/usd`` as any
        metric) and to the loggers at Lightning's step, as its ``DeviceStatsMonitor`` sends its own.
        """
        t = self.refresh(trainer, pl_module)
        monitored = {"cost/usd": t.usd, "cost/kwh": t.kwh, "cost/co2_kg": t.co2_kg, "cost/gpu_hours": t.gpu_hours,
                     "cost/flops": t.flops}
        readings = self._readings_since_last_log(t)
        figures = {**monitored, **readings}
        self.readings.update(figures)
        internals.publish_metrics(trainer, figures, prog_bar=("cost/usd",))
        log_at_lightning_step(trainer, figures)
        assert self.ledger is not None, "start() opens the ledger"
        self.ledger.totals = t
        self.ledger.record(Sample(totals=RecordedTotals.of(t), readings={
            k.replace("/", "_"): v for k, v in readings.items() if not k.startswith("cost/")}))

    def _readings_since_last_log(self, t: Totals) -> dict:
        r = self._readings
        d_elapsed = t.elapsed_s - self._last_log[0]
        readings = {"cost/elapsed_s": t.elapsed_s}
        if d_elapsed > 0:
            readings["throughput/batches_per_s"] = (t.train_batches - self._last_log[1]) / d_elapsed
            flops_per_s = (t.flops - self._last_log[2]) / d_elapsed
            readings["throughput/flops_per_s"] = flops_per_s
            assert self._gpus_held is not None, "set by start()"
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
        return readings

    def meter_status(self) -> dict:
        """Each meter's state (present, status, how it measures), for the ledger and the report."""
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
                assert self.ledger is not None, "start() opens the ledger"
                self._meter_faults_seen.add(name)
                self.ledger.record(MeterDegradedEvent(meter=name, status=meter.status))


def log_at_lightning_step(trainer: pl.Trainer, metrics: dict) -> None:
    """Write ``metrics`` to every logger at the step Lightning logs the current batch's metrics at.

    For figures logged around ``pl_module.log`` (too many for it, or in a hook that forbids it),
    so they line up with the run's own metrics.
    """
    step = internals.logging_step(trainer)
    for logger in trainer.loggers:  # rank-zero-only methods
        logger.log_metrics(metrics, step=step)


def _is_scalar(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and math.isfinite(float(value))
    return isinstance(value, (int, float)) and math.isfinite(value)


def _latest_phases(snapshots: list) -> Optional[dict]:
    """Per phase and figure, the largest of several cumulative snapshots of one run's phases (the
    latest, whichever record holds it: a checkpoint, a validation's event, the end record)."""
    out: dict[str, dict[str, float]] = {}
    for snapshot in snapshots:
        for name, figures in (snapshot or {}).items():
            if isinstance(figures, dict):
                mine = out.setdefault(name, dict.fromkeys(PHASE_FIGURES, 0.0))
                for key in PHASE_FIGURES:
                    value = figures.get(key)
                    if isinstance(value, (int, float)) and value > mine[key]:
                        mine[key] = float(value)
    return out or None


def stopped_by(trainer: pl.Trainer) -> Optional[str]:
    """Who asked the fit to stop before its planned end, or None (it ran its plan). Lightning's ``EarlyStopping``
    and ``Timer`` (``max_time``) say so on their public attributes; anything else that set
    ``trainer.should_stop`` is named as that. (costaware's own stops are events in the ledger.)"""
    if not getattr(trainer, "should_stop", False):
        return None
    for cb in getattr(trainer, "callbacks", None) or []:
        message = getattr(cb, "stopping_reason_message", None)  # set by EarlyStopping when it stops the fit
        if type(cb).__name__ == "EarlyStopping" and isinstance(message, str) and message:
            message = message.replace(" Signaling Trainer to stop.", "").strip()
            return (f"EarlyStopping(monitor={getattr(cb, 'monitor', '?')!r}) at epoch "
                    f"{getattr(cb, 'stopped_epoch', '?')}: {message}")
        if type(cb).__name__ == "Timer" and callable(getattr(cb, "time_remaining", None)):
            try:
                left = cb.time_remaining()
            except Exception:  # noqa: BLE001 - naming who stopped must never break the fit's end
                left = None
            if left is not None and left <= 0:
                return "max_time (Lightning's Timer)"
    return "trainer.should_stop (set by a callback or the module)"


def _global_step(trainer: pl.Trainer) -> Optional[int]:
    """``trainer.global_step`` (the unit of ``max_steps``), or None where a trainer stand-in has none."""
    step = getattr(trainer, "global_step", None)
    return int(step) if isinstance(step, int) and step >= 0 else None
