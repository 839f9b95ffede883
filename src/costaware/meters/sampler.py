"""One background thread that reads the meters, so training hooks only read cached values."""

from __future__ import annotations

import threading
import time
import warnings
from typing import Callable, Optional, Sequence


class Sampler:
    """Calls ``meter.sample(now_s)`` on every meter every ``interval_s`` seconds.

    Errors inside a meter are the meter's business (it degrades itself); the thread itself never
    dies of one. On ``stop`` the thread takes a last sample so totals are current at the end,
    then the meters are closed (NVML shut down, codecarbon let go) -- unless a meter call hangs:
    the end of training never waits on a stuck driver for more than ``join_timeout_s``.
    """

    def __init__(self, meters: Sequence, interval_s: float = 0.5, clock: Callable[[], float] = time.monotonic,
                 join_timeout_s: float = 5.0):
        if interval_s <= 0:
            raise ValueError(f"sample_interval_s must be > 0, got {interval_s!r}")
        self.meters = list(meters)
        self.interval_s = interval_s
        self.clock = clock
        self.join_timeout_s = join_timeout_s
        self.stopped_cleanly: Optional[bool] = None  # None until ``stop``
        self._stop = threading.Event()
        self._reading: Optional[object] = None  # the meter being read now, to name a hung one
        self._thread = threading.Thread(target=self._run, name="costaware-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def sample_now(self) -> None:
        now_s = self.clock()
        for meter in self.meters:
            self._reading = meter
            try:
                meter.sample(now_s)
            except Exception:  # noqa: BLE001 - a meter bug must not kill the sampler
                pass
        self._reading = None

    def stop(self) -> bool:
        """Stop the thread after its last sample, then close the meters; idempotent.

        The last sample is taken by the thread itself, so a meter call that hangs (a stuck NVML
        or codecarbon call), then or before, is waited on for ``join_timeout_s`` only: past that
        the meters are left open (never shut down under a call in progress), one warning says
        so, the readings taken so far stand, and training ends (the thread is a daemon).
        Returns whether the meters were closed.
        """
        if self.stopped_cleanly is not None:
            return self.stopped_cleanly
        self._stop.set()
        if self._thread.ident is None:  # never started: no thread to hang, read here
            self.sample_now()
        else:
            self._thread.join(timeout=self.join_timeout_s)
            if self._thread.is_alive():
                self.stopped_cleanly = False
                stuck = type(self._reading).__name__ if self._reading is not None else "a meter"
                warnings.warn(f"costaware: {stuck} did not answer within {self.join_timeout_s:g} s of the end; the "
                              f"last sample and the meters' shutdown are skipped, readings taken so far are kept",
                              RuntimeWarning, stacklevel=2)
                return False
        self.stopped_cleanly = True
        for meter in self.meters:
            try:
                meter.close()
            except Exception:  # noqa: BLE001 - closing must never raise into training
                pass
        return True

    def _run(self) -> None:
        self.sample_now()
        while not self._stop.wait(self.interval_s):
            self.sample_now()
        self.sample_now()  # the last reading, here: a hung meter then holds this thread, not stop()
