"""Numbers and rows shared by the Markdown and HTML renderings of a report.

Every renderer shows the same figures in the same words; only the markup differs. Figures that
were not measured come through as the reason they were not, never as a zero.
"""

from __future__ import annotations

from typing import Any, Optional

from costaware.report.build import finite_number

_SI = ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))

#: What a total the ledger does not hold reads as.
NOT_RECORDED = "not recorded"


def recorded(value: Optional[float], fmt) -> str:
    """``fmt(value)``, or "not recorded" where the ledger holds no such figure."""
    return fmt(value) if finite_number(value) is not None else NOT_RECORDED


def usd(value: Optional[float]) -> str:
    """Dollars with as many decimals as a small figure needs: ``$12.35``, ``$0.0123``, ``$6.5e-05``."""
    value = finite_number(value)
    if value is None:
        return "n/a"
    sign, a = ("-" if value < 0 else ""), abs(value)
    if a == 0:
        return "$0"
    if a >= 1000:
        return f"{sign}${a:,.0f}"
    if a >= 1:
        return f"{sign}${a:.2f}"
    if round(a, 2) >= 0.1:
        return f"{sign}${a:.2f}"
    if a >= 0.01:
        return f"{sign}${a:.4g}"
    return f"{sign}${a:.3g}"


def number(value: Optional[float], unit: str = "", digits: int = 4) -> str:
    """A figure with ``digits`` significant digits and its unit: ``0.0123 kWh``, ``1.2e-07 kg``."""
    value = finite_number(value)
    if value is None:
        return "n/a"
    text = f"{value:.{digits}g}"
    return f"{text} {unit}".strip()


def si(value: Optional[float], unit: str = "") -> str:
    """A large count with an SI prefix: ``5.12 kFLOP``, ``3.4 PFLOP``."""
    value = finite_number(value)
    if value is None:
        return "n/a"
    for scale, prefix in _SI:
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}".strip()


def duration(seconds: Optional[float]) -> str:
    """``45.2 s``, ``12 min 5 s``, ``3 h 12 min``."""
    seconds = finite_number(seconds)
    if seconds is None:
        return "n/a"
    if seconds < 60:
        return f"{seconds:.3g} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60)} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min"


def percent(value: Optional[float]) -> str:
    value = finite_number(value)
    return "n/a" if value is None else f"{value:.1f} %"


def cell(value: Any) -> str:
    """Any JSON value as short table text."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        import json

        text = json.dumps(value, default=str)
        return text if len(text) <= 120 else text[:117] + "..."
    return str(value)


def measured_or_reason(value: Optional[float], note: str, fmt) -> str:
    """The figure when measured, else the note that says why not."""
    return fmt(value) if value is not None else note


def energy_note(report: dict) -> str:
    note = report["energy"]["total_note"]
    return "GPU + CPU + RAM, all measured" if note == "complete" else note


def title(report: dict) -> str:
    run_id = (report.get("run") or {}).get("run_id")
    return f"costaware budget report: run {run_id}" if run_id else "costaware budget report"


def summary_rows(report: dict) -> list[tuple[str, str]]:
    """(label, text) rows of the summary table."""
    t, e, a, run = report["totals"], report["energy"], report["averages"], report["run"]

    def energy(part: str, label: str) -> str:
        p = e[part]
        return f"{number(p['kwh'], 'kWh')} ({p['status']})" if p["measured"] else p["status"]

    elapsed = finite_number(t["elapsed_s"])
    rows = [
        ("Outcome", report["outcome"]["why"]),
        ("Wall time", recorded(elapsed, duration)
                      + (f" ({number(elapsed, 's', 6)})" if elapsed is not None and elapsed >= 60 else "")
                      + _span(run)),
        ("Dollars", recorded(t["usd"], usd) + _after_fit_note(report)),
        ("GPU-hours", recorded(t["gpu_hours"], lambda v: number(v, "GPU-h"))
         + (" (no GPU held)" if t["gpu_hours"] == 0 and not (report["meters"]["gpu"] or {}).get("present") else "")),
        ("Host-hours", recorded(t["host_hours"], lambda v: number(v, "host-h"))),
        ("Energy, total", f"{recorded(t['kwh'], lambda v: number(v, 'kWh'))} ({energy_note(report)})"),
        ("Energy, GPU", energy("gpu", "GPU")),
        ("Energy, CPU", energy("cpu", "CPU")),
        ("Energy, RAM", energy("ram", "RAM")),
        ("CO2", recorded(t["co2_kg"], lambda v: number(v, "kg CO2-eq"))
         + ("" if e["total_note"] == "complete" or finite_number(t["co2_kg"]) is None
            else " (from the measured energy only)")),
        ("FLOPs", f"{si(t['flops'], 'FLOP')} ({report['flops_status']})"
         if finite_number(t["flops"]) is not None and not report["flops_status"].startswith("not measured")
         else report["flops_status"]),
        ("Training batches", recorded(t["train_batches"], lambda v: number(v, "", 8))),
        ("Mean MFU", measured_or_reason(a.get("throughput_mfu_pct"), a.get("mfu_note", "not measured"), percent)
         + (f"; overall {percent(a['mfu_pct_overall'])} (FLOPs / GPU-seconds x peak)"
            if a.get("mfu_pct_overall") is not None else "")),
        ("Mean GPU utilization", measured_or_reason(a.get("gpu_utilization_pct"), a.get("gpu_utilization_note", ""),
                                                    percent)),
    ]
    if a.get("gpu_power_w") is not None:
        rows.append(("Mean GPU power", number(a["gpu_power_w"], "W")))
    if a.get("throughput_batches_per_s") is not None:
        rows.append(("Mean throughput", number(a["throughput_batches_per_s"], "batches/s")))
    planned = report.get("planned") or {}
    finished = str(planned.get("note") or "").startswith("the run finished")
    if planned.get("usd") is not None and not finished:
        rows.append(("Planned run would have cost", f"{usd(planned['usd'])} ({planned['basis']})"))
        if planned.get("usd_not_spent"):
            rows.append(("Not spent by stopping", usd(planned["usd_not_spent"])))
    if planned.get("note"):
        rows.append(("Plan", planned["note"]))
    by_phase = phase_summary(report)
    if by_phase:
        rows.append(("By phase", by_phase))
    rows.append(("Totals from", report["totals_source"]))
    return rows


#: The summary rows a script prints at its end (:func:`summary_lines`), in the report's words.
HEADLINE = ("Outcome", "Wall time", "Dollars", "Energy, total", "CO2", "By phase")


def summary_lines(report: dict) -> list[str]:
    """``Label: text`` lines of the report's headline figures, worded exactly as the report and
    ``costaware report`` word them (for a script's printed summary)."""
    return [f"{label}: {text}" for label, text in summary_rows(report) if label in HEADLINE]


def phase_summary(report: dict) -> str:
    """The phases in one line: ``training $0.12 (60.0 %), validation ...``; "" without phases."""
    phases = report.get("phases") or {}
    rows = [r for r in phases.get("rows") or [] if r["usd"] or r["elapsed_s"]]
    if not rows or not any(r["phase"] != "other" for r in rows):
        return ""
    parts = [f"{r['phase']} {usd(r['usd'])} ({percent(r['share_pct'])}, {duration(r['elapsed_s'])})" for r in rows]
    after = any(r.get("after_fit") for r in rows)
    return ", ".join(parts) + (f"; {usd(phases['total_usd'])} with what ran after the fit" if after else "")


def _after_fit_note(report: dict) -> str:
    """`` (the fit; $X with what ran after it)`` when strategies or a test ran after the fit, else ""."""
    phases = report.get("phases") or {}
    after = [r for r in phases.get("rows") or [] if r.get("after_fit") and r["usd"]]
    if not after or finite_number(report["totals"]["usd"]) is None:
        return ""
    return f" (the fit; {usd(phases['total_usd'])} with {', '.join(r['phase'] for r in after)} after it)"


def _span(run: dict) -> str:
    """When the wall time was spent: the metered span (one session), or the last session's."""
    if run.get("resumes") and run.get("session_started"):
        return (f" metered over {run['resumes'] + 1} sessions; the last metered from {run['session_started']} "
                f"to {run['session_ended']} ({duration(run['span_s'])})")
    if run.get("span_s") is not None:
        return f", metered from {run['started']} to {run['ended']}"
    return f", from {run['started']} to {run['ended']}" if run.get("started") else ""


def phase_table(report: dict) -> tuple[list[str], list[list[str]]]:
    """The per-phase breakdown as a table (phase, time, dollars, share, basis), with its totals."""
    phases = report.get("phases") or {}
    rows = [[r["phase"], duration(r["elapsed_s"]), usd(r["usd"]), percent(r["share_pct"]), r["basis"]]
            for r in phases.get("rows") or []]
    if rows:
        after = any(r.get("after_fit") for r in phases["rows"])
        rows.append(["total" + (", with what ran after the fit" if after else ""), duration(phases["total_elapsed_s"]),
                     usd(phases["total_usd"]), percent(100.0 if phases["total_usd"] else None), phases["note"]])
    return ["phase", "time", "dollars", "share", "basis"], rows


def price_rows(report: dict) -> list[tuple[str, str]]:
    """(label, text) rows: the prices and carbon intensity used, and where they came from."""
    p = report.get("prices")
    if not p:
        return [("Prices", "unknown: the ledger has no header")]
    rows = [
        ("Mode", f"{p.get('mode')} (" + ("you pay the rental: GPU-hours and host-hours" if p.get("mode") == "cloud"
                                         else "you pay the energy and any amortised hardware") + ")"),
        ("GPU", str(p.get("gpu_model") or "none")),
        ("GPU price", f"{usd(p.get('usd_per_gpu_hour'))}/GPU-h, {p.get('usd_per_gpu_hour_source')}"),
        ("Host price", f"{usd(p.get('usd_per_host_hour'))}/host-h"),
    ]
    if p.get("mode") == "on_prem" or p.get("usd_per_kwh"):
        rows.append(("Energy price", f"{usd(p.get('usd_per_kwh'))}/kWh"))
    rows += [
        ("PUE", number(p.get("pue"))),
        ("Carbon intensity", f"{number(p.get('g_co2_per_kwh'), 'g CO2-eq/kWh')}, {p.get('carbon_source')}"),
    ]
    return rows


def meter_rows(report: dict) -> list[tuple[str, str]]:
    m = report["meters"]
    if not m.get("known"):
        return [("Meters", "unknown: the ledger records no meter status")]
    gpu, host, flops = m["gpu"], m["host"], m["flops"]
    gpu_text = (f"{gpu.get('name') or 'GPU'}: {gpu.get('status')}, energy from {gpu.get('energy_source')}"
                if gpu.get("present") else f"not measured: {gpu.get('status')}")
    if gpu.get("present") and gpu.get("disabled_fields"):
        gpu_text += f"; not readable on this device: {', '.join(map(str, gpu['disabled_fields']))}"
    host_text = (f"{host.get('status')}, {host.get('method')}" if host.get("present")
                 else f"not measured: {host.get('status')}")
    return [("GPU meter", gpu_text), ("Host meter", host_text),
            ("FLOPs counter", f"{flops.get('status', 'unknown')}, {flops.get('source', 'unknown source')}")]


def metric_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    head = ["metric", "evaluations", "first", "best", "last", "$ at best", "step at best"]
    rows = [[m["name"], str(m["count"]), cell(m["first"]), f"{cell(m['best'])} ({m['mode']})", cell(m["last"]),
             usd(m["usd_at_best"]), cell(m["step_at_best"])] for m in report["metrics"]]
    return head, rows


def strategy_table(report: dict) -> tuple[list[str], list[list[str]]]:
    rows = report.get("strategy_results") or []
    head = list(dict.fromkeys(k for row in rows for k in row))
    return head, [[cell(row.get(k)) for k in head] for row in rows]


def breakdown_rows(report: dict) -> list[tuple[str, str]]:
    return [(r["part"], f"{usd(r['usd'])} ({r['basis']})") for r in report.get("cost_breakdown") or []]


def event_time(event: dict) -> str:
    parts = []
    if event.get("elapsed_s") is not None:
        parts.append(f"at {duration(event['elapsed_s'])}")
    if event.get("usd") is not None:
        parts.append(usd(event["usd"]))
    return ", ".join(parts) or (event.get("time") or "")


def text_table(head: list[str], rows: list[list[str]]) -> str:
    """Left-aligned columns under a dashed header: the one plain-text table the CLI prints."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)
