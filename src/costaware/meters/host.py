"""The host's CPU and RAM energy, from codecarbon's estimators in offline mode.

RAPL counters where they are readable, else codecarbon's TDP-times-load model for the CPU and
its memory-size model for RAM. Only one rank per node opens a real ``HostMeter``, so a node's
host is counted once; GPU energy is never taken from codecarbon (the GPU meter owns it).
"""

from __future__ import annotations

import tempfile
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Optional

from costaware import _codecarbon


@dataclass(frozen=True)
class HostSample:
    """Cumulative host energy since the meter opened.

    Attributes:
        time_s: when it was read, on the sampler's clock, seconds.
        cpu_energy_j: CPU package energy, joules.
        ram_energy_j: memory energy, joules.
        cpu_power_w: latest CPU power estimate, watts.
    """

    time_s: float
    cpu_energy_j: float = 0.0
    ram_energy_j: float = 0.0
    cpu_power_w: Optional[float] = None


class EmptyHost:
    """Null meter: another rank of this node counts the host, or the host cannot be read."""

    present = False
    method = "not metered on this rank"

    def __init__(self, reason: str = "host counted by local rank 0") -> None:
        self.status = reason
        self.degraded = False
        self.latest = HostSample(time_s=0.0)

    def sample(self, now_s: float) -> HostSample:
        return self.latest

    def close(self) -> None:
        pass


class HostMeter:
    """CPU and RAM energy of this node through codecarbon's hardware classes.

    codecarbon's CPU detection takes a second or two (it reads a table of TDPs), so it runs on
    the first ``sample`` call, in the sampler thread, not in ``setup``; energy still counts
    from ``start_s``.
    """

    present = True
    close_timeout_s = 1.0  # how long ``close`` waits for a sample still inside codecarbon

    def __init__(self, start_s: float, cpu_tdp_w: Optional[float] = None, ram_power_w: Optional[float] = None):
        self._lock = threading.Lock()
        self._cpu_tdp_w = cpu_tdp_w
        self._ram_power_w = ram_power_w
        self._cpu: Any = None  # codecarbon's CPU and RAM, imported when the first sample is taken
        self._ram: Any = None
        self._closed = False
        self.status = "ok"
        self.degraded = False
        self.method = "not opened yet"
        self._cpu_j = 0.0
        self._ram_j = 0.0
        self._last_s = start_s
        self.latest = HostSample(time_s=start_s)

    def _open(self) -> None:
        self._cpu, self.method = _codecarbon.open_cpu(tempfile.gettempdir(), self._cpu_tdp_w)
        self._ram = _codecarbon.open_ram(self._ram_power_w)

    def sample(self, now_s: float) -> HostSample:
        """Add the energy used since the last sample; called from the sampler thread."""
        with self._lock:
            if self.degraded or self._closed:
                return self.latest
            try:
                if self._cpu is None:
                    self._open()
                dt_s = now_s - self._last_s
                if dt_s <= 0.0:
                    return self.latest  # nothing elapsed, or a reading older than the last one
                self._last_s = now_s
                cpu_power_w, cpu_j = _codecarbon.cpu_power_and_energy(self._cpu, dt_s)
                self._cpu_j += cpu_j
                self._ram_j += _codecarbon.ram_power_w(self._ram) * dt_s
            except Exception as err:  # noqa: BLE001 - measuring must never break training
                # status first: a thread that sees ``degraded`` must never read status "ok"
                self.status = f"degraded: host energy read failed ({err}); totals so far kept"
                self.degraded = True
                warnings.warn(f"costaware: host meter {self.status}", RuntimeWarning, stacklevel=2)
                return self.latest
            self.latest = HostSample(now_s, self._cpu_j, self._ram_j, cpu_power_w)
            return self.latest

    def close(self) -> None:
        """Stop metering: later samples return the last totals, codecarbon is let go.

        Waits at most ``close_timeout_s`` for a sample in progress (a stuck codecarbon call
        must not hang the end of training); the sampler closes its meters when it stops.
        """
        if not self._lock.acquire(timeout=self.close_timeout_s):
            return
        try:
            self._closed = True
            self._cpu = self._ram = None  # codecarbon's CPU and RAM hold no thread or process to stop
        finally:
            self._lock.release()


def open_host(start_s: float, counts_host: bool, cpu_tdp_w: Optional[float] = None,
              ram_power_w: Optional[float] = None):
    """A ``HostMeter`` for the rank that counts this node's host, else an ``EmptyHost``."""
    if not counts_host:
        return EmptyHost()
    return HostMeter(start_s, cpu_tdp_w=cpu_tdp_w, ram_power_w=ram_power_w)
