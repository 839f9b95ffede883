"""``CostMonitor``: what the run has spent so far, in every logger, the progress bar and a ledger."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from lightning_utilities.core.rank_zero import rank_zero_warn

from costaware import _lightning_internals as internals
from costaware._lightning import CALLBACK_BASES
from costaware.ledger import Ledger, Totals
from costaware.meter import PRICE_HINT, CostMeter

if TYPE_CHECKING:
    import pytorch_lightning as pl


class CostMonitor(*CALLBACK_BASES):  # type: ignore[misc]  # a Callback of each installed Lightning namespace
    r"""Measure what a run spends: time, GPU-hours, energy, FLOPs, dollars and CO2.

    Meters are read by one background thread; the training hooks only read cached values and
    log at the Trainer's ``log_every_n_steps`` into ``trainer.callback_metrics`` (so
    ``EarlyStopping`` and ``ModelCheckpoint`` can monitor ``cost/usd`` like any metric, and the
    progress bar shows dollars spent) and to the loggers, without ``pl_module.log`` (whose
    result-collection walk costs hundreds of microseconds a call). Under DDP each rank meters its
    own GPU, local rank 0 meters its node's host, and totals are summed across ranks at log
    intervals only. Rank zero appends everything to
    ``<trainer.log_dir>/costaware/ledger.jsonl``. Totals survive a resume from a checkpoint.
    A ``trainer.test``, ``validate`` or ``predict`` after the fit is metered apart and added to the
    fit's ledger and report (:mod:`costaware.after_fit`); the totals stay the fit's. In a process that
    ran no fit (LightningCLI's ``test --ckpt_path=...``), it goes to the run that saved the checkpoint.
    The metering itself is a :class:`~costaware.meter.CostMeter` (:attr:`meter`), which
    ``BudgetCap`` and ``MarginalGainStopping`` read when the Trainer has a CostMonitor.

    Monitorable and logged (``cost/usd`` also in the progress bar): ``cost/usd``,
    ``cost/kwh``, ``cost/co2_kg``, ``cost/gpu_hours``, ``cost/flops``, ``cost/elapsed_s``, ``throughput/batches_per_s``,
    ``throughput/flops_per_s``, and where measured ``throughput/mfu_pct``, ``gpu/power_w``,
    ``gpu/utilization_pct``, ``gpu/memory_used_gib``, ``host/cpu_power_w``. A meter that cannot
    read is left out, never shown as zero. With no price at all (no GPU price, no
    ``usd_per_host_hour``, no energy price) dollars are not priced: a warning says so once.

    The default TQDM progress bar shows ``cost/usd`` with three significant digits (``0.00123``);
    ``RichProgressBar`` formats metrics with ``.3f`` unless given
    ``theme=RichProgressBarTheme(metrics_format=".3g")``.

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
        self.meter = CostMeter(
            gpu=gpu, usd_per_gpu_hour=usd_per_gpu_hour, usd_per_host_hour=usd_per_host_hour, usd_per_kwh=usd_per_kwh,
            pue=pue, mode=mode, country=country, region=region, cloud_provider=cloud_provider,
            cloud_region=cloud_region, g_co2_per_kwh=g_co2_per_kwh, sample_interval_s=sample_interval_s,
            flush_interval_s=flush_interval_s, flops_measure_batches=flops_measure_batches, cpu_tdp_w=cpu_tdp_w,
            ram_power_w=ram_power_w, nvml_index=nvml_index, ledger_dir=ledger_dir)
        self._warned_unpriced = False
        self._fitting = True  # whether a checkpoint Lightning restores now is a fit's (see load_state_dict)

    # What the meter holds, for the user (read-only views).

    @property
    def totals(self) -> Totals:
        return self.meter.totals

    @property
    def ledger(self) -> Optional[Ledger]:
        return self.meter.ledger

    @property
    def prices(self) -> Any:
        return self.meter.prices

    @property
    def readings(self) -> dict:
        return self.meter.readings

    @property
    def report_paths(self) -> dict:
        return self.meter.report_paths

    def current_totals(self) -> Totals:
        return self.meter.current_totals()

    def refresh(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Totals:
        return self.meter.refresh(trainer, pl_module)

    # ----------------------------------------------------------------------------------------
    # Lightning hooks
    # ----------------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._fitting = stage == "fit"
        if stage != "fit":
            self.meter.begin_stage(trainer, stage)  # a test, validate or predict after a fit, charged to it
            return
        self.meter.start(trainer)
        if not self.meter.dollars_priced() and not self._warned_unpriced:
            self._warned_unpriced = True
            rank_zero_warn(f"costaware: no price applies, so CostMonitor reports dollars as $0 (energy, time and "
                           f"CO2 are still measured): {PRICE_HINT}", category=RuntimeWarning)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not internals.restores_after_fit_start(trainer):
            self.meter.open_ledger(trainer)

    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.meter.open_ledger(trainer)  # (once per fit) a strategy that restores late has restored by now

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.meter.begin_batch(pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.meter.count_batch(trainer, pl_module)
        if internals.should_log(trainer):  # Lightning's own LR and device monitors ask this
            self.meter.log(trainer, pl_module, on_step=True)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.meter.end_epoch()
        self.meter.log(trainer, pl_module, on_step=False)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.meter.open_ledger(trainer)
        self.meter.phase_start("training")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.meter.phase_end("training")

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "validate":  # trainer.validate, not a fit's validation
            self.meter.begin_stage_from_checkpoint(trainer, "validate")
        self.meter.phase_start("validation")

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.meter.begin_stage_from_checkpoint(trainer, "test")  # LightningCLI's `test --ckpt_path` after `fit`

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.meter.begin_stage_from_checkpoint(trainer, "predict")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.meter.record_validation(trainer, pl_module)
        self.meter.phase_end("validation")

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self.meter.phase_start("checkpointing")  # ends at the next hook: the file is written after this one

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The ledger stays open until teardown: callbacks later in the list (the marginal-gain
        # policy's strategies) still record their results in their own on_fit_end.
        self.meter.open_ledger(trainer)  # (a resume that had nothing left to train started no training)
        self.meter.end_fit(trainer, pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.meter.fail(trainer, exception)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.meter.teardown(trainer)
        else:
            self.meter.end_stage(trainer)
            self.meter.stop()

    def state_dict(self) -> dict:
        return self.meter.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        """Continue the checkpointed run's totals, on a resumed fit only: Lightning (2.6) restores callback
        state for ``trainer.test(ckpt_path=...)`` and ``validate`` too, and a fit after those is a new run."""
        if self._fitting:
            self.meter.load_state_dict(state_dict)
