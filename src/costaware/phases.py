"""Where a run's time and dollars went: training, validation, checkpointing, probe.

A :class:`PhaseClock` charges the meter's totals to the phase open at each moment. Phases nest
(a probe inside a validation, a checkpoint save inside training): the innermost open phase is
charged, so the phases never count the same second twice and their sum is at most the run's
total; what no phase covered (setup, the sanity check's start-up, teardown) is the report's
"other". Strategies after the fit (distill, quantize) are read from their ledger events.
"""

from __future__ import annotations

from typing import Any, Callable

#: The phases the clock measures, in the order a report shows them.
PHASES = ("training", "validation", "checkpointing", "probe")
#: The figures charged to a phase (fields of :class:`costaware.ledger.Totals`, plus ``kwh``).
PHASE_FIGURES = ("elapsed_s", "usd", "kwh", "co2_kg")


class PhaseClock:
    """Exclusive time and cost per phase, from a ``now()`` that returns the run's totals.

    ``start(name)`` opens a phase inside whatever is open; ``end(name)`` closes it (and any phase
    opened inside it and left open). Ending a phase that is not open does nothing, so a hook that
    runs without its partner (a fit resumed mid-epoch) never breaks the count.
    """

    def __init__(self, now: Callable[[], Any]) -> None:
        self._now = now
        self._open: list[str] = []
        self._charged: list[dict[str, float]] = []  # per open phase, what it was charged since it opened
        self._mark: dict = {}
        self.spent: dict[str, dict[str, float]] = {name: dict.fromkeys(PHASE_FIGURES, 0.0) for name in PHASES}

    @property
    def current(self) -> str | None:
        return self._open[-1] if self._open else None

    def start(self, name: str) -> None:
        now = self._figures()
        self._charge(now)
        self._open.append(name)
        self._charged.append(dict.fromkeys(PHASE_FIGURES, 0.0))

    def end(self, name: str) -> None:
        if name not in self._open:
            return
        self._charge(self._figures())
        while self._open:
            self._charged.pop()
            if self._open.pop() == name:
                break

    def relabel(self, old: str, new: str) -> None:
        """The phase open now, if it is ``old``, was ``new`` from its start: what it was charged moves over.

        Lightning's tuners within a fit (``BatchSizeFinder``, ``LearningRateFinder``) save a checkpoint, run their
        trial steps with every callback removed, and restore it: only the restore tells that the "save" was a
        tuning."""
        if self.current != old:
            return
        self._charge(self._figures())
        since_open = self._charged[-1]
        into = self.spent.setdefault(new, dict.fromkeys(PHASE_FIGURES, 0.0))
        for key in PHASE_FIGURES:
            self.spent[old][key] -= since_open[key]
            into[key] += since_open[key]
        self._open[-1] = new

    def snapshot(self) -> dict[str, dict[str, float]]:
        """The phases' figures up to now (the open phase charged up to this moment)."""
        if self._open:
            self._charge(self._figures())
        return {name: dict(figures) for name, figures in self.spent.items()}

    def _figures(self) -> dict:
        return phase_figures(self._now())

    def _charge(self, now: dict) -> None:
        if self._open:
            spent = self.spent.setdefault(self._open[-1], dict.fromkeys(PHASE_FIGURES, 0.0))
            for key in PHASE_FIGURES:
                charge = max(now[key] - self._mark.get(key, now[key]), 0.0)
                spent[key] += charge
                self._charged[-1][key] += charge
        self._mark = now


def phase_figures(totals: Any) -> dict[str, float]:
    """The :data:`PHASE_FIGURES` of a run's totals (a :class:`costaware.ledger.Totals`)."""
    return {"elapsed_s": totals.elapsed_s, "usd": totals.usd, "kwh": totals.kwh, "co2_kg": totals.co2_kg}
