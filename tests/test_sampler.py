"""The sampler thread: a last reading and the meters' shutdown at the end, never a hang."""

import threading
import time
import types
import warnings

import pytest

from costaware.meters import HostMeter, Sampler, open_gpu
from fake_nvml import FakeClock


class FakeMeter:
    """Records its samples and closes; ``sample`` blocks while ``hold`` is an unset event."""

    def __init__(self, hold=None, armed=True):
        self.hold = hold
        self.armed = armed
        self.entered = threading.Event()
        self.samples = []
        self.closes = 0

    def sample(self, now_s):
        if self.armed and self.hold is not None and not self.hold.is_set():
            self.entered.set()
            self.hold.wait()
        self.samples.append(now_s)

    def close(self):
        self.closes += 1


def test_stop_takes_a_last_sample_then_closes_every_meter_once():
    clock = FakeClock()
    meters = [FakeMeter(), FakeMeter()]
    sampler = Sampler(meters, interval_s=0.01, clock=clock)
    sampler.start()
    clock.advance(5.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sampler.stop() is True
        counts = [len(m.samples) for m in meters]
        assert sampler.stop() is True  # idempotent: no second sample, no second close
    assert not sampler._thread.is_alive()
    assert [len(m.samples) for m in meters] == counts
    assert all(m.samples[-1] == clock() and m.closes == 1 for m in meters)


def test_stop_before_start_still_reads_and_closes():
    meter = FakeMeter()
    assert Sampler([meter], clock=FakeClock()).stop() is True
    assert len(meter.samples) == 1 and meter.closes == 1


def test_a_hung_meter_never_hangs_the_end_of_training():
    release = threading.Event()
    hung, other = FakeMeter(hold=release), FakeMeter()
    sampler = Sampler([hung, other], interval_s=0.01, clock=FakeClock(), join_timeout_s=0.2)
    sampler.start()
    try:
        assert hung.entered.wait(5.0)
        t0 = time.monotonic()
        with pytest.warns(RuntimeWarning, match="FakeMeter did not answer") as record:
            assert sampler.stop() is False
            assert sampler.stop() is False  # warned once
        assert time.monotonic() - t0 < 2.0
        assert len(record) == 1
        # Neither a last sample (it would wait on the hung call) nor a shutdown under it.
        assert hung.samples == [] and other.samples == [] and hung.closes == other.closes == 0
    finally:
        release.set()
    sampler._thread.join(5.0)
    assert not sampler._thread.is_alive()  # the stuck call returned: the thread ends on its own


def test_a_meter_hanging_at_the_last_sample_never_hangs_the_end_of_training():
    release = threading.Event()
    meter = FakeMeter(hold=release, armed=False)
    sampler = Sampler([meter], interval_s=60.0, clock=FakeClock(), join_timeout_s=0.2)
    sampler.start()
    try:
        deadline = time.monotonic() + 10.0
        while not meter.samples:  # the thread's first reading
            assert time.monotonic() < deadline, "the sampler thread never took its first reading"
            time.sleep(0.01)
        meter.armed = True  # the driver hangs from now on
        t0 = time.monotonic()
        with pytest.warns(RuntimeWarning, match="FakeMeter did not answer"):
            assert sampler.stop() is False
        assert time.monotonic() - t0 < 2.0
        assert meter.entered.is_set() and meter.closes == 0
    finally:
        release.set()
    sampler._thread.join(5.0)
    assert len(meter.samples) == 2 and meter.closes == 0


def test_nvml_is_not_shut_down_under_a_hung_query(clock, install_nvml):
    nvml = install_nvml()
    gpu = nvml.gpus[0]
    meter = open_gpu(None, clock(), nvml_index=0)
    meter.close_timeout_s = 0.05
    clock.advance(3.0)
    gpu.hold = threading.Event()
    sampler = Sampler([meter], interval_s=0.01, clock=clock, join_timeout_s=0.2)
    sampler.start()
    try:
        assert gpu.held.wait(5.0)
        with pytest.warns(RuntimeWarning, match="GPUMeter did not answer"):
            assert sampler.stop() is False
        meter.close()  # what CostMonitor does after stopping the sampler: must not wait, nor shut down
        assert nvml.initialised == 1 and nvml.shutdowns_during_a_query == 0
        assert meter.latest.energy_j == 0.0  # the readings taken so far stand
    finally:
        gpu.hold.set()
    sampler._thread.join(5.0)
    assert meter.latest.energy_j == pytest.approx(2100.0)
    meter.close()
    assert nvml.initialised == 0 and nvml.shutdowns_during_a_query == 0


class _FakeCodecarbonCPU:
    def measure_power_and_energy(self, last_duration):
        return types.SimpleNamespace(W=10.0), types.SimpleNamespace(kWh=10.0 * last_duration / 3.6e6)


def test_sampler_closes_the_host_meter_and_it_stays_closed(clock, install_nvml, monkeypatch):
    from costaware import _codecarbon

    nvml = install_nvml()
    opened = []

    def fake_open_cpu(out_dir, tdp_w):
        opened.append(1)
        return _FakeCodecarbonCPU(), "fake"

    monkeypatch.setattr(_codecarbon, "open_cpu", fake_open_cpu)  # the meter's detection thread opens it
    monkeypatch.setattr(_codecarbon, "open_ram",
                        lambda power_w: types.SimpleNamespace(total_power=lambda: types.SimpleNamespace(W=3.0)))
    host = HostMeter(clock(), cpu_tdp_w=10, ram_power_w=3)
    assert host._opened.wait(10)
    gpu = open_gpu(None, clock(), nvml_index=0)
    sampler = Sampler([gpu, host], interval_s=60.0, clock=clock)
    sampler.start()
    clock.advance(10.0)
    assert sampler.stop() is True
    assert nvml.initialised == 0  # GPU closed by the sampler
    assert host.latest.cpu_energy_j == pytest.approx(100.0) and host.latest.ram_energy_j == pytest.approx(30.0)
    clock.advance(10.0)
    assert host.sample(clock()).cpu_energy_j == pytest.approx(100.0)  # closed: totals kept, nothing re-opened
    assert len(opened) == 1
    gpu.close()  # CostMonitor closes the GPU again: harmless
    assert nvml.initialised == 0
