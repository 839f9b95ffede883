"""One background thread that reads the meters, so training hooks only read cached values."""

from __future__ import annotations

import threading
import time
from typing import Callable, Sequence


class Sampler:
    """Calls ``meter.sample(now_s)`` on every meter every ``interval_s`` seconds.

    Errors inside a meter are the meter's business (it degrades itself); the thread itself never
    dies of one, and ``stop`` takes a last sample so totals are current at the end.
    """

    def __init__(self, meters: Sequence, interval_s: float = 0.5, clock: Callable[[], float] = time.monotonic):
        if interval_s <= 0:
            raise ValueError(f"sample_interval_s must be > 0, got {interval_s!r}")
        self.meters = list(meters)
        self.interval_s = interval_s
        self.clock = clock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="costaware-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def sample_now(self) -> None:
        now_s = self.clock()
        for meter in self.meters:
            try:
                meter.sample(now_s)
            except Exception:  # noqa: BLE001 - a meter bug must not kill the sampler
                pass

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)
        self.sample_now()

    def _run(self) -> None:
        self.sample_now()
        while not self._stop.wait(self.interval_s):
            self.sample_now()
