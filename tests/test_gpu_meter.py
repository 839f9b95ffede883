"""GPU metering through a fake NVML (any machine) and through real NVML (``-m gpu``)."""

import sys
import threading
import time
import warnings

import pytest

from conftest import logged_to_tensorboard, make_clocked_model
from costaware.ledger import read_ledger
from costaware.meters.gpu import EmptyGPU, GPUMeter, _handle_for_cuda_index, open_gpu
from fake_nvml import FakeGPU, FakeNVML


def _fit(ns, tmp_path, clock, steps=10, extra_callbacks=(), **monitor_kwargs):
    monitor = ns.costaware.CostMonitor(nvml_index=0, cpu_tdp_w=10, ram_power_w=3, **monitor_kwargs)
    monitor.meter.clock = clock
    trainer = ns.Trainer(default_root_dir=tmp_path, max_steps=steps, log_every_n_steps=2,
                         callbacks=[monitor, *extra_callbacks],
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(make_clocked_model(ns.BoringModel, clock, step_s=1.0))
    return monitor, trainer


def test_h100_energy_counter_prices_and_logs(ns, tmp_path, clock, fake_nvml):
    monitor, trainer = _fit(ns, tmp_path, clock, steps=10)
    t = monitor.totals
    # 10 steps of 1 s on the fake clock at 700 W, read from the driver's energy counter.
    assert t.elapsed_s == pytest.approx(10.0)
    assert t.gpu_energy_j == pytest.approx(7000.0)
    assert t.gpu_hours == pytest.approx(10.0 / 3600)
    assert monitor.prices.gpu_model == "H100-SXM"
    assert t.usd == pytest.approx(10.0 / 3600 * 2.99)
    assert monitor.readings["gpu/power_w"] == pytest.approx(700.0)
    assert monitor.readings["gpu/utilization_pct"] == pytest.approx(87.0)
    assert monitor.readings["gpu/memory_used_gib"] == pytest.approx(40.0)
    assert monitor.readings["throughput/mfu_pct"] > 0  # an H100's fp32 peak is known
    assert "gpu/power_w" in trainer.logged_metrics or logged_to_tensorboard(tmp_path, "gpu/power_w")
    ledger = read_ledger(monitor.ledger.path)
    assert ledger.header["meters"]["gpu"]["energy_source"] == "nvml energy counter"
    assert ledger.end["totals"]["gpu_energy_j"] == pytest.approx(7000.0)


def test_gpu_without_energy_counter_integrates_power(ns, tmp_path, clock, install_nvml):
    install_nvml([FakeGPU(name="Tesla T4", power_w=70.0, unsupported=("energy",))])
    monitor, _ = _fit(ns, tmp_path, clock, steps=8)
    assert monitor.totals.gpu_energy_j == pytest.approx(70.0 * 8)
    assert monitor.prices.gpu_model == "T4"
    assert read_ledger(monitor.ledger.path).header["meters"]["gpu"]["energy_source"] == "integrated nvml power samples"


def test_unsupported_query_disables_only_that_field(clock, install_nvml):
    # A MIG slice: no energy, no utilization; power and memory still read.
    nvml = install_nvml([FakeGPU(unsupported=("energy", "utilization"))])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an unsupported field is not a fault: no warning
        meter = open_gpu(None, clock(), nvml_index=0)
    clock.advance(2.0)
    sample = meter.sample(clock())
    assert isinstance(meter, GPUMeter) and not meter.degraded
    assert set(meter.disabled_fields) == {"energy", "utilization"}
    assert sample.power_w == 700.0 and sample.memory_used_bytes == 40 * 2**30 and sample.utilization_pct is None
    assert sample.energy_j == pytest.approx(1400.0)
    assert nvml.gpus[0].queries.count("utilization") == 1  # asked once, then never again


def test_nvml_lost_mid_run_keeps_training_and_energy(ns, tmp_path, clock, install_nvml):
    install_nvml([FakeGPU(lost_after_s=clock() + 4.5)])
    with pytest.warns(RuntimeWarning, match="GPU meter degraded"):
        monitor, trainer = _fit(ns, tmp_path, clock, steps=10)
    assert trainer.global_step == 10
    t = monitor.totals
    assert 0 <= t.gpu_energy_j <= 700.0 * 4.5
    assert t.gpu_hours == pytest.approx(10.0 / 3600)  # the rental goes on being counted
    events = [e["name"] for e in read_ledger(monitor.ledger.path).events]
    assert "meter_degraded" in events


def test_meter_keeps_energy_read_before_the_gpu_was_lost(clock, install_nvml):
    install_nvml([FakeGPU(lost_after_s=clock() + 4.5)])
    meter = open_gpu(None, clock(), nvml_index=0)
    clock.advance(4.0)
    assert meter.sample(clock()).energy_j == pytest.approx(2800.0)
    clock.advance(2.0)
    with pytest.warns(RuntimeWarning, match="degraded"):
        sample = meter.sample(clock())
    assert meter.degraded and sample.energy_j == pytest.approx(2800.0) and sample.power_w == 700.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        meter.sample(clock())


def test_transient_counter_fault_is_retried_and_the_counter_covers_the_gap(clock, install_nvml):
    nvml = install_nvml()
    gpu = nvml.gpus[0]
    meter = open_gpu(None, clock(), nvml_index=0)
    clock.advance(4.0)
    assert meter.sample(clock()).energy_j == pytest.approx(2800.0)  # from the counter
    gpu.failures["energy"] = 1  # one transient error
    clock.advance(2.0)
    with pytest.warns(RuntimeWarning, match="retrying with backoff"):
        sample = meter.sample(clock())
    assert sample.energy_j == pytest.approx(2800.0 + 700.0 * 2)  # bridged from power samples
    assert not meter.degraded and meter.status == "ok" and meter.transient_errors == 1
    gpu.counter_offset_mj += 1_000_000  # 1 kJ drawn between power samples, which the counter saw
    clock.advance(2.0)
    # Retried after the first backoff: the counter is back, and exact over the gap.
    assert meter.sample(clock()).energy_j == pytest.approx(700.0 * 8 + 1000.0)
    assert meter.energy_source == "nvml energy counter"


def test_counter_that_keeps_failing_is_given_up_for_power(clock, install_nvml):
    nvml = install_nvml()
    gpu = nvml.gpus[0]
    meter = open_gpu(None, clock(), nvml_index=0)
    clock.advance(4.0)
    meter.sample(clock())
    gpu.failures["energy"] = 1000
    with pytest.warns(RuntimeWarning, match="GPU meter degraded: NVML energy query failed"):
        for _ in range(40):  # 1 + 2 + 4 + 8 + 16 s of backoff, then given up
            clock.advance(1.0)
            meter.sample(clock())
    assert meter.degraded and "energy" in meter.disabled_fields
    assert meter.energy_source == "nvml energy counter, then integrated nvml power samples after a fault"
    assert meter.latest.energy_j == pytest.approx(700.0 * 44.0)  # nothing lost: the gaps came from power
    assert gpu.queries.count("energy") == 3 + 1 + len(GPUMeter.RETRY_BACKOFF_S)  # 3 read, 1 failed, 5 retried


def test_query_that_turns_unsupported_mid_run_is_a_fault(clock, install_nvml):
    gpu = FakeGPU(name="Tesla T4", power_w=70.0, unsupported=("energy",))
    install_nvml([gpu])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # unsupported from the start: expected, silent
        meter = open_gpu(None, clock(), nvml_index=0)
    clock.advance(2.0)
    meter.sample(clock())
    gpu.unsupported = ("energy", "power")  # a vGPU migration, a driver change
    clock.advance(2.0)
    with pytest.warns(RuntimeWarning, match="power query became unsupported mid-run"):
        meter.sample(clock())
    assert meter.degraded and meter.status.startswith("degraded") and meter.latest.energy_j == pytest.approx(140.0)


def test_counter_going_backwards_keeps_the_energy_counted(clock, install_nvml):
    nvml = install_nvml()
    meter = open_gpu(None, clock(), nvml_index=0)
    clock.advance(4.0)
    meter.sample(clock())
    nvml.gpus[0].counter_offset_mj -= 50_000_000  # a driver reset restarts the counter
    clock.advance(2.0)
    with pytest.warns(RuntimeWarning, match="counter went backwards"):
        assert meter.sample(clock()).energy_j == pytest.approx(4200.0)
    assert meter.sample(clock() - 1.0).energy_j == pytest.approx(4200.0)  # an older reading changes nothing


def test_transient_power_fault_is_bridged_when_power_is_back(clock, install_nvml):
    gpu = FakeGPU(name="Tesla T4", power_w=70.0, unsupported=("energy",))
    install_nvml([gpu])
    meter = open_gpu(None, clock(), nvml_index=0)
    clock.advance(4.0)
    assert meter.sample(clock()).energy_j == pytest.approx(280.0)
    gpu.failures["power"] = 1
    clock.advance(2.0)
    with pytest.warns(RuntimeWarning, match="retrying with backoff"):
        assert meter.sample(clock()).energy_j == pytest.approx(280.0)  # kept while power is out
    clock.advance(2.0)
    assert meter.sample(clock()).energy_j == pytest.approx(70.0 * 8.0)  # the gap integrated once back
    assert not meter.degraded and meter.energy_source == "integrated nvml power samples"


def test_lost_power_keeps_the_integrated_energy(clock, install_nvml):
    gpu = FakeGPU(name="Tesla T4", power_w=70.0, unsupported=("energy",))
    install_nvml([gpu])
    meter = open_gpu(None, clock(), nvml_index=0)
    clock.advance(4.0)
    assert meter.sample(clock()).energy_j == pytest.approx(280.0)
    gpu.lost_after_s = clock()
    clock.advance(2.0)
    with pytest.warns(RuntimeWarning, match="GPU meter degraded"):
        sample = meter.sample(clock())
    clock.advance(2.0)
    later = meter.sample(clock())
    # Never None (which the monitor reads as 0 J): what was measured stays counted.
    assert sample.energy_j == pytest.approx(280.0) and later.energy_j == pytest.approx(280.0)
    assert meter.energy_source == "integrated nvml power samples"


@pytest.mark.parametrize("source", ["counter", "power"])
def test_gpu_lost_mid_fit_keeps_its_kwh(ns, tmp_path, clock, install_nvml, source):
    install_nvml([FakeGPU(lost_after_s=clock() + 4.5, unsupported=() if source == "counter" else ("energy",))])

    class SampleEveryStep(ns.pl.Callback):  # deterministic readings on the fake clock
        def on_train_batch_end(self, trainer, *args):
            monitor = next(c for c in trainer.callbacks if isinstance(c, ns.costaware.CostMonitor))
            monitor.meter._sampler.sample_now()

    with pytest.warns(RuntimeWarning, match="GPU meter degraded"):
        monitor, trainer = _fit(ns, tmp_path, clock, steps=8, extra_callbacks=[SampleEveryStep()])
    assert trainer.global_step == 8
    # Read at 1 s .. 4 s on the fake clock at 700 W, lost at 4.5 s: 2800 J stay counted.
    assert monitor.totals.gpu_energy_j == pytest.approx(2800.0)
    assert monitor.totals.kwh >= 2800.0 / 3.6e6
    assert read_ledger(monitor.ledger.path).end["totals"]["gpu_energy_j"] == pytest.approx(2800.0)


@pytest.mark.parametrize("fault", ["transient", "unsupported"])
def test_power_fault_mid_fit(ns, tmp_path, clock, install_nvml, fault):
    # No energy counter (a T4): energy is integrated from power, which fails once at step 3.
    gpu = FakeGPU(name="Tesla T4", power_w=70.0, unsupported=("energy",))
    install_nvml([gpu])

    class FaultAtStep3(ns.pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 3:
                if fault == "transient":
                    gpu.failures["power"] = 1
                else:
                    gpu.unsupported = ("energy", "power")

    match = "retrying with backoff" if fault == "transient" else "became unsupported mid-run"
    with pytest.warns(RuntimeWarning, match=match):
        monitor, _trainer = _fit(ns, tmp_path, clock, steps=10, extra_callbacks=[FaultAtStep3()],
                                sample_interval_s=0.001)
    contents = read_ledger(monitor.ledger.path)
    if fault == "transient":  # retried, and the gap bridged: 10 s at 70 W, nothing lost
        assert monitor.totals.gpu_energy_j == pytest.approx(700.0)
        assert contents.end["meters"]["gpu"]["status"] == "ok"
    else:  # said, in a warning, the ledger and the meter status; energy measured so far kept
        assert 0 < monitor.totals.gpu_energy_j <= 70.0 * 4
        assert "meter_degraded" in [e["name"] for e in contents.events]
        assert contents.end["meters"]["gpu"]["status"].startswith("degraded")


def test_degraded_is_never_seen_with_status_ok(clock, monkeypatch):
    from costaware.meters.host import HostMeter

    seen = []

    def watch(cls):
        class Watched(cls):
            def __setattr__(self, name, value):
                if name == "degraded" and value:
                    seen.append(self.status)  # what another thread could read at this moment
                super().__setattr__(name, value)
        return Watched

    nvml = FakeNVML([FakeGPU(lost_after_s=clock() + 1.0)], clock)
    gpu = watch(GPUMeter)(nvml, nvml.gpus[0], clock(), "nvml:0")
    from costaware import _codecarbon

    def broken_open(*args):
        raise RuntimeError("codecarbon broke")

    monkeypatch.setattr(_codecarbon, "open_cpu", broken_open)  # the detection thread opens at construction
    host = watch(HostMeter)(clock(), cpu_tdp_w=10, ram_power_w=3)
    assert host._opened.wait(10)
    clock.advance(2.0)
    with pytest.warns(RuntimeWarning, match="degraded"):
        gpu.sample(clock())
        host.sample(clock())
    assert len(seen) == 2 and all(status.startswith("degraded") for status in seen)


def test_device_lookup_failure_shuts_nvml_down(clock, install_nvml):
    nvml = install_nvml()
    with pytest.warns(RuntimeWarning, match="GPU not metered"):
        meter = open_gpu(None, clock(), nvml_index=3)
    assert isinstance(meter, EmptyGPU) and nvml.initialised == 0


def test_close_shuts_nvml_down_once_and_later_samples_keep_readings(clock, install_nvml):
    nvml = install_nvml()
    meter = open_gpu(None, clock(), nvml_index=0)
    clock.advance(2.0)
    meter.sample(clock())
    meter.close()
    meter.close()
    assert nvml.initialised == 0
    queries = len(nvml.gpus[0].queries)
    clock.advance(2.0)
    assert meter.sample(clock()).energy_j == pytest.approx(1400.0)
    assert len(nvml.gpus[0].queries) == queries  # no NVML call after shutdown


def test_close_never_shuts_nvml_down_under_a_hung_query(clock, install_nvml):
    nvml = install_nvml()
    gpu = nvml.gpus[0]
    meter = open_gpu(None, clock(), nvml_index=0)
    meter.close_timeout_s = 0.05
    gpu.hold = threading.Event()
    reader = threading.Thread(target=meter.sample, args=(clock(),), daemon=True)
    reader.start()
    try:
        assert gpu.held.wait(5.0)
        t0 = time.monotonic()
        meter.close()
        assert time.monotonic() - t0 < 2.0
        assert nvml.initialised == 1 and nvml.shutdowns_during_a_query == 0
    finally:
        gpu.hold.set()
        reader.join(5.0)
    meter.close()  # the query returned: now it shuts down
    assert nvml.initialised == 0 and nvml.shutdowns_during_a_query == 0


@pytest.mark.parametrize("failure", ["no_library", "no_permission", "not_installed"])
def test_no_usable_nvml_warns_once_and_trains(ns, tmp_path, clock, monkeypatch, failure):
    import pynvml as real

    if failure == "not_installed":
        monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    else:
        code = real.NVML_ERROR_LIBRARY_NOT_FOUND if failure == "no_library" else real.NVML_ERROR_NO_PERMISSION
        monkeypatch.setitem(sys.modules, "pynvml", FakeNVML([FakeGPU()], clock, init_error=code))
    with pytest.warns(RuntimeWarning, match="GPU not metered") as record:
        monitor, trainer = _fit(ns, tmp_path, clock, steps=4, usd_per_gpu_hour=2.0)
    assert len([w for w in record if "GPU not metered" in str(w.message)]) == 1
    assert trainer.global_step == 4
    assert monitor.totals.gpu_energy_j == 0.0
    assert monitor.totals.usd == pytest.approx(4.0 / 3600 * 2.0)  # GPU-hours still priced
    meters = read_ledger(monitor.ledger.path).header["meters"]["gpu"]
    assert meters["present"] is False and meters["status"] != "ok"
    assert "gpu/power_w" not in monitor.readings  # missing, never shown as zero
    assert not logged_to_tensorboard(tmp_path, "gpu/power_w")


def test_cuda_visible_devices_maps_to_nvml(clock, monkeypatch):
    gpus = [FakeGPU(uuid=f"GPU-{i}") for i in range(4)]
    nvml = FakeNVML(gpus, clock)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert _handle_for_cuda_index(nvml, 1)[0] is gpus[3]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-1,GPU-0")
    assert _handle_for_cuda_index(nvml, 0)[0] is gpus[1]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert _handle_for_cuda_index(nvml, 2)[0] is gpus[2]


def test_cpu_rank_gets_the_null_meter():
    assert isinstance(open_gpu(None, 0.0), EmptyGPU)


@pytest.mark.gpu
def test_real_nvml_energy_counter_moves():
    import time

    import torch

    meter = open_gpu(0, time.monotonic())
    assert meter.present, meter.status
    x = torch.randn(8192, 8192, device="cuda")
    t0 = time.monotonic()
    while time.monotonic() - t0 < 3.0:
        x = x @ x
        x = x / x.norm()
    torch.cuda.synchronize()
    sample = meter.sample(time.monotonic())
    assert sample.energy_j > 10.0 and sample.power_w > 0 and sample.utilization_pct is not None


@pytest.mark.gpu
def test_real_gpu_fit(pl_ns, tmp_path):
    monitor = pl_ns.costaware.CostMonitor(usd_per_gpu_hour=2.0)
    trainer = pl_ns.Trainer(default_root_dir=tmp_path, max_steps=200, accelerator="gpu", devices=1,
                            callbacks=[monitor], enable_progress_bar=False, log_every_n_steps=10)
    trainer.fit(pl_ns.BoringModel())
    assert monitor.totals.gpu_energy_j > 0
    assert "gpu/power_w" in trainer.callback_metrics
