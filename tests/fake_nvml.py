"""A fake ``pynvml`` module: simulated GPUs at the boundary costaware reads NVML through.

Installed in ``sys.modules["pynvml"]``, it drives the same code as a real driver. Its error
classes are the real ones from ``nvidia-ml-py``, so error handling is exercised as in production.
"""

from __future__ import annotations

import threading
import types
from dataclasses import dataclass, field
from typing import Callable, Optional

import pynvml as real


@dataclass
class FakeGPU:
    """A simulated device drawing constant ``power_w``; time comes from ``clock``.

    ``unsupported`` lists NVML queries this device answers NOT_SUPPORTED (MIG, vGPU, old GPUs);
    ``lost_after_s`` makes every query fail with GPU_IS_LOST from that time on; ``failures``
    maps a query to how many of its next calls fail with NVML_ERROR_UNKNOWN (a transient fault).
    While ``hold`` is an unset event every query waits on it (a hung driver call), after setting
    ``held``.
    """

    name: str = "NVIDIA H100 80GB HBM3"
    power_w: float = 700.0
    utilization_pct: int = 87
    memory_used_bytes: int = 40 * 2**30
    uuid: str = "GPU-00000000-0000-0000-0000-000000000000"
    unsupported: tuple = ()
    lost_after_s: Optional[float] = None
    counter_offset_mj: float = 123_456_789.0
    queries: list = field(default_factory=list)
    failures: dict = field(default_factory=dict)
    hold: Optional[threading.Event] = None
    held: threading.Event = field(default_factory=threading.Event)
    in_query: int = 0


class FakeNVML(types.ModuleType):
    def __init__(self, gpus: list, clock: Callable[[], float], init_error: Optional[int] = None):
        super().__init__("pynvml")
        self.gpus = gpus
        self.clock = clock
        self.init_error = init_error
        self.initialised = 0
        self.shutdowns_during_a_query = 0
        for name in dir(real):
            if name.startswith(("NVMLError", "NVML_ERROR")) or name == "NVMLError":
                setattr(self, name, getattr(real, name))

    # --- library -------------------------------------------------------------------------
    def nvmlInit(self):
        if self.init_error is not None:
            raise real.NVMLError(self.init_error)
        self.initialised += 1

    def nvmlShutdown(self):
        if any(gpu.in_query for gpu in self.gpus):
            self.shutdowns_during_a_query += 1
        self.initialised -= 1

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index):
        if not 0 <= index < len(self.gpus):
            raise real.NVMLError(real.NVML_ERROR_INVALID_ARGUMENT)
        return self.gpus[index]

    def nvmlDeviceGetHandleByUUID(self, uuid):
        uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
        for gpu in self.gpus:
            if gpu.uuid == uuid:
                return gpu
        raise real.NVMLError(real.NVML_ERROR_NOT_FOUND)

    # --- queries -------------------------------------------------------------------------
    def _check(self, gpu: FakeGPU, query: str):
        gpu.queries.append(query)
        if gpu.hold is not None and not gpu.hold.is_set():
            gpu.in_query += 1
            gpu.held.set()
            gpu.hold.wait()
            gpu.in_query -= 1
        if gpu.failures.get(query):
            gpu.failures[query] -= 1
            raise real.NVMLError(real.NVML_ERROR_UNKNOWN)
        if gpu.lost_after_s is not None and self.clock() >= gpu.lost_after_s:
            raise real.NVMLError(real.NVML_ERROR_GPU_IS_LOST)
        if query in gpu.unsupported:
            raise real.NVMLError(real.NVML_ERROR_NOT_SUPPORTED)

    def nvmlDeviceGetName(self, gpu):
        self._check(gpu, "name")
        return gpu.name

    def nvmlDeviceGetTotalEnergyConsumption(self, gpu):
        self._check(gpu, "energy")
        return int(gpu.counter_offset_mj + gpu.power_w * self.clock() * 1000.0)

    def nvmlDeviceGetPowerUsage(self, gpu):
        self._check(gpu, "power")
        return int(gpu.power_w * 1000)

    def nvmlDeviceGetUtilizationRates(self, gpu):
        self._check(gpu, "utilization")
        return types.SimpleNamespace(gpu=gpu.utilization_pct, memory=30)

    def nvmlDeviceGetMemoryInfo(self, gpu):
        self._check(gpu, "memory")
        return types.SimpleNamespace(used=gpu.memory_used_bytes, total=80 * 2**30, free=0)


class FakeClock:
    """A clock that moves only when told to: deterministic costs in tests."""

    def __init__(self, start_s: float = 1000.0):
        self.now_s = start_s

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds
