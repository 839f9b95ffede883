import socket
import sys
import types
from pathlib import Path

import pytest

from costaware import _lightning
from fake_nvml import FakeClock, FakeGPU, FakeNVML


def _namespace(name: str) -> types.SimpleNamespace:
    pl = _lightning.load(name)
    costaware = __import__("costaware.lightning" if name == "lightning.pytorch" else "costaware", fromlist=["_"])
    from importlib import import_module

    demos = import_module(f"{name}.demos.boring_classes")
    return types.SimpleNamespace(name=name, pl=pl, Trainer=pl.Trainer, BoringModel=demos.BoringModel,
                                 callbacks=import_module(f"{name}.callbacks"), costaware=costaware)


@pytest.fixture(params=_lightning.NAMESPACES)
def ns(request):
    """Each test that takes ``ns`` runs under ``pytorch_lightning`` and ``lightning.pytorch``."""
    return _namespace(request.param)


@pytest.fixture
def pl_ns():
    return _namespace("pytorch_lightning")


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def install_nvml(monkeypatch, clock):
    """A function that installs a fake NVML with the given simulated GPUs (default: one H100)."""
    def install(gpus=None, **kwargs):
        nvml = FakeNVML(gpus if gpus is not None else [FakeGPU()], clock, **kwargs)
        monkeypatch.setitem(sys.modules, "pynvml", nvml)
        return nvml
    return install


@pytest.fixture
def fake_nvml(install_nvml):
    """Install a fake NVML with one simulated H100; returns the fake module."""
    return install_nvml()


@pytest.fixture
def one_torch_thread():
    """Tiny models: one thread is fastest, and far faster on a busy machine (no thread contention)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_network(monkeypatch):
    """Fail any attempt to open a network connection, and record it."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access blocked by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


def make_monitor(ns, clock=None, **kwargs):
    """A CostMonitor priced at $3.60/host-hour (a dollar a thousand seconds), fixed CPU and RAM power."""
    kwargs = {"usd_per_host_hour": 3.6, "cpu_tdp_w": 10, "ram_power_w": 3, "country": "FRA", **kwargs}
    monitor = ns.costaware.CostMonitor(**kwargs)
    if clock is not None:
        monitor.meter.clock = clock
    return monitor


def make_trainer(ns, tmp_path, callbacks, **kwargs):
    """A tiny, quiet Trainer: 10 steps, logs every 2, validates every 5."""
    kwargs = {"max_steps": 10, "log_every_n_steps": 2, "enable_progress_bar": False, "enable_model_summary": False,
              "limit_val_batches": 2, "val_check_interval": 5, "default_root_dir": tmp_path, **kwargs}
    return ns.Trainer(callbacks=callbacks, **kwargs)


def make_clocked_model(base, clock, step_s: float = 1.0):
    """A BoringModel whose every training step takes ``step_s`` on the fake clock; logs val_loss."""

    class Clocked(base):
        def training_step(self, batch, batch_idx):
            clock.advance(step_s)
            return super().training_step(batch, batch_idx)

        def validation_step(self, batch, batch_idx):
            out = super().validation_step(batch, batch_idx)
            self.log("val_loss", out["x"])
            return out

    return Clocked()


def make_crashing_model(base, clock, at_batch: int = 6):
    """A BoringModel that takes 1 s a step on the fake clock and raises at batch ``at_batch``."""

    class Crashes(base):
        def training_step(self, batch, batch_idx):
            clock.advance(1.0)
            if batch_idx == at_batch:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    return Crashes()


def preset_for(ns, text: str, tmp_path) -> Path:
    """Writes a preset's YAML, unchanged: its ``costaware.X`` class paths are valid under either namespace."""
    preset = Path(tmp_path) / "preset.yaml"
    preset.write_text(text)
    return preset


def logged_to_tensorboard(root, key: str) -> bool:
    """Whether the TensorBoard event files under ``root`` hold the scalar ``key``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for events in root.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        if key in accumulator.Tags().get("scalars", []):
            return True
    return False
