"""The report's per-phase breakdown: tuning, training, validation, checkpointing, probe, other, and after the fit.

The metered phases come from the end record (``End.phases``, measured by the run's meter, see
:mod:`costaware.phases`); a ledger without them (older, or killed) falls back to the
``online_probe`` events for the probe and leaves the rest in "other". Strategies after the fit
(``distill``, ``quantize``) are outside the metered totals: the student's own metered dollars,
and a quantization's seconds priced at the run's mean dollars per second; so are a ``trainer.test``,
``validate`` or ``predict`` after the fit (``stage_after_fit`` events: one row per stage). "tuning" is what Lightning's
Tuner spent on trial steps just before the fit (see ``CostMeter.teardown``), or its ``BatchSizeFinder`` and
``LearningRateFinder`` callbacks at the fit's start (``PhaseClock.relabel``).
"other" is what the totals hold that no phase covered (setup, teardown, earlier sessions of a resumed
run), so the metered phases plus "other" equal the totals exactly, and the total "with what ran after the fit" adds
those.
"""

from __future__ import annotations

from typing import Any, Optional

from costaware.phases import PHASES
from costaware.records import DistillEvent, End, OnlineProbeEvent, PhasesEvent, QuantizeEvent, StageAfterFitEvent


def phase_breakdown(end: Optional[End], events: list, totals: dict) -> dict:
    """``{"rows": [{phase, elapsed_s, usd, share_pct, basis}], "total_usd", "total_elapsed_s", "note"}``."""
    total_s, total_usd = _num(totals.get("elapsed_s")), _num(totals.get("usd"))
    recorded, basis = _recorded(end, events)
    rows = []
    for name in PHASES:
        figures = recorded.get(name) if recorded else None
        if isinstance(figures, dict):
            rows.append(_row(name, _num(figures.get("elapsed_s")), _num(figures.get("usd")), basis))
        elif name == "probe":
            probes = [e for e in events if isinstance(e, OnlineProbeEvent)]
            if probes:
                rows.append(_row(name, sum(_num(e.duration_s) for e in probes),
                                 sum(_num(e.cost_usd) for e in probes), "online_probe events"))
    for name, figures in (recorded or {}).items():  # beyond the clock's: "tuning" (Lightning's Tuner, before)
        if name not in PHASES and isinstance(figures, dict) and _num(figures.get("elapsed_s")) > 0:
            rows.insert(0, _row(name, _num(figures.get("elapsed_s")), _num(figures.get("usd")), basis))
    if recorded is None and not rows:
        note = "the ledger records no phases (written by an older costaware, or the run did not end cleanly)"
    else:
        note = ("phases are exclusive (a probe inside a validation counts once, as probe); other: setup, "
                "teardown and anything no phase covered" + ("" if recorded else "; only the probe was recorded"))
    covered_s, covered_usd = sum(r["elapsed_s"] for r in rows), sum(r["usd"] for r in rows)
    rows.append(_row("other", max(total_s - covered_s, 0.0), max(total_usd - covered_usd, 0.0),
                     "the totals less the phases above"))
    strategies = _strategies(events, total_usd / total_s if total_s > 0 else 0.0)
    after = ([strategies] if strategies is not None else []) + _stages_after_fit(events)
    rows += after
    grand_usd = total_usd + sum(r["usd"] for r in after)
    grand_s = total_s + sum(r["elapsed_s"] for r in after)
    for row in rows:
        row["share_pct"] = 100.0 * row["usd"] / grand_usd if grand_usd > 0 else None
    return {"rows": rows, "metered_usd": total_usd, "total_usd": grand_usd, "total_elapsed_s": grand_s,
            "note": note}


def _recorded(end: Optional[End], events: list) -> tuple[Optional[dict], str]:
    """The end record's phases, else the last ``phases`` event's (a run that did not end cleanly)."""
    if end is not None and isinstance(end.phases, dict):
        return end.phases, "metered"
    last = next((e for e in events[::-1] if isinstance(e, PhasesEvent) and isinstance(e.phases, dict)), None)
    return (last.phases, "metered, to the last validation") if last is not None else (None, "")


def _strategies(events: list, usd_per_s: float) -> Optional[dict]:
    """Distill's student (its own metered dollars) and quantizations (seconds at the run's $/s)."""
    distills = [e for e in events if isinstance(e, DistillEvent) and e.trained]
    quantizes = [e for e in events if isinstance(e, QuantizeEvent) and e.duration_s is not None]
    if not distills and not quantizes:
        return None
    seconds = sum(_num(e.duration_s) for e in distills) + sum(_num(e.duration_s) for e in quantizes)
    usd = sum(_num(e.student_usd) for e in distills) + usd_per_s * sum(_num(e.duration_s) for e in quantizes)
    parts = ([f"{len(distills)} distillation(s) at the student's metered cost"] if distills else []) \
        + ([f"{len(quantizes)} quantization(s) at the run's mean $/s"] if quantizes else [])
    return _row("strategies", seconds, usd, "after the fit, outside the metered totals: " + ", ".join(parts),
                after_fit=True)


def _stages_after_fit(events: list) -> list[dict]:
    """One row per stage (test, validate, predict) run after the fit, as metered apart at the fit's prices."""
    by_stage: dict[str, list] = {}
    for e in events:
        if isinstance(e, StageAfterFitEvent) and isinstance(e.stage, str):
            by_stage.setdefault(e.stage, []).append(e)
    return [_row(f"trainer.{stage}", sum(_num(e.duration_s) for e in runs), sum(_num(e.usd) for e in runs),
                 f"after the fit, outside the metered totals: {len(runs)} trainer.{stage}"
                 f"{' call' if len(runs) == 1 else ' calls'}, metered at the fit's prices", after_fit=True)
            for stage, runs in by_stage.items()]


def _row(phase: str, elapsed_s: float, usd: float, basis: str, after_fit: bool = False) -> dict:
    return {"phase": phase, "elapsed_s": elapsed_s, "usd": usd, "share_pct": None, "basis": basis,
            "after_fit": after_fit}


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value else 0.0
