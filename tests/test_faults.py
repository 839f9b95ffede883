"""The fault sweep's kinds of fault, kept as tests (issue 14): a crashed rank's totals, garbage
ledgers, an unwritable log dir, NVML errors at every hook, and the ledger's own thread and size."""

import itertools
import json
import random
import sys
import threading
import warnings

import pytest

from conftest import make_clocked_model, make_monitor, make_trainer
from costaware import cli
from costaware.ledger import RECENT_S, Ledger, LedgerError, Totals, read_ledger, thin_sample_lines
from costaware.records import RecordedTotals, Sample
from costaware.report import build_report

_LEDGER_IO: list = []  # (thread name, path) of every open of a file the audit hook watches
_WATCHED: set = set()


def _audit(event, args):
    if event == "open" and _WATCHED and args and str(args[0]) in _WATCHED:
        _LEDGER_IO.append((threading.current_thread().name, str(args[0])))


sys.addaudithook(_audit)


_monitor = make_monitor


def _trainer(ns, tmp_path, callbacks, **kwargs):
    return make_trainer(ns, tmp_path, callbacks, **{"logger": False, "enable_checkpointing": False, **kwargs})


# ------------------------------------------------------------------------------------------------
# Issue 14.4: a crashed rank never writes totals below those already recorded
# ------------------------------------------------------------------------------------------------


def test_a_crash_ends_with_totals_no_lower_than_any_recorded(pl_ns, tmp_path, clock):
    """As a DDP rank that crashes between log intervals: the summed totals a log recorded
    (here larger than this rank's own, field by field) are what the end record keeps."""
    ns = pl_ns
    monitor = _monitor(ns, clock, ledger_dir=str(tmp_path / "ledger"))
    summed = Totals(elapsed_s=1e3, gpu_hours=3.37, host_hours=0.5, gpu_energy_j=5e4, cpu_energy_j=10.0,
                    ram_energy_j=3.0, flops=1e12, usd=9.0, co2_kg=0.1, train_batches=60.0)

    class Crashes(ns.BoringModel):
        def training_step(self, batch, batch_idx):
            clock.advance(1.0)
            if batch_idx == 3:  # the run-wide totals a log interval summed, as rank 0 recorded them
                monitor.meter.ledger.record(Sample(totals=RecordedTotals.of(summed)))
            if batch_idx == 6:
                raise RuntimeError("rank 1 died")
            return super().training_step(batch, batch_idx)

    trainer = _trainer(ns, tmp_path, [monitor])
    with pytest.raises(RuntimeError, match="rank 1 died"):
        trainer.fit(Crashes())
    end = read_ledger(tmp_path / "ledger").end
    assert end.how == "crashed"
    mine = monitor.totals
    for name in Totals.__dataclass_fields__:
        assert getattr(end.totals, name) >= getattr(summed, name), name
        assert getattr(end.totals, name) >= getattr(mine, name) * (1 - 1e-12) - 1e-12, name
    assert end.totals.elapsed_s >= 6.0 and end.totals.train_batches >= 60.0  # this rank's time, the sums' batches


# ------------------------------------------------------------------------------------------------
# The ledger writes from its own thread, and stays bounded
# ------------------------------------------------------------------------------------------------


def test_no_ledger_write_on_the_training_thread(pl_ns, tmp_path, clock):
    """Every open of the ledger during the fit is the writer thread's; only closing writes elsewhere."""
    ns = pl_ns
    path = tmp_path / "ledger" / "ledger.jsonl"
    _WATCHED.add(str(path))
    _LEDGER_IO.clear()
    opens_in_fit: list = []

    class Watch(ns.pl.Callback):
        def on_train_end(self, trainer, pl_module):
            opens_in_fit.extend(_LEDGER_IO)

    monitor = _monitor(ns, clock, ledger_dir=str(path.parent), flush_interval_s=0.0)
    trainer = _trainer(ns, tmp_path, [monitor, Watch()], max_steps=20, log_every_n_steps=1)
    try:
        trainer.fit(make_clocked_model(ns.BoringModel, clock))
    finally:
        _WATCHED.discard(str(path))
    assert opens_in_fit and {name for name, _ in opens_in_fit} == {"costaware-ledger"}
    contents = read_ledger(path)
    assert contents.end is not None and len(contents.metrics) == 4 and contents.samples


def test_the_meter_records_no_sample_closer_than_its_sampling_interval(pl_ns, tmp_path, clock):
    monitor = _monitor(pl_ns, clock, ledger_dir=str(tmp_path / "ledger"), sample_interval_s=2.5)
    trainer = _trainer(pl_ns, tmp_path, [monitor], max_steps=20, log_every_n_steps=1, limit_val_batches=0)
    trainer.fit(make_clocked_model(pl_ns.BoringModel, clock, step_s=1.0))
    times = [s.totals.elapsed_s for s in read_ledger(tmp_path / "ledger").samples]
    assert len(times) >= 6 and min(b - a for a, b in itertools.pairwise(times)) >= 2.5 - 1e-9


def _sample_line(wall_s: float, usd: float) -> bytes:
    totals = {"elapsed_s": wall_s, "usd": usd}
    return (json.dumps({"kind": "sample", "wall_time_s": wall_s, "totals": totals, "readings": {}}) + "\n").encode()


def test_thinning_keeps_recent_samples_whole_older_ones_bounded_and_every_other_line():
    step_s, days = 0.5, 30
    n = int(days * 86400 / step_s)
    t0 = 1.7e9
    other = [b'{"kind": "header"}\n', b'{"kind": "event", "name": "x"}\n']
    stride = 64  # a 30-day file at 0.5 s is 5M lines; every 64th keeps the test fast and the tiers full
    lines = other[:1] + [_sample_line(t0 + i * step_s, i * 1e-3) for i in range(0, n, stride)] + other[1:]
    kept = thin_sample_lines(lines)
    samples = [json.loads(line) for line in kept if line.startswith(b'{"kind": "sample"')]
    assert kept[0] == other[0] and kept[-1] == other[1]
    assert samples[-1]["totals"]["usd"] == pytest.approx((n - 1) // stride * stride * 1e-3)  # the last one kept
    now = samples[-1]["wall_time_s"]
    recent = [s for s in samples if now - s["wall_time_s"] <= RECENT_S]
    assert len(recent) == int(RECENT_S / (step_s * stride)) + 1  # the last hour whole
    assert len(samples) < 12_000  # ~1000 per doubling of age past the hour
    again = thin_sample_lines(kept)  # thinning is stable: what it kept once, it keeps
    assert again == kept


def test_a_long_run_ledger_is_compacted_and_its_totals_stay_exact(tmp_path):
    path = tmp_path / "ledger.jsonl"
    wall = [1.7e9]
    ledger = Ledger(path, background=True, flush_interval_s=0.01, compact_every=500)
    ledger.record(__import__("costaware.records", fromlist=["Header"]).Header())
    for i in range(3000):
        wall[0] += 10.0  # 10 s apart: 8.3 hours
        ledger.record(Sample(wall_time_s=wall[0], totals=RecordedTotals.of(Totals(usd=i * 0.01, elapsed_s=i))))
    ledger.record(__import__("costaware.records", fromlist=["End"]).End(
        totals=RecordedTotals.of(Totals(usd=29.99, elapsed_s=2999)), how="completed"))
    contents = read_ledger(path)
    assert not contents.problems and contents.header is not None and contents.end.totals.usd == 29.99
    assert 360 < len(contents.samples) < 3000  # the last hour whole (360), older ones thinned
    assert contents.samples[-1].totals.usd == pytest.approx(29.99)


def test_a_huge_ledger_is_read_thinned_with_its_last_sample_and_bad_lines_found(tmp_path):
    path = tmp_path / "ledger.jsonl"
    lines = [b'{"kind": "header", "schema": 2, "run_id": "r"}\n']
    lines += [_sample_line(1.7e9 + i, i * 0.01) for i in range(5000)]
    lines[2000] = lines[2000][:-10] + b"\n"  # torn mid-file
    path.write_bytes(b"".join(lines))
    contents = read_ledger(path, max_samples=300)
    assert contents.sample_count == 5000 and len(contents.samples) <= 600
    assert contents.samples[-1].totals.usd == pytest.approx(49.99)
    assert contents.problems == ["ledger.jsonl:2001: corrupt line, skipped"]


# ------------------------------------------------------------------------------------------------
# Garbage ledgers: never a crash
# ------------------------------------------------------------------------------------------------


def _mutations(data: bytes, rng: random.Random):
    yield rng.randbytes(rng.randint(1, 3000))
    for _ in range(30):
        b = bytearray(data)
        how = rng.randrange(5)
        if how == 0:  # flip bytes
            for _ in range(rng.randint(1, 20)):
                b[rng.randrange(len(b))] = rng.randrange(256)
        elif how == 1:  # cut anywhere
            b = b[:rng.randrange(len(b))]
        elif how == 2:  # splice random bytes in
            at = rng.randrange(len(b))
            b[at:at] = rng.randbytes(rng.randint(1, 200))
        elif how == 3:  # a key's values made hostile
            text = b.decode("utf-8", errors="replace")
            hostile = rng.choice(['"usd": -', '"usd": "x", "_": ', '"usd": [[[[', '"usd": 1e999, "_": '])
            text = text.replace('"usd": ', hostile, rng.randint(1, 5))
            b = bytearray(text.encode())
        else:  # hostile values
            b += rng.choice([b'{"kind": "sample", "totals": ' + b"[" * 100_000 + b"\n",
                             b'{"kind": "metric", "value": ' + b"9" * 5000 + b"}\n",
                             b'{"kind": "end", "totals": null, "how": 7}\n', b"\xff\xfe\x00\n"])
        yield bytes(b)


def test_garbage_ledgers_never_crash_the_reader_the_report_or_the_cli(pl_ns, tmp_path, clock, capsys):
    monitor = _monitor(pl_ns, clock, ledger_dir=str(tmp_path / "real"))
    _trainer(pl_ns, tmp_path, [monitor]).fit(make_clocked_model(pl_ns.BoringModel, clock))
    data = (tmp_path / "real" / "ledger.jsonl").read_bytes()
    rng = random.Random(14)
    for i, garbage in enumerate(_mutations(data, rng)):
        folder = tmp_path / f"g{i}"
        folder.mkdir()
        (folder / "ledger.jsonl").write_bytes(garbage)
        for lenient in (False, True):
            try:
                read_ledger(folder, lenient=lenient)
            except LedgerError:
                pass
        try:
            report = build_report(folder)
            assert isinstance(report["problems"], list)
        except LedgerError:
            pass
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert cli.main(["report", str(folder)]) in (0, 1, 2)
    capsys.readouterr()


# ------------------------------------------------------------------------------------------------
# An unwritable log dir, NVML errors at each hook: the fit goes on
# ------------------------------------------------------------------------------------------------


def test_an_unwritable_log_dir_never_breaks_the_fit(pl_ns, tmp_path, clock):
    """Root ignores file modes, so the log dir sits under a regular file: no mkdir can succeed."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monitor = _monitor(pl_ns, clock, ledger_dir=str(blocker / "costaware"))
    trainer = _trainer(pl_ns, tmp_path, [monitor])
    with pytest.warns(RuntimeWarning, match="could not write"):
        trainer.fit(make_clocked_model(pl_ns.BoringModel, clock))
    assert trainer.global_step == 10 and monitor.totals.usd > 0


HOOKS = ("on_fit_start", "on_train_start", "on_train_batch_start", "on_train_batch_end", "on_validation_start",
         "on_validation_end", "on_train_epoch_end", "on_save_checkpoint", "on_train_end", "on_fit_end")


@pytest.mark.parametrize("kind", ["transient", "lost"])
@pytest.mark.parametrize("hook", HOOKS)
def test_an_nvml_fault_at_each_hook_never_breaks_the_fit(pl_ns, tmp_path, clock, install_nvml, hook, kind):
    """From that hook on, every NVML query fails (``transient``: an unknown error, retried with
    backoff; ``lost``: the GPU is gone): the fit ends with all three callbacks at work, the ledger
    closes, and a lost GPU is reported as a degraded meter."""
    nvml = install_nvml()
    gpu = nvml.gpus[0]
    ns = pl_ns

    class Fault(ns.pl.Callback):
        pass

    def fail(*args, **kwargs):
        if kind == "transient":
            gpu.failures.update({q: 10**9 for q in ("energy", "power", "utilization", "memory", "name")})
        else:
            gpu.lost_after_s = clock()
        sampler = monitor.meter._sampler
        if sampler is not None:
            sampler.sample_now()  # the fault reaches the meter at this hook, not at the next tick

    setattr(Fault, hook, fail)
    monitor = ns.costaware.CostMonitor(nvml_index=0, cpu_tdp_w=10, ram_power_w=3, country="FRA",
                                       ledger_dir=str(tmp_path / "ledger"))
    monitor.meter.clock = clock
    cap = ns.costaware.BudgetCap(max_usd=1e6)
    policy = ns.costaware.MarginalGainStopping(monitor="val_loss", mode="min", usd_per_point=1.0)
    checkpoint = ns.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=5)
    trainer = _trainer(ns, tmp_path, [Fault(), monitor, cap, policy, checkpoint], enable_checkpointing=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(make_clocked_model(ns.BoringModel, clock))
    assert trainer.global_step == 10
    contents = read_ledger(tmp_path / "ledger")
    assert contents.end is not None and contents.end.how == "completed" and contents.end.totals.usd > 0
    if kind == "lost" and hook not in ("on_train_end", "on_fit_end"):
        assert monitor.meter.meter_status()["gpu"]["status"] != "ok"


def test_host_energy_counts_from_the_start_while_codecarbon_detects_the_cpu(clock, monkeypatch):
    """Detection held back (as a slow TDP lookup would): samples meanwhile count a provisional
    power; once it ends, the span is priced at the measured power, never below what was counted."""
    from costaware import _codecarbon
    from costaware.meters.host import HostMeter

    release = threading.Event()
    real_open = _codecarbon.open_cpu

    def slow_open(*args):
        release.wait(10)
        return real_open(*args)

    monkeypatch.setattr(_codecarbon, "open_cpu", slow_open)
    start = clock()
    host = HostMeter(start, cpu_tdp_w=10, ram_power_w=3)
    readings, ram = [], []
    for _ in range(4):  # 2 s of detection
        clock.advance(0.5)
        sample = host.sample(clock())
        readings.append(sample.cpu_energy_j)
        ram.append(sample.ram_energy_j)
    assert readings == pytest.approx([2.5, 5.0, 7.5, 10.0])  # half the given 10 W TDP, from the start
    assert ram == pytest.approx([1.5, 3.0, 4.5, 6.0])  # the given 3 W RAM counts at once: no jump later
    release.set()
    assert host._opened.wait(10)
    clock.advance(0.5)
    sample = host.sample(clock())
    assert sample.cpu_energy_j >= 10.0 and sample.ram_energy_j == pytest.approx(3.0 * 2.5)  # RAM from the start
    host.close()
