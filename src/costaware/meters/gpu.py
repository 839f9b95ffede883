"""One GPU read through NVML (``nvidia-ml-py``, imported as ``pynvml``).

``pynvml`` is the boundary the tests fake: this module imports it lazily, so a fake placed in
``sys.modules`` drives the same code as a real driver.
"""

from __future__ import annotations

import math
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Optional

FIELDS = ("energy", "power", "utilization", "memory")


@dataclass(frozen=True)
class GPUSample:
    """One reading of one GPU.

    Attributes:
        time_s: when it was read, on the sampler's clock, seconds.
        energy_j: energy used since the meter opened, joules; None if the GPU can tell neither
            energy nor power.
        power_w: instantaneous power draw, watts.
        utilization_pct: share of time a kernel was running, percent.
        memory_used_bytes: device memory in use, bytes.
    """

    time_s: float
    energy_j: Optional[float] = None
    power_w: Optional[float] = None
    utilization_pct: Optional[float] = None
    memory_used_bytes: Optional[float] = None


class EmptyGPU:
    """Null meter for a rank that trains on no GPU (or whose GPU cannot be read)."""

    present = False
    name: Optional[str] = None

    def __init__(self, reason: str = "no GPU on this rank") -> None:
        self.status = reason
        self.degraded = False
        self.latest = GPUSample(time_s=0.0)
        self.disabled_fields: tuple = FIELDS

    def sample(self, now_s: float) -> GPUSample:
        return self.latest

    def close(self) -> None:
        pass


class GPUMeter:
    """Energy, power, utilization and memory of one GPU.

    Energy comes from the driver's cumulative counter (``nvmlDeviceGetTotalEnergyConsumption``,
    Volta and newer) where the device has it, else from integrating power samples. A query the
    device does not support from the start (MIG slice, vGPU, old GPU) disables that field alone,
    silently. A query that fails mid-run is retried with backoff (``RETRY_BACKOFF_S``): while
    it is out, energy goes on from power samples and the counter, once back, covers the gap
    exactly. A field that keeps failing, a lost GPU, or a field that turns "not supported" after
    it worked marks the meter degraded (one warning, an event in the ledger) and keeps the last
    readings, so no recorded energy is lost: energy goes on from power, or stays at the total
    measured so far (never None once anything was measured).
    """

    present = True
    close_timeout_s = 1.0  # how long ``close`` waits for a sample still inside NVML
    RETRY_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0)  # waits before each retry of a failing query; then given up

    def __init__(self, nvml: Any, handle: Any, start_s: float, label: str) -> None:
        self._nvml = nvml
        self._handle = handle
        self._lock = threading.Lock()
        self._closed = False
        self.label = label
        self.status = "ok"
        self.degraded = False
        self.disabled_fields: tuple = ()
        self.transient_errors = 0  # failed queries that were retried
        self._worked: set = set()  # fields that answered at least once
        self._failures: dict = {}  # field -> consecutive failures
        self._retry_at_s: dict = {}  # field -> sampler time before which it is not asked again
        self._warned_transient = False
        self.name = _as_str(self._query(lambda: nvml.nvmlDeviceGetName(handle), "name", start_s)) or "unknown GPU"
        self._counter_start_mj: Optional[float] = None
        self._counter_energy_j = 0.0  # the counter's last reading since start
        self._counter_failed = False  # the counter worked, then was given up: energy goes on from power
        self._energy_j = 0.0
        self._energy_measured = False  # once True, ``energy_j`` is always reported, fault or not
        self._last_power_w: Optional[float] = None
        self._last_power_s = start_s
        self._last_time_s = start_s
        start_mj = self._query(lambda: nvml.nvmlDeviceGetTotalEnergyConsumption(handle), "energy", start_s)
        if start_mj is not None:
            self._counter_start_mj = float(start_mj)
            self._energy_measured = True
        self.latest = GPUSample(time_s=start_s, energy_j=0.0)
        self.sample(start_s)

    @property
    def energy_source(self) -> str:
        if self._counter_start_mj is not None:
            return "nvml energy counter"
        if self._energy_measured or "power" not in self.disabled_fields:
            if self._counter_failed:
                return "nvml energy counter, then integrated nvml power samples after a fault"
            return "integrated nvml power samples"
        return "unavailable"

    def sample(self, now_s: float) -> GPUSample:
        """Read every field still enabled; called from the sampler thread."""
        with self._lock:
            if self._closed or now_s < self._last_time_s:
                return self.latest  # NVML shut down, or a reading older than the last one
            nvml, handle = self._nvml, self._handle
            power_mw = self._query(lambda: nvml.nvmlDeviceGetPowerUsage(handle), "power", now_s)
            power_w = None if power_mw is None else float(power_mw) / 1000.0
            if not self._read_counter(now_s):
                self._integrate_power(power_w, now_s)
            util = self._query(lambda: nvml.nvmlDeviceGetUtilizationRates(handle), "utilization", now_s)
            mem = self._query(lambda: nvml.nvmlDeviceGetMemoryInfo(handle), "memory", now_s)
            if power_w is not None:
                self._last_power_w, self._last_power_s = power_w, now_s
            self._last_time_s = now_s
            self.latest = GPUSample(
                time_s=now_s,
                energy_j=self._energy_j if self._energy_measured else None,
                power_w=power_w if power_w is not None else self.latest.power_w,
                utilization_pct=float(util.gpu) if util is not None else self.latest.utilization_pct,
                memory_used_bytes=float(mem.used) if mem is not None else self.latest.memory_used_bytes,
            )
            return self.latest

    def _read_counter(self, now_s: float) -> bool:
        """Energy from the driver's counter; False when it gave no reading this time."""
        if self._counter_start_mj is None:
            return False
        nvml, handle = self._nvml, self._handle
        total_mj = self._query(lambda: nvml.nvmlDeviceGetTotalEnergyConsumption(handle), "energy", now_s)
        if total_mj is not None:
            energy_j = (float(total_mj) - self._counter_start_mj) / 1000.0
            if energy_j >= self._counter_energy_j:
                self._counter_energy_j = energy_j
                self._energy_j = max(self._energy_j, energy_j)  # never backwards after a bridged gap
                return True
            # The counter went back (driver or GPU reset): trust it no more.
            self._degrade("NVML energy counter went backwards; energy continues from integrated power")
            self.disabled_fields = (*self.disabled_fields, "energy")
        if "energy" in self.disabled_fields:  # given up: keep what it counted, integrate power from here
            self._counter_start_mj = None
            self._counter_failed = True
        return False

    def _integrate_power(self, power_w: Optional[float], now_s: float) -> None:
        """Trapezoid from the last power reading (a retried gap included) to this one."""
        if power_w is None:
            return
        self._energy_measured = True
        if self._last_power_w is not None:
            self._energy_j += 0.5 * (power_w + self._last_power_w) * (now_s - self._last_power_s)

    def close(self) -> None:
        """Shut NVML down once; later samples return the last readings.

        Waits at most ``close_timeout_s`` for a sample in progress: a sampler thread stuck
        inside NVML keeps NVML open rather than have it shut down under the call (or hang the
        end of training).
        """
        if not self._lock.acquire(timeout=self.close_timeout_s):
            return
        try:
            if self._closed:
                return
            self._closed = True
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001 - shutting down must never raise into training
                pass
        finally:
            self._lock.release()

    def _query(self, read, field: str, now_s: float):
        if field in self.disabled_fields or now_s < self._retry_at_s.get(field, -math.inf):
            return None
        try:
            value = read()
        except Exception as err:  # noqa: BLE001 - any NVML failure must not reach training
            self._query_failed(field, err, now_s)
            return None
        self._worked.add(field)
        self._failures.pop(field, None)
        self._retry_at_s.pop(field, None)
        return value

    def _query_failed(self, field: str, err: Exception, now_s: float) -> None:
        """Disable, or retry later: a device that never had the field is not a fault."""
        if _is_not_supported(self._nvml, err):
            if field in self._worked:
                self._degrade(f"NVML {field} query became unsupported mid-run ({err})")
            self.disabled_fields = (*self.disabled_fields, field)
            return
        failures = self._failures.get(field, 0) + 1
        self._failures[field] = failures
        if _is_gpu_lost(self._nvml, err) or failures > len(self.RETRY_BACKOFF_S):
            self._degrade(f"NVML {field} query failed mid-run ({err})")
            self.disabled_fields = (*self.disabled_fields, field)
            return
        self.transient_errors += 1
        self._retry_at_s[field] = now_s + self.RETRY_BACKOFF_S[failures - 1]
        if not self._warned_transient:
            self._warned_transient = True
            warnings.warn(f"costaware: NVML {field} query failed ({err}); retrying with backoff, energy meanwhile "
                          "from power samples", RuntimeWarning, stacklevel=4)

    def _degrade(self, reason: str) -> None:
        if self.degraded:
            return
        # status first: a thread that sees ``degraded`` must never read status "ok"
        self.status = f"degraded: {reason}; last readings kept"
        self.degraded = True
        warnings.warn(f"costaware: GPU meter {self.status}", RuntimeWarning, stacklevel=3)


def open_gpu(cuda_index: Optional[int], start_s: float, nvml_index: Optional[int] = None):
    """Open the GPU this rank trains on, or return an ``EmptyGPU`` that says why not.

    Args:
        cuda_index: the torch CUDA device index of this rank (respects ``CUDA_VISIBLE_DEVICES``);
            None when the rank does not train on a GPU.
        start_s: the sampler clock's time at which energy starts counting.
        nvml_index: an NVML device index to meter instead (bypasses the CUDA mapping).
    """
    if cuda_index is None and nvml_index is None:
        return EmptyGPU()
    try:
        import pynvml as nvml
    except ImportError:
        return _empty("nvidia-ml-py (pynvml) is not installed")
    try:
        nvml.nvmlInit()
    except Exception as err:  # noqa: BLE001 - no driver, no library, no permission
        return _empty(f"NVML could not start ({err})")
    try:
        if nvml_index is not None:
            handle, label = nvml.nvmlDeviceGetHandleByIndex(nvml_index), f"nvml:{nvml_index}"
        else:
            assert cuda_index is not None  # (neither index: EmptyGPU above)
            handle, label = _handle_for_cuda_index(nvml, cuda_index)
        return GPUMeter(nvml, handle, start_s, label)
    except Exception as err:  # noqa: BLE001
        try:
            nvml.nvmlShutdown()  # balance the nvmlInit above: no meter will ever close it
        except Exception:  # noqa: BLE001
            pass
        return _empty(f"NVML could not open the device ({err})")


def _handle_for_cuda_index(nvml: Any, cuda_index: int):
    """Map a torch CUDA index to an NVML handle: by UUID first, else via CUDA_VISIBLE_DEVICES.

    NVML numbers devices by PCI bus, CUDA by speed unless ``CUDA_DEVICE_ORDER=PCI_BUS_ID``, and
    ``CUDA_VISIBLE_DEVICES`` renumbers them; the device UUID is the only name both agree on.
    """
    uuid = _torch_uuid(cuda_index)
    if uuid is not None:
        try:
            return nvml.nvmlDeviceGetHandleByUUID(uuid), uuid
        except Exception:  # noqa: BLE001 - fall back on the environment mapping
            pass
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if not visible:
        return nvml.nvmlDeviceGetHandleByIndex(cuda_index), f"nvml:{cuda_index}"
    entry = visible[cuda_index]
    if entry.isdigit():
        return nvml.nvmlDeviceGetHandleByIndex(int(entry)), f"nvml:{entry}"
    return nvml.nvmlDeviceGetHandleByUUID(entry), entry


def _torch_uuid(cuda_index: int) -> Optional[str]:
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        uuid = getattr(torch.cuda.get_device_properties(cuda_index), "uuid", None)
        return None if uuid is None else f"GPU-{uuid}"
    except Exception:  # noqa: BLE001
        return None


def _is_not_supported(nvml: Any, err: Exception) -> bool:
    not_supported = getattr(nvml, "NVMLError_NotSupported", None)
    if not_supported is not None and isinstance(err, not_supported):
        return True
    return getattr(err, "value", None) == getattr(nvml, "NVML_ERROR_NOT_SUPPORTED", 3)


def _is_gpu_lost(nvml: Any, err: Exception) -> bool:
    return getattr(err, "value", None) == getattr(nvml, "NVML_ERROR_GPU_IS_LOST", 15)


def _as_str(value) -> Optional[str]:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value


def _empty(reason: str) -> EmptyGPU:
    warnings.warn(f"costaware: GPU not metered: {reason}; training goes on", RuntimeWarning, stacklevel=3)
    gpu = EmptyGPU(reason)
    gpu.degraded = True
    return gpu
