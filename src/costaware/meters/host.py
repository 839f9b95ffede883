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

    codecarbon's import and CPU detection take a second or two (it reads a table of TDPs), so
    they run in a thread of their own started when the meter opens (in ``setup``), never on the
    training thread. Energy counts from ``start_s`` all the same: until detection ends, each
    sample integrates a provisional ``PROVISIONAL_CPU_W`` (half the given ``cpu_tdp_w``, else
    half codecarbon's 85 W fallback TDP) and the RAM's power (given, or codecarbon's model, opened
    first as it is quick); when it ends, that span is priced again at the first measured CPU and
    RAM power, keeping the larger of the two so totals never go backwards. RAM counting at once
    means the batch on which detection ends is not charged the whole span's RAM energy (a jump
    that would skew a cap's per-batch forecast).
    """

    present = True
    close_timeout_s = 1.0  # how long ``close`` waits for a sample still inside codecarbon
    #: CPU watts counted while codecarbon detects the CPU (its fallback TDP, 85 W, at half load).
    PROVISIONAL_CPU_W = 42.5

    def __init__(self, start_s: float, cpu_tdp_w: Optional[float] = None, ram_power_w: Optional[float] = None):
        self._lock = threading.Lock()
        self._cpu_tdp_w = cpu_tdp_w
        self._ram_power_w = ram_power_w
        self._cpu: Any = None  # codecarbon's CPU and RAM, opened by the detection thread
        self._ram: Any = None
        self._closed = False
        self.status = "ok"
        self.degraded = False
        self._provisional_w = cpu_tdp_w / 2 if cpu_tdp_w is not None else self.PROVISIONAL_CPU_W
        self.method = f"provisional: {self._provisional_w:g} W while codecarbon detects the CPU"
        self._cpu_j = 0.0
        self._ram_j = 0.0
        self._start_s = self._last_s = start_s
        self._provisional_ram_w = ram_power_w or 0.0
        self._repriced = False  # the detection span priced again at measured power
        self._opened = threading.Event()
        self._open_error: Optional[BaseException] = None
        self.latest = HostSample(time_s=start_s)
        threading.Thread(target=self._open, name="costaware-host-detect", daemon=True).start()

    def _open(self) -> None:
        try:
            self._ram = _codecarbon.open_ram(self._ram_power_w)  # quick: counted while the CPU is detected
            cpu, method = _codecarbon.open_cpu(tempfile.gettempdir(), self._cpu_tdp_w)
            self._cpu, self.method = cpu, method
        except Exception as err:  # noqa: BLE001 - reported by the next sample, in the sampler thread
            self._open_error = err
        finally:
            self._opened.set()

    def sample(self, now_s: float) -> HostSample:
        """Add the energy used since the last sample; called from the sampler thread."""
        with self._lock:
            if self.degraded or self._closed:
                return self.latest
            try:
                dt_s = now_s - self._last_s
                if dt_s <= 0.0:
                    return self.latest  # nothing elapsed, or a reading older than the last one
                self._last_s = now_s
                if not self._opened.is_set():  # still detecting: the provisional estimate
                    self._cpu_j += self._provisional_w * dt_s
                    ram = self._ram
                    self._ram_j += (_codecarbon.ram_power_w(ram) if ram is not None else self._provisional_ram_w) * dt_s
                    self.latest = HostSample(now_s, self._cpu_j, self._ram_j, None)
                    return self.latest
                if self._open_error is not None:
                    raise self._open_error
                cpu_power_w, cpu_j = _codecarbon.cpu_power_and_energy(self._cpu, dt_s)
                ram_w = _codecarbon.ram_power_w(self._ram)
                if not self._repriced:  # the span before this sample, priced at the power measured now
                    self._repriced = True
                    span_s = now_s - dt_s - self._start_s
                    self._cpu_j = max(self._cpu_j, cpu_power_w * span_s)
                    self._ram_j = max(self._ram_j, ram_w * span_s)
                self._cpu_j += cpu_j
                self._ram_j += ram_w * dt_s
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
