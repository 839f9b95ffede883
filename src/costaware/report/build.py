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
from typing import Any, Iterable, Optional, Union

from costaware.ledger import LEDGER_FILENAME, LedgerContents, LedgerError, read_ledger

#: Version of the layout of ``report.json``; bumped when a key changes meaning or goes away.
REPORT_SCHEMA_VERSION = 1

#: Most points kept per plotted series (the totals are never downsampled).
DEFAULT_MAX_POINTS = 600

TOTAL_KEYS = ("elapsed_s", "gpu_hours", "host_hours", "gpu_energy_j", "cpu_energy_j", "ram_energy_j", "flops",
              "usd", "co2_kg", "train_batches", "kwh")

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
    header = contents.header if isinstance(contents.header, dict) else {}
    end = contents.end if isinstance(contents.end, dict) else None
    samples = [s for s in contents.samples if isinstance(s, dict)]
    events = [e for e in contents.events if isinstance(e, dict)]
    metrics = [m for m in contents.metrics if isinstance(m, dict)]
    problems = list(contents.problems)
    notes: list[str] = []

    totals, totals_source = _final_totals(end, samples, events)
    columns = _sample_columns(samples)
    meters = _meters(end, header)
    raw_prices = header.get("prices") if isinstance(header.get("prices"), dict) else None
    prices = _clean_prices(raw_prices, problems)
    schema = header.get("schema")
    resumes = [e for e in events if e.get("name") == "resumed"]
    for resumed in resumes:
        if raw_prices is not None and isinstance(resumed.get("prices"), dict) and resumed["prices"] != raw_prices:
            notes.append("prices changed on resume: the totals use each session's own prices; "
                         f"later prices: {_short(resumed['prices'])}")

    report = {
        "schema": REPORT_SCHEMA_VERSION,
        "kind": "costaware-report",
        "generated_at": _iso(time.time()),
        "costaware_version": _version(),
        "ledger": {
            "path": str(path),
            "schema": schema,
            "trusted": trusted,
            "complete": end is not None,
            "records": {"samples": len(samples), "metrics": len(metrics), "events": len(events),
                        "end": 1 if end else 0},
        },
        "run": {
            "run_id": header.get("run_id"),
            "started": _iso(header.get("wall_time")),
            "ended": _iso(_last_wall_time(end, samples, events, metrics)),
            "world_size": header.get("world_size"),
            "num_nodes": header.get("num_nodes"),
            "precision": header.get("precision"),
            "max_steps": header.get("max_steps"),
            "max_epochs": header.get("max_epochs"),
            "peak_flops_per_s": header.get("peak_flops_per_s"),
            "resumed_from": header.get("resumed_from"),
            "resumes": len(resumes),
        },
        "totals": totals,
        "totals_source": totals_source,
        "energy": _energy(totals, meters),
        "flops_status": _flops_status(totals, meters),
        "meters": meters,
        "prices": prices,
        "cost_breakdown": _cost_breakdown(totals, prices),
        "averages": _averages(totals, header, meters, columns),
        "metrics": _metric_summaries(metrics, events),
        "events": [_event(e) for e in events],
        "strategy_results": _strategy_rows(events),
        "outcome": None,
        "planned": None,
        "series": {
            "cost": _cost_series(samples, events, end, max_points,
                                 started_at_zero=bool(header) and not header.get("resumed_from")),
            "readings": _reading_series(columns, max_points),
            "metrics": _metric_series(metrics, max_points),
            "forecasts": _forecasts(events, metrics),
        },
        "notes": notes,
        "problems": problems,
    }
    report["planned"] = _planned(header, totals, events)
    report["outcome"] = _outcome(end, events, report["planned"])
    return report


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


def _final_totals(end: Optional[dict], samples: list, events: list) -> tuple[dict, str]:
    """The run's totals exactly as the ledger records them, and which record they come from."""
    if end is not None and isinstance(end.get("totals"), dict):
        return _totals_dict(end["totals"]), "end record"
    best, best_key = None, None
    for record in samples + events:
        raw = record.get("totals")
        if not isinstance(raw, dict):
            continue
        key = (finite_number(raw.get("elapsed_s")) or 0.0, finite_number(raw.get("usd")) or 0.0)
        if best_key is None or key >= best_key:
            best, best_key = raw, key
    if best is not None:
        return _totals_dict(best), "latest record with totals (no end record: the run did not finish cleanly)"
    return _totals_dict({}), "none: the ledger records no totals"


def _totals_dict(raw: dict) -> dict:
    """Each total as a finite float, or None where the record lacks it (never a made-up zero).

    A missing ``kwh`` is the sum of the energies that are recorded (None if none is).
    """
    out = {key: finite_number(raw.get(key)) for key in TOTAL_KEYS}
    if out["kwh"] is None:
        parts = [out[k] for k in _ENERGY_KEYS.values() if out[k] is not None]
        out["kwh"] = sum(parts) / 3.6e6 if parts else None
    return out


def _meters(end: Optional[dict], header: dict) -> dict:
    """The meters' status at the end of the run (else at its start), with a known shape."""
    for source in ((end or {}).get("meters"), header.get("meters")):
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
    out = {}
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


def _averages(totals: dict, header: dict, meters: dict, columns: dict) -> dict:
    out: dict = {}
    for key in READINGS:
        xs, ys = columns.get(key, ((), ()))
        out[key] = _weighted_mean(xs, ys)
    gpu = meters["gpu"]
    no_gpu_reason = ("not measured: " + str(gpu.get("status") or "no GPU meter")) if not gpu.get("present") else \
        "not measured: NVML gave no utilization for this GPU"
    out["gpu_utilization_note"] = "measured (NVML, time-weighted mean of samples)" if out["gpu_utilization_pct"] \
        is not None else no_gpu_reason
    peak = finite_number(header.get("peak_flops_per_s"))
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
    xs_all = [_finite_or_none((s.get("totals") or {}).get("elapsed_s") if type(s.get("totals")) is dict else None)
              for s in samples]
    columns = {}
    for key in READINGS:
        pairs = [(x, v) for x, v in zip(xs_all, [s.get(key) for s in samples])
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
    declared = {e.get("monitor"): e.get("mode") for e in events
                if e.get("name") == "marginal_gain_policy" and e.get("mode") in ("max", "min")}
    by_name: dict[str, list] = {}
    for record in metrics:
        name, value = record.get("name"), finite_number(record.get("value"))
        if not isinstance(name, str) or value is None:
            continue
        by_name.setdefault(name, []).append(record)
    out = []
    for name, records in by_name.items():
        mode = declared.get(name) or guess_mode(name)
        values = [finite_number(r["value"]) for r in records]
        best_i = (max if mode == "max" else min)(range(len(values)), key=values.__getitem__)
        out.append({
            "name": name, "count": len(records), "mode": mode,
            "first": values[0], "last": values[-1], "best": values[best_i],
            "usd_at_best": finite_number(records[best_i].get("usd")), "step_at_best": records[best_i].get("step"),
            "usd_at_last": finite_number(records[-1].get("usd")),
        })
    return out


def guess_mode(name: str) -> str:
    """``"min"`` for names that read as losses or errors, else ``"max"``."""
    lowered = name.lower()
    return "min" if any(hint in lowered for hint in _MIN_HINTS) else "max"


# ------------------------------------------------------------------------------------------------
# Events, decisions and the plan
# ------------------------------------------------------------------------------------------------

_EVENT_SKIP = ("kind", "name", "wall_time", "totals")


def _event(record: dict) -> dict:
    totals = record.get("totals") if isinstance(record.get("totals"), dict) else {}
    fields = {k: v for k, v in record.items() if k not in _EVENT_SKIP}
    name = str(record.get("name", "event"))
    return {
        "name": name,
        "time": _iso(record.get("wall_time")),
        "wall_time": finite_number(record.get("wall_time")),
        "elapsed_s": finite_number(totals.get("elapsed_s")),
        "usd": finite_number(totals.get("usd")),
        "summary": describe_event(name, fields),
        "fields": fields,
    }


def describe_event(name: str, fields: dict) -> str:
    """One readable sentence for a ledger event; unknown events list their fields."""
    f = fields
    if name == "budget_cap_hit":
        if f.get("predictive") and finite_number(f.get("predicted_next")) is not None:
            text = (f"Budget cap {f.get('cap', '?')}={_fmt(f.get('limit'))}: stopped at {_fmt(f.get('value'))}, "
                    f"as the next step would reach {_fmt(f['predicted_next'])}")
        else:
            text = (f"Budget cap {f.get('cap', '?')} hit: {_fmt(f.get('value'))} "
                    f"reached the limit {_fmt(f.get('limit'))}")
        extras = [f"{key}: {f[key]}" for key in ("reason", "action", "on_cap", "checkpoint") if f.get(key)]
        return text + "".join(f"; {e}" for e in extras)
    if name == "budget_caps":
        caps = f.get("caps") if isinstance(f.get("caps"), dict) else {}
        listed = ", ".join(f"{k}={_fmt(v)}" for k, v in caps.items()) or "none"
        return f"Budget caps set: {listed}" + (f" (on cap: {f['on_cap']})" if f.get("on_cap") else "")
    if name == "budget_warning":
        fraction = finite_number(f.get("fraction"))
        share = f"{fraction:.0%}" if fraction is not None else "part"
        return f"{share} of {f.get('cap', '?')}={_fmt(f.get('limit'))} spent ({_fmt(f.get('value'))})"
    if name == "marginal_gain_policy":
        then = ", ".join(map(str, f.get("strategies") or [])) or "stop"
        extras = ("; waits for learning-rate annealing" if f.get("anneals") else "") + (
            f"; baseline {_fmt(f['baseline'])}" if finite_number(f.get("baseline")) is not None else "")
        return (f"Marginal-gain policy on {f.get('monitor', '?')} ({f.get('mode', '?')}): "
                f"${_fmt(f.get('usd_per_point'))} per point{extras}; then {then}")
    if name == "online_probe":
        return f"Online probe: {f.get('metric', 'probe')} = {_fmt(f.get('acc'))}" + (
            f" (probe cost ${_fmt(f['cost_usd'])})" if finite_number(f.get("cost_usd")) is not None else "")
    if name == "distill":
        if not f.get("trained", True):
            return f"Distill: no student trained: {f.get('note', 'no reason recorded')}"
        return (f"Distilled a student in {f.get('steps', '?')} steps for ${_fmt(f.get('student_usd'))}"
                + (" (stopped by the budget)" if f.get("stopped_by_budget") else ""))
    if name == "quantize":
        verdict = "kept" if f.get("kept") else "not kept"
        if finite_number(f.get("teacher_metric")) is None:
            return f"Quantize ({f.get('quant_type', '?')}): {verdict}" + (f": {f['note']}" if f.get("note") else "")
        return (f"Quantize ({f.get('quant_type', '?')}): {f.get('metric', 'metric')} "
                f"{_fmt(f.get('teacher_metric'))} -> {_fmt(f.get('quantized_metric'))}, {verdict}"
                + (f"; {f['note']}" if f.get("note") else ""))
    if name == "marginal_gain_decision":
        verdict = "Stop" if f.get("stop") else "Continue"
        parts = [f"{verdict}" + (f" ({f['monitor']})" if f.get("monitor") else "")]
        if f.get("reason"):
            parts.append(str(f["reason"]))
        if finite_number(f.get("predicted_final")) is not None:
            more = finite_number(f.get("usd_to_predicted_final"))
            parts.append(f"predicted final {_fmt(f['predicted_final'])}"
                         + (f" for ${_fmt(more)} more" if more is not None else " (at the fitted asymptote)"))
        if f.get("curve"):
            parts.append(f"curve: {_short(f['curve'])}")
        return ": ".join(parts[:2]) + ("; " + "; ".join(parts[2:]) if len(parts) > 2 else "")
    if name == "exception":
        return f"The run raised {f.get('error', 'an exception')}"
    if name == "meter_degraded":
        return f"The {f.get('meter', '?')} meter degraded: {f.get('status', 'no reason recorded')}"
    if name == "resumed":
        origin = f.get("resumed_from") if isinstance(f.get("resumed_from"), dict) else {}
        carried = finite_number(origin.get("ledger_usd", origin.get("checkpoint_usd")))
        return ("Resumed from a checkpoint" + (f" of run {origin['run_id']}" if origin.get("run_id") else "")
                + (f", carrying ${_fmt(carried)} already spent" if carried is not None else ""))
    if name == "strategy_result":
        rows = f.get("rows") if isinstance(f.get("rows"), list) else []
        return f"Strategy results recorded ({len(rows)} rows)" + (f": {f['reason']}" if f.get("reason") else "")
    if name == "forecast":
        return f"Forecast: the planned run would cost ${_fmt(f.get('forecast_usd'))}" + (
            f" ({f['basis']})" if f.get("basis") else "")
    shown = "; ".join(f"{k}={_short(v)}" for k, v in f.items())
    return f"{name}" + (f": {shown}" if shown else "")


def _strategy_rows(events: list) -> list[dict]:
    rows = []
    for event in events:
        if event.get("name") == "strategy_result" and isinstance(event.get("rows"), list):
            strategy = event.get("strategy")
            rows.extend(({"strategy": strategy, **row} if strategy and "strategy" not in row else row)
                        for row in event["rows"] if isinstance(row, dict))
    return rows


def _planned(header: dict, totals: dict, events: list) -> dict:
    """What the run as planned would have cost, from every basis the ledger offers."""
    estimates = []
    for event in events[::-1]:
        if event.get("name") == "forecast" and finite_number(event.get("forecast_usd")) is not None:
            estimates.append({"usd": finite_number(event["forecast_usd"]),
                              "basis": "forecast event" + (f" ({event['basis']})" if event.get("basis") else "")})
            break
    max_steps, world = finite_number(header.get("max_steps")), finite_number(header.get("world_size") or 1)
    accumulate = finite_number(header.get("accumulate_grad_batches"))  # absent from ledgers written so far
    accumulate = accumulate if accumulate is not None and accumulate >= 1 else None
    done = totals["train_batches"]
    fraction = None
    if max_steps is not None and max_steps > 0 and done is not None and done > 0 and world is not None and world > 0:
        planned_batches = max_steps * world * (accumulate or 1.0)
        fraction = done / planned_batches
        if fraction <= 1.0 + 1e-9:
            if totals["usd"] is not None:
                per_step = (f"{accumulate:g} batches per optimizer step (accumulate_grad_batches)" if accumulate
                            else "assumes one batch per optimizer step (the ledger does not record "
                                 "accumulate_grad_batches)")
                factors = f"max_steps={max_steps:g} x {world:g} ranks" + (f" x {accumulate:g}" if accumulate else "")
                estimates.append({"usd": totals["usd"] / fraction,
                                  "basis": f"{done:g} of {planned_batches:g} planned batches ({factors}) at the cost "
                                           f"per batch so far; {per_step}"})
        else:
            fraction = None  # gradient accumulation the ledger does not record: steps are not batches
    for event in events[::-1]:
        if (event.get("name") == "marginal_gain_decision"
                and finite_number(event.get("usd_to_predicted_final")) is not None):
            totals_then = event.get("totals") if isinstance(event.get("totals"), dict) else {}
            at = finite_number(totals_then.get("usd")) or 0.0
            estimates.append({"usd": at + finite_number(event["usd_to_predicted_final"]),
                              "basis": "marginal-gain policy: dollars spent at its last decision plus its dollars to "
                                       "the planned end"})
            break
    out = {"usd": estimates[0]["usd"] if estimates else None, "basis": estimates[0]["basis"] if estimates else None,
           "fraction_done": fraction, "estimates": estimates, "usd_not_spent": None, "note": None}
    if fraction is not None and fraction >= 1.0 - 1e-9:
        out["note"] = "the run finished its plan (max_steps reached)"
        out["usd_not_spent"] = 0.0
    elif out["usd"] is not None and totals["usd"] is not None:
        out["usd_not_spent"] = max(0.0, out["usd"] - totals["usd"])
    elif isinstance(header.get("max_epochs"), (int, float)) and header.get("max_epochs", -1) > 0:
        out["note"] = ("unknown: the plan is max_epochs, and the ledger does not record batches per epoch "
                       "(record a 'forecast' event with forecast_usd to show one)")
    else:
        out["note"] = "unknown: the ledger holds no plan (no max_steps, no forecast)"
    return out


def _outcome(end: Optional[dict], events: list, planned: dict) -> dict:
    """How the run ended and, as far as the ledger tells, why."""
    if end is None:
        how, why = "unknown", "no end record: the run was killed, or is still running"
    else:
        how = str(end.get("how", "unknown"))
        why = f"ended: {how}"
    # Only the last session decides why the run ended: an exception or a cap hit before a
    # ``resumed`` event ended an earlier session, not the run.
    for event in events[::-1]:
        name = event.get("name")
        if name == "resumed":
            break
        if name == "exception":
            return {"how": how, "why": f"stopped by an exception: {event.get('error', '?')}"}
        if name == "budget_cap_hit":
            return {"how": how, "why": "stopped by a budget cap: " + describe_event(name, event)}
        if name == "marginal_gain_decision" and event.get("stop"):
            return {"how": how, "why": "stopped by the marginal-gain policy"
                    + (f": {event['reason']}" if event.get("reason") else "")}
    if end is not None and str(planned.get("note") or "").startswith("the run finished"):
        why = "completed: max_steps reached"
    return {"how": how, "why": why}


# ------------------------------------------------------------------------------------------------
# Series (downsampled for plotting)
# ------------------------------------------------------------------------------------------------


def _cost_series(samples: list, events: list, end: Optional[dict], max_points: int, started_at_zero: bool) -> dict:
    raws = [r.get("totals") for r in samples + events + ([end] if end else [])]
    raws = [raw for raw in raws if type(raw) is dict]
    points = [(x, usd, raw) for x, usd, raw in zip([raw.get("elapsed_s") for raw in raws],
                                                    [raw.get("usd") for raw in raws], raws)
              if type(x) in _NUMBER_TYPES and type(usd) in _NUMBER_TYPES and -_INF < x < _INF and -_INF < usd < _INF]
    points.sort(key=lambda p: p[0])
    if points and points[0][0] > 0 and started_at_zero:
        points.insert(0, (0.0, 0.0, {"kwh": 0.0, "co2_kg": 0.0}))  # a fresh run starts at $0
    keep = downsample_indices(points, [p[1] for p in points], max_points)
    kept = [points[i] for i in keep]
    return {"elapsed_s": [_round(p[0]) for p in kept], "usd": [_round(p[1]) for p in kept],
            "kwh": [_round(finite_number(p[2].get("kwh"))) for p in kept],
            "co2_kg": [_round(finite_number(p[2].get("co2_kg"))) for p in kept],
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
        name, value, usd = record.get("name"), finite_number(record.get("value")), finite_number(record.get("usd"))
        if isinstance(name, str) and value is not None and usd is not None:
            by_name.setdefault(name, []).append(
                (usd, value, record.get("step"), finite_number(record.get("elapsed_s"))))
    out = {}
    for name, points in by_name.items():
        keep = downsample_indices([p[0] for p in points], [p[1] for p in points], max_points)
        kept = [points[i] for i in keep]
        out[name] = {"usd": [_round(p[0]) for p in kept], "value": [_round(p[1]) for p in kept],
                     "step": [p[2] for p in kept], "points_in_ledger": len(points)}
    return out


def _forecasts(events: list, metrics: list) -> list[dict]:
    """Marginal-gain decisions and cap hits, in the shape the plots draw (all fields optional)."""
    names = list(dict.fromkeys(m.get("name") for m in metrics if isinstance(m.get("name"), str)))
    out = []
    for event in events:
        name = event.get("name")
        at = event.get("totals") if isinstance(event.get("totals"), dict) else {}
        usd, elapsed_s = finite_number(at.get("usd", event.get("usd"))), finite_number(at.get("elapsed_s"))
        if name == "marginal_gain_decision":
            monitor = event.get("monitor") if isinstance(event.get("monitor"), str) else (names[0] if names else None)
            more = finite_number(event.get("usd_to_predicted_final"))
            curve = event.get("curve_points")
            curve_usd, curve_value = [], []
            if isinstance(curve, dict) and isinstance(curve.get("usd"), list) and isinstance(curve.get("value"), list):
                pairs = [(finite_number(u), finite_number(v)) for u, v in zip(curve["usd"], curve["value"])]
                pairs = [p for p in pairs if p[0] is not None and p[1] is not None][:2000]
                curve_usd, curve_value = [p[0] for p in pairs], [p[1] for p in pairs]
            out.append({"kind": "marginal_gain", "monitor": monitor, "usd": usd, "elapsed_s": elapsed_s,
                        "value": finite_number(event.get("value")),
                        "stop": bool(event.get("stop")), "predicted_final": finite_number(event.get("predicted_final")),
                        "usd_at_predicted_final": usd + more if usd is not None and more is not None else None,
                        "curve_usd": curve_usd, "curve_value": curve_value})
        elif name == "budget_cap_hit":
            out.append({"kind": "budget_cap", "cap": str(event.get("cap", "")), "unit": str(event.get("unit") or ""),
                        "limit": finite_number(event.get("limit")),
                        "value": finite_number(event.get("value")), "usd": usd, "elapsed_s": elapsed_s})
    # Keep the plots light: the stop decisions, the last decision, and at most 50 others.
    decisions = [f for f in out if f["kind"] == "marginal_gain"]
    if len(decisions) > 52:
        keep = {id(f) for f in decisions if f["stop"]} | {id(decisions[-1])}
        step = max(1, math.ceil(len(decisions) / 50))
        keep |= {id(f) for f in decisions[::step]}
        out = [f for f in out if f["kind"] != "marginal_gain" or id(f) in keep]
    return out


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


def _iso(wall_time: Any) -> Optional[str]:
    seconds = finite_number(wall_time)
    if seconds is None:
        return None
    try:
        return datetime.fromtimestamp(seconds, tz=timezone.utc).isoformat(timespec="seconds")
    except (OverflowError, OSError, ValueError):
        return None


def _last_wall_time(end: Optional[dict], *groups: Iterable[dict]) -> Optional[float]:
    if end is not None and finite_number(end.get("wall_time")) is not None:
        return finite_number(end["wall_time"])
    times = [finite_number(r.get("wall_time")) for group in groups for r in group[-1:]]
    times = [t for t in times if t is not None]
    return max(times) if times else None


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("costaware")
    except Exception:  # noqa: BLE001 - a report without a version is still a report
        return "unknown"
