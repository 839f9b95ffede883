"""A ledger file, turned into one plain report dict (what ``report.json`` holds).

The report is built from the ledger alone, so a run that crashed or was killed can be reported
after the fact. It never invents a figure: a meter that did not measure is said to be "not
measured" with its reason, never shown as zero, and whatever was wrong with the file (a truncated
last line, a corrupt line, a newer schema, a price that is not a number) is listed under
``problems``. Totals are copied from the ledger exactly (a total the ledger lacks is None, shown
as "not recorded"); only the time series kept for plotting are downsampled.

Example::

    from costaware.report import build_report

    report = build_report("lightning_logs/version_0")
    print(report["totals"]["usd"], report["problems"])
"""

from __future__ import annotations

import gc
import itertools
import json
import math
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Union

from costaware.ledger import LEDGER_FILENAME, LedgerContents, LedgerError, read_ledger
from costaware.records import (
    TOTAL_KEYS,
    BudgetCapHitEvent,
    BudgetCapsEvent,
    BudgetWarningEvent,
    DeployCandidateEvent,
    DeployRecommendationEvent,
    DistillEvent,
    DistillOrAnnotateEvent,
    End,
    Event,
    ExceptionEvent,
    ForecastEvent,
    Header,
    MarginalGainDecisionEvent,
    MarginalGainPolicyEvent,
    MeterDegradedEvent,
    OnlineProbeEvent,
    PhasesEvent,
    QuantizeEvent,
    RecordedTotals,
    ResumedEvent,
    StageAfterFitEvent,
    StrategyFailedEvent,
    StrategyResultEvent,
    to_dict,
)
from costaware.report.phases import phase_breakdown

#: Version of the layout of ``report.json``; bumped when a key changes meaning or goes away.
REPORT_SCHEMA_VERSION = 2  # 2: event fields renamed with ledger schema 2; phases, span keys

#: Most points kept per plotted series (the totals are never downsampled).
DEFAULT_MAX_POINTS = 600


#: Sample readings plotted over time, with their labels and units.
READINGS = {
    "gpu_power_w": ("GPU power", "W"),
    "host_cpu_power_w": ("host CPU power", "W"),
    "gpu_utilization_pct": ("GPU utilization", "%"),
    "throughput_mfu_pct": ("MFU", "%"),
    "throughput_batches_per_s": ("throughput", "batches/s"),
    "gpu_memory_used_gib": ("GPU memory used", "GiB"),
}

#: Names that read as "lower is better" when a metric's mode is not given.
_MIN_HINTS = ("loss", "err", "perplexity", "ppl", "mse", "mae", "rmse", "wer", "cer", "nll", "bpb", "bpc")

PathLike = Union[str, Path]

#: The totals key of each energy part.
_ENERGY_KEYS = {"gpu": "gpu_energy_j", "cpu": "cpu_energy_j", "ram": "ram_energy_j"}

#: How the report says a total is missing from the ledger.
NOT_RECORDED = "not recorded"


def find_ledger(source: PathLike) -> Path:
    """The ledger file for a run directory, its ``costaware/`` folder, or the ledger itself.

    A directory holding exactly one ``*/costaware/ledger.jsonl`` one or two levels down (e.g.
    ``lightning_logs`` holding ``version_0``) is accepted too.

    Raises:
        LedgerError: nothing there, or several ledgers to choose from.
    """
    path = Path(source)
    if not path.exists():
        raise LedgerError(f"{path} does not exist")
    if path.is_file():
        return path
    for candidate in (path / LEDGER_FILENAME, path / "costaware" / LEDGER_FILENAME):
        if candidate.is_file():
            return candidate
    found = sorted({*path.glob(f"*/costaware/{LEDGER_FILENAME}"), *path.glob(f"*/*/costaware/{LEDGER_FILENAME}")})
    if len(found) == 1:
        return found[0]
    if found:
        listed = ", ".join(str(p.parent.parent) for p in found[:10])
        raise LedgerError(f"{path} holds {len(found)} costaware ledgers; give one run directory: {listed}")
    raise LedgerError(f"no costaware ledger in {path}: expected {path / LEDGER_FILENAME} or "
                      f"{path / 'costaware' / LEDGER_FILENAME}")


def load_ledger(source: PathLike) -> tuple[Path, LedgerContents, bool]:
    """Read a ledger as far as it can honestly be read.

    Returns ``(path, contents, trusted)``. ``trusted`` is False where the file comes from a newer
    schema or has no header: its records are still read best-effort (and ``contents.problems``
    says why they may be wrong), so a report can show what there is.

    Raises:
        LedgerError: no ledger file, or a file without a single costaware record.
    """
    path = find_ledger(source)
    try:
        contents = read_ledger(path)
        return path, contents, True
    except LedgerError as err:
        if not path.is_file():
            raise
        contents = read_ledger(path, lenient=True)
        contents.problems.insert(0, f"{err}; the figures below are read best-effort and may be wrong")
        return path, contents, False


def build_report(source: PathLike, max_points: int = DEFAULT_MAX_POINTS) -> dict:
    """Build the report dict of one run from its ledger.

    Args:
        source: a run directory, its ``costaware/`` folder, or the ``ledger.jsonl`` path.
        max_points: most points kept per plotted series.

    Returns:
        A JSON-serialisable dict; its layout is versioned by ``schema``.

    Raises:
        LedgerError: no ledger there, or a file with no costaware record at all.
    """
    _check_max_points(max_points)  # before reading a large file for nothing
    with _gc_paused():
        path, contents, trusted = load_ledger(source)
        return _build(path, contents, trusted, max_points)


def report_from_contents(path: Path, contents: LedgerContents, trusted: bool,
                         max_points: int = DEFAULT_MAX_POINTS) -> dict:
    """Build the report dict from a ledger already read with :func:`load_ledger`.

    For callers that need the raw records too (``compare_runs``) without reading the file twice.

    Raises:
        ValueError: a bad ``max_points``.
    """
    _check_max_points(max_points)
    with _gc_paused():
        return _build(path, contents, trusted, max_points)


def _check_max_points(max_points: Any) -> None:
    if not isinstance(max_points, int) or max_points < 10:
        raise ValueError(f"max_points must be an int >= 10, got {max_points!r}")


@contextmanager
def _gc_paused():
    """Pause the cyclic garbage collector while a large ledger is parsed and summarised.

    A 24-hour ledger is 100,000 small dicts; the collector would otherwise re-scan them all many
    times over (a noticeable share of the build time) though they hold no cycles.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# ------------------------------------------------------------------------------------------------
# Building
# ------------------------------------------------------------------------------------------------


def _build(path: Path, contents: LedgerContents, trusted: bool, max_points: int) -> dict:
    header = contents.header or Header()
    end, samples, events, metrics = contents.end, contents.samples, contents.events, contents.metrics
    problems = list(contents.problems)
    totals, totals_source = _final_totals(end, samples, events)
    columns = _sample_columns(samples)
    meters = _meters(end, header)
    prices = _clean_prices(header.prices, problems)
    resumes = [e for e in events if isinstance(e, ResumedEvent)]
    report: dict[str, Any] = {
        "schema": REPORT_SCHEMA_VERSION,
        "kind": "costaware-report",
        "generated_at": _iso(time.time()),
        "costaware_version": _version(),
        "ledger": {
            "path": str(path),
            "schema": header.schema,
            "trusted": trusted,
            "complete": end is not None,
            "records": {"samples": len(samples), "metrics": len(metrics), "events": len(events),
                        "end": 1 if end else 0},
        },
        "run": _run(header, end, samples, events, metrics, len(resumes)),
        "totals": totals,
        "totals_source": totals_source,
        "energy": _energy(totals, meters),
        "flops_status": _flops_status(totals, meters),
        "meters": meters,
        "prices": prices,
        "cost_breakdown": _cost_breakdown(totals, prices),
        "phases": phase_breakdown(end, events, totals),
        "averages": _averages(totals, header, meters, columns),
        "metrics": _metric_summaries(metrics, events),
        "events": [_event(e) for e in events if e.LISTED],
        "strategy_results": _strategy_rows(events),
        "outcome": None,
        "planned": None,
        "series": {
            "cost": _cost_series(samples, events, end, max_points,
                                 started_at_zero=contents.header is not None and not header.resumed_from),
            "readings": _reading_series(columns, max_points),
            "metrics": _metric_series(metrics, max_points),
            "forecasts": _forecasts(events, metrics),
        },
        "notes": _price_change_notes(header, resumes),
        "problems": problems,
    }
    report["planned"] = _planned(header, totals, events, end)
    report["outcome"] = _outcome(end, events, report["planned"])
    return report


def _run(header: Header, end: Optional[End], samples: list, events: list, metrics: list, resumes: int) -> dict:
    return {
        "run_id": header.run_id,
        "started": _iso(header.wall_time_s),
        "ended": _iso(_last_wall_time(end, samples, events, metrics)),
        **_metered_span(end, resumes),
        "world_size": header.world_size,
        "num_nodes": header.num_nodes,
        "precision": header.precision,
        "max_steps": header.max_steps,
        "max_epochs": header.max_epochs,
        "peak_flops_per_s": header.peak_flops_per_s,
        "resumed_from": header.resumed_from,
        "resumes": resumes,
    }


def _metered_span(end: Optional[End], resumes: int) -> dict:
    """The span the totals' wall time covers, when the end record gives it: for a run of one
    session, ``started``/``ended`` are when metering started and when the totals were taken."""
    start = finite_number(end.metered_from_wall_s) if end is not None else None
    stop = finite_number(end.metered_to_wall_s) if end is not None else None
    if start is None or stop is None:
        return {"span_s": None}
    span = {"session_started": _iso(start, "milliseconds"), "session_ended": _iso(stop, "milliseconds"),
            "span_s": stop - start}
    if resumes == 0:
        span.update(started=span["session_started"], ended=span["session_ended"])
    return span


def _price_change_notes(header: Header, resumes: list) -> list[str]:
    notes = []
    for resumed in resumes:
        later = resumed.header.prices if resumed.header is not None else None
        if header.prices is not None and later is not None and later != header.prices:
            notes.append("prices changed on resume: the totals use each session's own prices; "
                         f"later prices: {_short(later)}")
    return notes


#: The figures of a header's ``prices`` that must be numbers.
PRICE_NUMBERS = ("usd_per_gpu_hour", "usd_per_host_hour", "usd_per_kwh", "pue", "g_co2_per_kwh")


def _clean_prices(prices: Optional[dict], problems: list) -> Optional[dict]:
    """The header's prices with every figure a finite float or None; a bad figure is a problem."""
    if prices is None:
        return None
    out = dict(prices)
    for key in PRICE_NUMBERS:
        if key in out and out[key] is not None and finite_number(out[key]) is None:
            problems.append(f"header price {key} is not a finite number ({_short(out[key], 60)}): shown as unknown")
        if key in out:
            out[key] = finite_number(out[key])
    return out


def _final_totals(end: Optional[End], samples: list, events: list) -> tuple[dict, str]:
    """The run's totals exactly as the ledger records them, and which record they come from."""
    if end is not None and end.totals is not None:
        return _totals_dict(end.totals), "end record"
    best, best_key = None, None
    for record in samples + events:
        if record.totals is None:
            continue
        key = (finite_number(record.totals.elapsed_s) or 0.0, finite_number(record.totals.usd) or 0.0)
        if best_key is None or key >= best_key:
            best, best_key = record.totals, key
    if best is not None:
        return _totals_dict(best), "latest record with totals (no end record: the run did not finish cleanly)"
    return _totals_dict(RecordedTotals()), "none: the ledger records no totals"


def _totals_dict(recorded: RecordedTotals) -> dict:
    """Each total as a finite float, or None where the record lacks it (never a made-up zero).

    A missing ``kwh`` is the sum of the energies that are recorded (None if none is).
    """
    out = {key: finite_number(getattr(recorded, key)) for key in TOTAL_KEYS}
    if out["kwh"] is None:
        parts = [j for j in (out[k] for k in _ENERGY_KEYS.values()) if j is not None]
        out["kwh"] = sum(parts) / 3.6e6 if parts else None
    return out


def _meters(end: Optional[End], header: Header) -> dict:
    """The meters' status at the end of the run (else at its start), with a known shape."""
    for source in (end.meters if end is not None else None, header.meters):
        if isinstance(source, dict):
            return {name: source.get(name) if isinstance(source.get(name), dict) else {}
                    for name in ("gpu", "host", "flops")} | {"known": True}
    return {"gpu": {}, "host": {}, "flops": {}, "known": False}


def _energy(totals: dict, meters: dict) -> dict:
    """Energy split GPU / CPU / RAM, each with what measured it or why it was not measured."""
    gpu, host = meters["gpu"], meters["host"]
    if not meters["known"]:
        unknown = "unknown: the ledger records no meter status"
        gpu_status = cpu_status = ram_status = unknown
        gpu_ok = (totals["gpu_energy_j"] or 0.0) > 0
        host_ok = (totals["cpu_energy_j"] or 0.0) > 0 or (totals["ram_energy_j"] or 0.0) > 0
    else:
        gpu_ok = bool(gpu.get("present")) and gpu.get("energy_source", "unavailable") != "unavailable"
        if gpu_ok:
            gpu_status = _status_text(gpu.get("status"), f"measured ({gpu.get('energy_source')})")
        elif gpu.get("present"):
            disabled = ", ".join(map(str, gpu.get("disabled_fields") or [])) or "energy, power"
            gpu_status = (f"not measured: {gpu.get('name') or 'the GPU'} reports no energy or power "
                          f"(disabled: {disabled})")
        else:
            gpu_status = f"not measured: {gpu.get('status') or 'no GPU meter'}"
        host_ok = bool(host.get("present"))
        if host_ok:
            cpu_status = _status_text(host.get("status"), f"measured ({host.get('method')})")
            ram_status = _status_text(host.get("status"), "measured (codecarbon RAM model)")
        else:
            cpu_status = ram_status = f"not measured: {host.get('status') or 'no host meter'}"
    parts = {
        "gpu": (gpu_ok, gpu_status, totals["gpu_energy_j"]),
        "cpu": (host_ok, cpu_status, totals["cpu_energy_j"]),
        "ram": (host_ok, ram_status, totals["ram_energy_j"]),
    }
    out: dict[str, Any] = {}
    for name, (ok, status, energy_j) in parts.items():
        if ok and energy_j is None:  # the meter ran, but the ledger's totals hold no figure for it
            ok, status = False, f"{NOT_RECORDED}: the ledger's totals hold no {_ENERGY_KEYS[name]}"
        out[name] = {"measured": ok, "kwh": (energy_j / 3.6e6 if ok else None), "status": status}
    missing = [name.upper() for name, part in out.items() if not part["measured"]]
    out["total_kwh"] = totals["kwh"]
    out["total_note"] = ("complete" if not missing else
                         f"partial: {' and '.join(missing)} not measured, not included")
    return out


def _status_text(status: Any, measured: str) -> str:
    if isinstance(status, str) and status.startswith("degraded"):
        return f"partly measured: {status}"
    return measured


def _flops_status(totals: dict, meters: dict) -> str:
    if totals["flops"] is None:
        return f"{NOT_RECORDED}: the ledger's totals hold no FLOP count"
    flops = meters["flops"]
    status = flops.get("status", "ok") if meters["known"] else "unknown"
    if status not in ("ok", "unknown"):
        return f"not measured: {status}" if totals["flops"] <= 0 else f"partly measured: {status}"
    if not meters["known"]:
        return "unknown: the ledger records no meter status"
    return f"measured ({flops.get('source', 'FlopCounterMode')})"


def _cost_breakdown(totals: dict, prices: Optional[dict]) -> list[dict]:
    """Where the dollars went: GPU rental, host rental, energy (on-prem), at the header's prices."""
    if not prices:
        return []
    needed = ("usd", "gpu_hours", "host_hours") + (("kwh",) if prices.get("mode") == "on_prem" else ())
    if any(totals[key] is None for key in needed):
        return []  # a part of the bill the ledger does not record cannot be split out
    gpu_rate = finite_number(prices.get("usd_per_gpu_hour")) or 0.0
    host_rate = finite_number(prices.get("usd_per_host_hour")) or 0.0
    usd_gpu = totals["gpu_hours"] * gpu_rate
    usd_host = totals["host_hours"] * host_rate
    usd_energy = 0.0
    if prices.get("mode") == "on_prem":
        usd_energy = (totals["kwh"] * (finite_number(prices.get("pue")) or 1.0)
                      * (finite_number(prices.get("usd_per_kwh")) or 0.0))
    rows = [
        {"part": "GPU rental", "usd": usd_gpu,
         "basis": f"{totals['gpu_hours']:.4g} GPU-h x ${gpu_rate:.4g}/GPU-h"},
        {"part": "host rental", "usd": usd_host,
         "basis": f"{totals['host_hours']:.4g} host-h x ${host_rate:.4g}/host-h"},
    ]
    if prices.get("mode") == "on_prem":
        rows.append({"part": "energy", "usd": usd_energy,
                     "basis": f"{totals['kwh']:.4g} kWh x PUE {prices.get('pue')} x ${prices.get('usd_per_kwh')}/kWh"})
    rows = [r for r in rows if r["usd"] != 0] or rows[:1]  # a part that cost nothing is not a part
    rest = totals["usd"] - sum(r["usd"] for r in rows)
    if abs(rest) > 1e-9 * max(1.0, abs(totals["usd"])):
        rows.append({"part": "other (prices changed on resume, or totals carried from a checkpoint)", "usd": rest,
                     "basis": "recorded total minus the parts at the header's prices"})
    return rows


def _averages(totals: dict, header: Header, meters: dict, columns: dict) -> dict:
    out: dict = {}
    for key in READINGS:
        xs, ys = columns.get(key, ((), ()))
        out[key] = _weighted_mean(xs, ys)
    gpu = meters["gpu"]
    no_gpu_reason = ("not measured: " + str(gpu.get("status") or "no GPU meter")) if not gpu.get("present") else \
        "not measured: NVML gave no utilization for this GPU"
    out["gpu_utilization_note"] = "measured (NVML, time-weighted mean of samples)" if out["gpu_utilization_pct"] \
        is not None else no_gpu_reason
    peak = finite_number(header.peak_flops_per_s)
    gpu_s = (totals["gpu_hours"] or 0.0) * 3600.0
    flops = totals["flops"] or 0.0
    out["mfu_pct_overall"] = 100.0 * flops / (peak * gpu_s) if peak and gpu_s > 0 and flops > 0 else None
    if out["throughput_mfu_pct"] is not None:
        out["mfu_note"] = "measured (FLOPs counted / peak FLOP/s of the GPU, time-weighted mean of samples)"
    elif not peak:
        out["mfu_note"] = "not measured: no peak FLOP/s known for this device and precision"
    else:
        out["mfu_note"] = "not measured: no throughput samples"
    return out


def _sample_columns(samples: list) -> dict:
    """One pass per reading: ``{reading: (elapsed_s list, value list)}`` for finite values."""
    xs_all = [_finite_or_none(s.totals.elapsed_s) if s.totals is not None else None for s in samples]
    columns = {}
    for key in READINGS:
        pairs = [(x, v) for x, v in zip(xs_all, [s.readings.get(key) for s in samples])
                 if x is not None and type(v) in _NUMBER_TYPES and -_INF < v < _INF]
        columns[key] = ([p[0] for p in pairs], [p[1] for p in pairs])
    return columns


def _weighted_mean(xs: list, ys: list) -> Optional[float]:
    """Mean of a reading, each sample weighted by the time since the previous one.

    The first sample (and any whose time did not advance) gets the mean weight of the others.
    """
    if not ys:
        return None
    weights = [None] + [b - a if b > a else None for a, b in itertools.pairwise(xs)]
    known = [w for w in weights if w is not None]
    fill = sum(known) / len(known) if known else 1.0
    total = weighted = 0.0
    for w, y in zip(weights, ys):
        w = fill if w is None else w
        total += w
        weighted += w * y
    return weighted / total if total > 0 else sum(ys) / len(ys)


def _metric_summaries(metrics: list, events: list) -> list[dict]:
    """Per metric name: first, last and best value, and their cost.

    "Best" follows the mode a marginal-gain policy declared for its metric, else the name
    (``min`` for losses and errors, ``max`` otherwise).
    """
    declared = {e.monitor: e.mode for e in events
                if isinstance(e, MarginalGainPolicyEvent) and e.mode in ("max", "min")}
    by_name: dict[str, list] = {}
    for record in metrics:
        if isinstance(record.name, str) and finite_number(record.value) is not None:
            by_name.setdefault(record.name, []).append(record)
    out = []
    for name, records in by_name.items():
        mode = declared.get(name) or guess_mode(name)
        values = [v for v in (finite_number(r.value) for r in records) if v is not None]  # all: filtered above
        best_i = (max if mode == "max" else min)(range(len(values)), key=values.__getitem__)
        out.append({
            "name": name, "count": len(records), "mode": mode,
            "first": values[0], "last": values[-1], "best": values[best_i],
            "usd_at_best": finite_number(records[best_i].usd), "step_at_best": records[best_i].step,
            "usd_at_last": finite_number(records[-1].usd),
        })
    return out


def guess_mode(name: str) -> str:
    """``"min"`` for names that read as losses or errors, else ``"max"``."""
    lowered = name.lower()
    return "min" if any(hint in lowered for hint in _MIN_HINTS) else "max"


# ------------------------------------------------------------------------------------------------
# Events, decisions and the plan
# ------------------------------------------------------------------------------------------------

_EVENT_SKIP = ("kind", "name", "wall_time_s", "totals")


def _event(record: Event) -> dict:
    totals = record.totals or RecordedTotals()
    return {
        "name": record.name,
        "time": _iso(record.wall_time_s),
        "wall_time": finite_number(record.wall_time_s),
        "elapsed_s": finite_number(totals.elapsed_s),
        "usd": finite_number(totals.usd),
        "summary": describe_event(record),
        "fields": event_fields(record),
    }


def event_fields(record: Event) -> dict:
    """An event's own fields as written (those it left empty dropped), for ``report.json``."""
    written = to_dict(record)
    own = {k: v for k, v in written.items() if k not in _EVENT_SKIP and (v is not None or k in record.extra)}
    if isinstance(record, ResumedEvent) and record.header is not None:
        own = {k: v for k, v in to_dict(record.header).items() if k not in ("kind", "wall_time_s") and v is not None}
    return own


def describe_event(record: Event) -> str:
    """One readable sentence for a ledger event; an unknown one lists its fields."""
    describe = _DESCRIBERS.get(type(record))
    if describe is not None:
        return describe(record)
    fields = event_fields(record)
    shown = "; ".join(f"{k}={_short(v)}" for k, v in fields.items())
    return f"{record.name}" + (f": {shown}" if shown else "")


def _cap_hit(e: BudgetCapHitEvent) -> str:
    if e.predictive and finite_number(e.predicted_next) is not None:
        text = (f"Budget cap {e.cap or '?'}={_fmt(e.limit)}: stopped at {_fmt(e.value)}, "
                f"as the next step would reach {_fmt(e.predicted_next)}")
    else:
        text = f"Budget cap {e.cap or '?'} hit: {_fmt(e.value)} reached the limit {_fmt(e.limit)}"
    extras = [f"on cap: {e.on_cap}" if e.on_cap else "", f"checkpoint: {e.checkpoint}" if e.checkpoint else ""]
    return text + "".join(f"; {x}" for x in extras if x)


def _caps(e: BudgetCapsEvent) -> str:
    listed = ", ".join(f"{k}={_fmt(v)}" for k, v in (e.caps or {}).items()) or "none"
    return f"Budget caps set: {listed}" + (f" (on cap: {e.on_cap})" if e.on_cap else "")


def _warning(e: BudgetWarningEvent) -> str:
    fraction = finite_number(e.fraction)
    share = f"{fraction:.0%}" if fraction is not None else "part"
    return f"{share} of {e.cap or '?'}={_fmt(e.limit)} spent ({_fmt(e.value)})"


def _policy(e: MarginalGainPolicyEvent) -> str:
    then = ", ".join(map(str, e.strategies or [])) or "stop"
    extras = ("; waits for learning-rate annealing" if e.anneals else "") + (
        f"; baseline {_fmt(e.baseline)}" if finite_number(e.baseline) is not None else "")
    return (f"Marginal-gain policy on {e.monitor or '?'} ({e.mode or '?'}): "
            f"${_fmt(e.usd_per_point)} per point{extras}; then {then}")


def _probe(e: OnlineProbeEvent) -> str:
    return f"Online probe: {e.metric or 'probe'} = {_fmt(e.acc)}" + (
        f" (probe cost ${_fmt(e.cost_usd)})" if finite_number(e.cost_usd) is not None else "")


def _distill(e: DistillEvent) -> str:
    if e.trained is False:
        return f"Distill: no student trained: {e.note or 'no reason recorded'}"
    return (f"Distilled a student in {e.steps if e.steps is not None else '?'} steps for ${_fmt(e.student_usd)}"
            + (" (stopped by the budget)" if e.stopped_by_budget else ""))


def _stage_after_fit(e: StageAfterFitEvent) -> str:
    return (f"trainer.{e.stage or '?'} after the fit: ${_fmt(e.usd)} in {_fmt(e.duration_s)} s, {_fmt(e.kwh)} kWh "
            f"(metered apart at the fit's prices, outside its totals)")


def _quantize(e: QuantizeEvent) -> str:
    verdicts: dict[Optional[bool], str] = {True: "kept", False: "not kept"}
    verdict = verdicts.get(e.kept, "kept or not: not recorded")
    what = f"Quantize ({e.quant_type or '?'}" + (f", the {e.of}" if e.of else "") + ")"
    note = f"; {e.note}" if e.note else ""
    if finite_number(e.float_metric) is None:
        return f"{what}: {verdict}" + (f": {e.note}" if e.note else "")
    return f"{what}: {e.metric or 'metric'} {_fmt(e.float_metric)} -> {_fmt(e.quantized_metric)}, {verdict}{note}"


def _decision(e: MarginalGainDecisionEvent) -> str:
    parts = [("Stop" if e.stop else "Continue") + (f" ({e.monitor})" if e.monitor else "")]
    if e.reason:
        parts.append(str(e.reason))
    if finite_number(e.predicted_final) is not None:
        more = finite_number(e.usd_to_predicted_final)
        parts.append(f"predicted final {_fmt(e.predicted_final)}"
                     + (f" for ${_fmt(more)} more" if more is not None else " (at the fitted asymptote)"))
    if e.curve:
        parts.append(f"curve: {_short(e.curve)}")
    return ": ".join(parts[:2]) + ("; " + "; ".join(parts[2:]) if len(parts) > 2 else "")


def _resumed(e: ResumedEvent) -> str:
    origin = e.header.resumed_from if e.header is not None and isinstance(e.header.resumed_from, dict) else {}
    carried = finite_number(origin.get("ledger_usd", origin.get("checkpoint_usd")))
    return ("Resumed from a checkpoint" + (f" of run {origin['run_id']}" if origin.get("run_id") else "")
            + (f", carrying ${_fmt(carried)} already spent" if carried is not None else ""))


def _strategy_result(e: StrategyResultEvent) -> str:
    rows = e.rows or []
    return (f"Strategy results recorded ({len(rows)} rows)" + (f" by {e.strategy}" if e.strategy else "")
            + (f": {e.reason}" if e.reason else ""))


def _strategy_failed(e: StrategyFailedEvent) -> str:
    return (f"Strategy {e.strategy or '?'} failed after the fit ({e.error or 'no error recorded'}); the teacher "
            "is kept" + (f"; the run had stopped: {e.reason}" if e.reason else ""))


def _forecast(e: ForecastEvent) -> str:
    return f"Forecast: the planned run would cost ${_fmt(e.forecast_usd)}" + (f" ({e.basis})" if e.basis else "")


def _exception(e: ExceptionEvent) -> str:
    return ("The run was interrupted: " if e.interrupted else "The run raised ") + (e.error or "an exception")


def _degraded(e: MeterDegradedEvent) -> str:
    return f"The {e.meter or '?'} meter degraded: {e.status or 'no reason recorded'}"


def _deploy_candidate(e: DeployCandidateEvent) -> str:
    value = f", value ${_fmt(e.value_usd)}" if finite_number(e.value_usd) is not None else ""
    sla = "" if e.meets_sla is not False else "; misses the SLA"
    return (f"Deploy candidate {e.role or '?'}: {_fmt(e.metric)}, {_fmt(e.latency_ms_per_example)} ms per example, "
            f"${_fmt(e.usd_per_1k_requests)} per 1k requests, lifetime ${_fmt(e.lifetime_usd)}{value}{sla}")


def _deploy_recommendation(e: DeployRecommendationEvent) -> str:
    net = finite_number(e.net_saving_usd)
    saving = f"; saves ${_fmt(net)} net of the switch's ${_fmt(e.switch_usd)}" if net is not None else ""
    return f"Deploy the {e.role or '?'}: {e.reason or 'no reason recorded'}{saving}"


def _distill_or_annotate(e: DistillOrAnnotateEvent) -> str:
    labels = e.labels if e.labels is not None else "?"
    return (f"Distill or annotate: the switch's ${_fmt(e.switch_usd)} would buy {labels}"
            f" labels at ${_fmt(e.usd_per_label)}; the teacher's curve predicts {_fmt(e.predicted_metric_with_labels)} "
            f"with them (student: {_fmt(e.student_metric)}); assumption: {e.assumption or 'not recorded'}")


def _phases(e: PhasesEvent) -> str:
    spent = e.phases if isinstance(e.phases, dict) else {}
    parts = [f"{name} ${_fmt(figures.get('usd'))}" for name, figures in spent.items() if isinstance(figures, dict)]
    return "Cost per phase so far: " + (", ".join(parts) or "none recorded")


#: One sentence per known event type.
_DESCRIBERS: dict = {
    DeployCandidateEvent: _deploy_candidate, DeployRecommendationEvent: _deploy_recommendation,
    DistillOrAnnotateEvent: _distill_or_annotate,
    BudgetCapHitEvent: _cap_hit, BudgetCapsEvent: _caps, BudgetWarningEvent: _warning,
    MarginalGainPolicyEvent: _policy, OnlineProbeEvent: _probe, DistillEvent: _distill, QuantizeEvent: _quantize,
    MarginalGainDecisionEvent: _decision, ExceptionEvent: _exception, MeterDegradedEvent: _degraded,
    ResumedEvent: _resumed, StrategyResultEvent: _strategy_result, StrategyFailedEvent: _strategy_failed,
    ForecastEvent: _forecast, PhasesEvent: _phases, StageAfterFitEvent: _stage_after_fit,
}


def _strategy_rows(events: list) -> list[dict]:
    rows: list[dict] = []
    for event in events:
        if isinstance(event, StrategyResultEvent) and isinstance(event.rows, list):
            strategy = event.strategy
            rows.extend(({"strategy": strategy, **row} if strategy and "strategy" not in row else row)
                        for row in event.rows if isinstance(row, dict))
    return rows


def _planned(header: Header, totals: dict, events: list, end: Optional[End]) -> dict:
    """What the run as planned would have cost, from every basis the ledger offers.

    An estimate below what the run already spent (a stale forecast) is left out; a run that
    completed with no known share of its plan done (a ``max_epochs`` plan, in a ledger older than
    ``End.optimizer_steps``) has nothing "not spent by stopping": its forecast's gap is the forecast's
    error, not a saving. ``reached`` names the limit a run that finished its plan reached.
    """
    stopped_early = end is None or end.how != "completed" or bool(end.stopped_by)
    end_steps = end.optimizer_steps if end is not None else None
    by_steps, fraction = _steps_estimate(header, totals, end_steps)
    spent = totals.get("usd")
    estimates = [e for e in (_forecast_estimate(events), by_steps, _policy_estimate(events))
                 if e and not (spent is not None and e.get("usd") is not None and e["usd"] < spent)]
    out = {"usd": estimates[0]["usd"] if estimates else None, "basis": estimates[0]["basis"] if estimates else None,
           "fraction_done": fraction, "estimates": estimates, "usd_not_spent": None, "note": None, "reached": None}
    if fraction is not None and fraction >= 1.0 - 1e-9:
        out.update(note="the run finished its plan (max_steps reached)", usd_not_spent=0.0, reached="max_steps")
    elif (not stopped_early and end_steps is not None and isinstance(header.max_epochs, (int, float))
          and header.max_epochs > 0):
        # The fit ended on its own (a ledger that counts optimizer steps says no one asked it to stop): max_epochs.
        out.update(usd=spent, basis=f"what the run spent: it ran its plan (max_epochs={header.max_epochs:g})",
                   fraction_done=1.0, usd_not_spent=0.0, note="the run finished its plan (max_epochs reached)",
                   reached="max_epochs")
    elif out["usd"] is not None and totals["usd"] is not None and (stopped_early or fraction is not None):
        out["usd_not_spent"] = max(0.0, out["usd"] - totals["usd"])
    elif isinstance(header.max_epochs, (int, float)) and header.max_epochs > 0:
        out["note"] = ("unknown: the plan is max_epochs, and the ledger does not record batches per epoch "
                       "(record a 'forecast' event with forecast_usd to show one)")
    else:
        out["note"] = "unknown: the ledger holds no plan (no max_steps, no forecast)"
    return out


def _forecast_estimate(events: list) -> Optional[dict]:
    for event in events[::-1]:
        if isinstance(event, ForecastEvent) and finite_number(event.forecast_usd) is not None:
            return {"usd": finite_number(event.forecast_usd),
                    "basis": "forecast event" + (f" ({event.basis})" if event.basis else "")}
    return None


def _steps_estimate(header: Header, totals: dict, end_steps: Optional[int] = None
                    ) -> tuple[Optional[dict], Optional[float]]:
    """The cost of ``max_steps`` at the cost per step so far, and the fraction done: from the optimizer steps the
    end record counts (``max_steps``' own unit), else from the batches (ledgers before it did)."""
    max_steps, world = finite_number(header.max_steps), finite_number(header.world_size or 1)
    if max_steps is not None and max_steps > 0 and end_steps is not None and end_steps > 0:
        fraction = min(end_steps / max_steps, 1.0)
        if totals["usd"] is None:
            return None, fraction
        return {"usd": totals["usd"] / fraction,
                "basis": f"{end_steps:g} of {max_steps:g} optimizer steps (max_steps) at the cost per step so far"}, \
            fraction
    accumulate = finite_number(header.accumulate_grad_batches)  # absent from the first ledgers
    accumulate = accumulate if accumulate is not None and accumulate >= 1 else None
    done = totals["train_batches"]
    if not (max_steps is not None and max_steps > 0 and done is not None and done > 0 and world is not None
            and world > 0):
        return None, None
    planned_batches = max_steps * world * (accumulate or 1.0)
    fraction = done / planned_batches
    if fraction > 1.0 + 1e-9:
        return None, None  # gradient accumulation the ledger does not record: steps are not batches
    if totals["usd"] is None:
        return None, fraction
    per_step = (f"{accumulate:g} batches per optimizer step (accumulate_grad_batches)" if accumulate
                else "assumes one batch per optimizer step (the ledger does not record accumulate_grad_batches)")
    factors = f"max_steps={max_steps:g} x {world:g} ranks" + (f" x {accumulate:g}" if accumulate else "")
    return {"usd": totals["usd"] / fraction,
            "basis": f"{done:g} of {planned_batches:g} planned batches ({factors}) at the cost "
                     f"per batch so far; {per_step}"}, fraction


def _policy_estimate(events: list) -> Optional[dict]:
    for event in events[::-1]:
        if not isinstance(event, MarginalGainDecisionEvent):
            continue
        to_end_usd = finite_number(event.usd_to_predicted_final)
        if to_end_usd is not None:
            at = finite_number(event.totals.usd if event.totals is not None else None) or 0.0
            return {"usd": at + to_end_usd,
                    "basis": "marginal-gain policy: dollars spent at its last decision plus its dollars to "
                             "the planned end"}
    return None


def _outcome(end: Optional[End], events: list, planned: dict) -> dict:
    """How the run ended (the end record says it) and, as far as the ledger tells, why; ``stopped_by`` where
    something other than costaware stopped a fit before its plan (``End.stopped_by``)."""
    if end is None:
        how, why = "unknown", "no end record: the run was killed, or is still running"
    else:
        how = str(end.how or "unknown")
        why = f"ended: {how}"
    # Only the last session decides why the run ended: an exception or a cap hit before a
    # resume ended an earlier session, not the run.
    for event in events[::-1]:
        if isinstance(event, ResumedEvent):
            break
        if isinstance(event, ExceptionEvent):
            return {"how": how, "why": f"stopped by an exception: {event.error or '?'}"}
        if isinstance(event, BudgetCapHitEvent):
            return {"how": how, "why": "stopped by a budget cap: " + describe_event(event)}
        if isinstance(event, MarginalGainDecisionEvent) and event.stop:
            return {"how": how, "why": "stopped by the marginal-gain policy"
                    + (f": {event.reason}" if event.reason else "")}
    if end is not None and end.stopped_by:
        return {"how": how, "why": f"stopped early by {end.stopped_by}", "stopped_by": end.stopped_by}
    if end is not None and planned.get("reached"):
        why = f"completed: {planned['reached']} reached"
    return {"how": how, "why": why}


# ------------------------------------------------------------------------------------------------
# Series (downsampled for plotting)
# ------------------------------------------------------------------------------------------------


def _cost_series(samples: list, events: list, end: Optional[End], max_points: int, started_at_zero: bool) -> dict:
    recorded = [r.totals for r in samples + events + ([end] if end else []) if r.totals is not None]
    points = [(t.elapsed_s, t.usd, t) for t in recorded
              if t.elapsed_s is not None and t.usd is not None and -_INF < t.elapsed_s < _INF and -_INF < t.usd < _INF]
    points.sort(key=lambda p: p[0])
    if points and points[0][0] > 0 and started_at_zero:
        points.insert(0, (0.0, 0.0, RecordedTotals(kwh=0.0, co2_kg=0.0)))  # a fresh run starts at $0
    keep = downsample_indices(points, [p[1] for p in points], max_points)
    kept = [points[i] for i in keep]
    return {"elapsed_s": [_round(p[0]) for p in kept], "usd": [_round(p[1]) for p in kept],
            "kwh": [_round(finite_number(p[2].kwh)) for p in kept],
            "co2_kg": [_round(finite_number(p[2].co2_kg)) for p in kept],
            "points_in_ledger": len(points)}


def _reading_series(columns: dict, max_points: int) -> dict:
    out = {}
    for key, (label, unit) in READINGS.items():
        xs, ys = columns[key]
        if not xs:
            continue
        keep = downsample_indices(xs, ys, max_points)
        out[key] = {"label": label, "unit": unit, "elapsed_s": [_round(xs[i]) for i in keep],
                    "value": [_round(ys[i]) for i in keep], "points_in_ledger": len(xs)}
    return out


def _metric_series(metrics: list, max_points: int) -> dict:
    by_name: dict[str, list] = {}
    for record in metrics:
        value, usd = finite_number(record.value), finite_number(record.usd)
        if isinstance(record.name, str) and value is not None and usd is not None:
            by_name.setdefault(record.name, []).append((usd, value, record.step, finite_number(record.elapsed_s)))
    out = {}
    for name, points in by_name.items():
        keep = downsample_indices([p[0] for p in points], [p[1] for p in points], max_points)
        kept = [points[i] for i in keep]
        out[name] = {"usd": [_round(p[0]) for p in kept], "value": [_round(p[1]) for p in kept],
                     "step": [p[2] for p in kept], "points_in_ledger": len(points)}
    return out


def _forecasts(events: list, metrics: list) -> list[dict]:
    """Marginal-gain decisions and cap hits, in the shape the plots draw (all fields optional)."""
    names = list(dict.fromkeys(m.name for m in metrics if isinstance(m.name, str)))
    out = []
    for event in events:
        if isinstance(event, MarginalGainDecisionEvent):
            out.append(_decision_point(event, names[0] if names else None))
        elif isinstance(event, BudgetCapHitEvent):
            usd, elapsed_s = _at(event)
            out.append({"kind": "budget_cap", "cap": str(event.cap or ""), "unit": str(event.unit or ""),
                        "limit": finite_number(event.limit), "value": finite_number(event.value), "usd": usd,
                        "elapsed_s": elapsed_s})
    # Keep the plots light: the stop decisions, the last decision, and at most 50 others.
    decisions = [f for f in out if f["kind"] == "marginal_gain"]
    if len(decisions) > 52:
        keep = {id(f) for f in decisions if f["stop"]} | {id(decisions[-1])}
        step = max(1, math.ceil(len(decisions) / 50))
        keep |= {id(f) for f in decisions[::step]}
        out = [f for f in out if f["kind"] != "marginal_gain" or id(f) in keep]
    return out


def _at(event: Event, usd: Any = None) -> tuple[Optional[float], Optional[float]]:
    """Dollars and seconds an event happened at (its totals; else ``usd``)."""
    totals = event.totals or RecordedTotals()
    return finite_number(totals.usd if totals.usd is not None else usd), finite_number(totals.elapsed_s)


def _decision_point(event: MarginalGainDecisionEvent, default_monitor: Optional[str]) -> dict:
    usd, elapsed_s = _at(event, event.usd)
    more = finite_number(event.usd_to_predicted_final)
    curve = event.curve_points
    curve_usd, curve_value = [], []
    if isinstance(curve, dict) and isinstance(curve.get("usd"), list) and isinstance(curve.get("value"), list):
        pairs = [(finite_number(u), finite_number(v)) for u, v in zip(curve["usd"], curve["value"])]
        pairs = [p for p in pairs if p[0] is not None and p[1] is not None][:2000]
        curve_usd, curve_value = [p[0] for p in pairs], [p[1] for p in pairs]
    return {"kind": "marginal_gain", "monitor": event.monitor if isinstance(event.monitor, str) else default_monitor,
            "usd": usd, "elapsed_s": elapsed_s, "value": finite_number(event.value), "stop": bool(event.stop),
            "predicted_final": finite_number(event.predicted_final),
            "usd_at_predicted_final": usd + more if usd is not None and more is not None else None,
            "curve_usd": curve_usd, "curve_value": curve_value}


def downsample_indices(xs: list, ys: list, max_points: int) -> list[int]:
    """Indices of at most ``max_points`` points that keep each bucket's first, last, min and max.

    Peaks survive (a power spike stays visible) and the last point is always kept, so a
    cumulative curve still ends at the run's total.
    """
    n = len(xs)
    if n <= max_points:
        return list(range(n))
    buckets = max(1, max_points // 4)
    size = n / buckets
    keep: set = set()
    for b in range(buckets):
        lo, hi = int(b * size), min(n, int((b + 1) * size))
        if lo >= hi:
            continue
        window = range(lo, hi)
        keep.update((lo, hi - 1, min(window, key=ys.__getitem__), max(window, key=ys.__getitem__)))
    keep.add(n - 1)
    return sorted(keep)


# ------------------------------------------------------------------------------------------------
# Small helpers
# ------------------------------------------------------------------------------------------------


_NUMBER_TYPES = frozenset((int, float))
_INF = float("inf")


def _finite_or_none(value: Any) -> Optional[float]:
    return value if type(value) in _NUMBER_TYPES and -_INF < value < _INF else None


def finite_number(value: Any) -> Optional[float]:
    """A finite float, or None for anything else (bools, strings, NaN, missing): readers never raise on a bad figure."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _round(value: Optional[float]) -> Optional[float]:
    return None if value is None else float(f"{value:.7g}")


def _fmt(value: Any) -> str:
    number = finite_number(value)
    return f"{number:.4g}" if number is not None else str(value)


def _short(value: Any, limit: int = 200) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _iso(wall_time: Any, timespec: str = "seconds") -> Optional[str]:
    seconds = finite_number(wall_time)
    if seconds is None:
        return None
    try:
        return datetime.fromtimestamp(seconds, tz=timezone.utc).isoformat(timespec=timespec)
    except (OverflowError, OSError, ValueError):
        return None


def _last_wall_time(end: Optional[End], *groups: list) -> Optional[float]:
    if end is not None and finite_number(end.wall_time_s) is not None:
        return finite_number(end.wall_time_s)
    times = [finite_number(r.wall_time_s) for group in groups for r in group[-1:]]
    known = [t for t in times if t is not None]
    return max(known) if known else None


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("costaware")
    except Exception:  # noqa: BLE001 - a report without a version is still a report
        return "unknown"
