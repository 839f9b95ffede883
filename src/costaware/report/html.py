"""A report dict as one self-contained HTML page (``report.html``) with its charts inline.

The page has no script, loads nothing (a Content-Security-Policy forbids it), and escapes every
piece of text that comes from the run, so it can be opened from an artifact store or mailed
around safely. Charts are inline SVG from :mod:`costaware.report.plots`.

Example::

    from costaware.report import build_report, render_html

    html = render_html(build_report("lightning_logs/version_0"))
"""

from __future__ import annotations

from html import escape

from costaware.report import text as T
from costaware.report.plots import PALETTE, Bar, Line, Marker, Rule, bar_chart, line_chart, time_axis

#: Most events listed on the page; report.json holds them all.
MAX_EVENTS = 500
#: Most metrics drawn against dollars (one chart each).
MAX_METRIC_CHARTS = 8

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1000px;color:#222;
padding:0 16px;line-height:1.4}
h1{font-size:1.5em;margin-bottom:4px}h2{font-size:1.2em;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0;font-size:.92em}td,th{border:1px solid #ddd;padding:4px 8px;
text-align:left;vertical-align:top}th{background:#f6f6f6}td.k{white-space:nowrap;font-weight:600}
.problems{background:#fff3f3;border:1px solid #e0a0a0;padding:8px 16px;border-radius:4px}
.meta{color:#666;font-size:.9em}.missing{fill:#a33;font-style:italic}.note{font-size:11px}
.chart{display:block;margin:12px 0;max-width:100%;height:auto}.tick{fill:#444;font-size:11px}
.axis{fill:#222}.legend{fill:#222;font-size:11px}.absent{color:#a33;font-style:italic}
ol.events li{margin-bottom:4px}.ev-name{font-weight:600}
"""


def render_html(report: dict) -> str:
    """The whole report as a standalone HTML page."""
    e = escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{e(T.title(report))}</title><style>{STYLE}</style></head><body>",
           f"<h1>{e(T.title(report))}</h1>"]
    ledger = report["ledger"]
    out.append(f'<p class="meta">Ledger: <code>{e(ledger["path"])}</code> (schema {e(str(ledger["schema"]))}, '
               f'{"complete" if ledger["complete"] else "no end record"}). Generated {e(str(report["generated_at"]))} '
               f'by costaware {e(str(report["costaware_version"]))}.</p>')
    if report["problems"]:
        out.append('<div class="problems" id="problems"><strong>Problems with the ledger</strong> '
                   "(the report shows what could be read):<ul>")
        out += [f"<li>{e(p)}</li>" for p in report["problems"]]
        out.append("</ul></div>")
    out += ["<h2>Summary</h2>", _pairs(T.summary_rows(report), "summary")]
    out += ["<h2>Spend</h2>", _cost_chart(report), _breakdown_chart(report), _energy_chart(report)]
    head, rows = T.phase_table(report)
    if rows:
        out += ["<h3>By phase</h3>", _table(head, rows, "phases")]
    out += ["<h2>Metrics against dollars</h2>"] + _metric_charts(report)
    out += ["<h2>Power and utilization</h2>"] + _reading_charts(report)
    out += ["<h2>Decisions and events</h2>", _events(report)]
    head, rows = T.strategy_table(report)
    if rows:
        out += ["<h2>Teacher, student and quantized results</h2>", _table(head, rows, "strategy")]
    head, rows = T.metric_rows(report)
    out += ["<h2>Metrics</h2>", _table(head, rows, "metrics") if rows else
            '<p class="absent">No metric was recorded (metrics are recorded at validation).</p>']
    out += ["<h2>Prices and carbon intensity</h2>", _pairs(T.price_rows(report), "prices")]
    out += ["<h2>Meters</h2>", _pairs(T.meter_rows(report), "meters")]
    if report["notes"]:
        out += ["<h2>Notes</h2><ul>"] + [f"<li>{e(n)}</li>" for n in report["notes"]] + ["</ul>"]
    out.append("</body></html>")
    return "\n".join(out)


def _pairs(rows: list[tuple[str, str]], css_id: str) -> str:
    body = "".join(f'<tr><td class="k">{escape(k)}</td><td>{escape(v)}</td></tr>' for k, v in rows)
    return f'<table id="{css_id}">{body}</table>'


def _table(head: list[str], rows: list[list[str]], css_id: str) -> str:
    th = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table id="{css_id}"><tr>{th}</tr>{body}</table>'


def _absent(text: str) -> str:
    return f'<p class="absent">{escape(text)}</p>'


def _cost_chart(report: dict) -> str:
    cost = report["series"]["cost"]
    if not cost["elapsed_s"]:
        return _absent("No cost over time: the ledger holds no sample.")
    div, x_label = time_axis(max(cost["elapsed_s"]))
    rules, markers = [], []
    for f in report["series"]["forecasts"]:
        if f["kind"] != "budget_cap":
            continue
        label = f"cap {f['cap']} hit" + (f" (limit {f['limit']:.4g})" if f["limit"] is not None else "")
        if (f["unit"] == "usd" or (not f["unit"] and "usd" in f["cap"].lower())) and f["limit"] is not None:
            rules.append(Rule(f["limit"], f"budget cap {f['cap']} = {T.usd(f['limit'])}", "y", "#d62728", "cap"))
        elif f["elapsed_s"] is not None:
            rules.append(Rule(f["elapsed_s"] / div, label, "x", "#d62728", "cap"))
    for f in report["series"]["forecasts"]:
        if f["kind"] == "marginal_gain" and f["stop"] and f["elapsed_s"] is not None and f["usd"] is not None:
            markers.append(Marker(f["elapsed_s"] / div, f["usd"], "stopped: marginal gain too low", "#9467bd",
                                  css_class="stop"))
    line = Line("cumulative dollars", [x / div for x in cost["elapsed_s"]], cost["usd"], css_class="cost")
    return line_chart([line], title="Cumulative dollars over time", x_label=x_label, y_label="dollars",
                      rules=rules, markers=markers, css_id="chart-cost") or _absent("No cost over time recorded.")


def _breakdown_chart(report: dict) -> str:
    rows = report.get("cost_breakdown") or []
    if not rows:
        return _absent("No cost breakdown: the ledger has no prices.")
    bars = [Bar(r["part"], r["usd"], note=r["basis"]) for r in rows]
    return bar_chart(bars, title="Where the dollars went", value_fmt=T.usd, css_id="chart-breakdown")


def _energy_chart(report: dict) -> str:
    energy = report["energy"]
    bars = [Bar(f"{name.upper()} energy", energy[name]["kwh"] if energy[name]["measured"] else None,
                note="" if energy[name]["measured"] else energy[name]["status"]) for name in ("gpu", "cpu", "ram")]
    return bar_chart(bars, title=f"Energy by part (kWh; total: {T.energy_note(report)})",
                     value_fmt=lambda v: T.number(v, "kWh"), css_id="chart-energy")


def _metric_charts(report: dict) -> list[str]:
    series = report["series"]["metrics"]
    if not series:
        return [_absent("No metric was recorded against dollars.")]
    out = []
    forecasts = [f for f in report["series"]["forecasts"] if f["kind"] == "marginal_gain"]
    for i, (name, points) in enumerate(list(series.items())[:MAX_METRIC_CHARTS]):
        lines = [Line(name, points["usd"], points["value"], PALETTE[i % len(PALETTE)], css_class="metric")]
        rules, markers = [], []
        mine = [f for f in forecasts if f["monitor"] == name or (f["monitor"] not in series and i == 0)]
        last_with_forecast = next((f for f in mine[::-1] if f["predicted_final"] is not None), None)
        for f in mine:
            if f["stop"] and f["usd"] is not None:
                rules.append(Rule(f["usd"], f"stopped at {T.usd(f['usd'])}", "x", "#9467bd", "stop"))
        if last_with_forecast is not None:
            f = last_with_forecast
            if f["curve_usd"]:
                lines.append(Line("fitted curve", f["curve_usd"], f["curve_value"], "#7f7f7f", dashed=True,
                                  css_class="curve"))
            if f["usd_at_predicted_final"] is not None:
                markers.append(Marker(f["usd_at_predicted_final"], f["predicted_final"],
                                      f"predicted final {f['predicted_final']:.4g} at "
                                      f"{T.usd(f['usd_at_predicted_final'])}",
                                      "#ff7f0e", hollow=True, css_class="forecast"))
                if points["usd"] and f["usd"] is not None:
                    start = f["value"] if f["value"] is not None else _value_at(points, f["usd"])
                    lines.append(Line("forecast", [f["usd"], f["usd_at_predicted_final"]],
                                      [start, f["predicted_final"]], "#ff7f0e", dashed=True, css_class="forecast"))
            else:
                rules.append(Rule(f["predicted_final"], f"predicted final {f['predicted_final']:.4g} (asymptote)",
                                  "y", "#ff7f0e", "forecast"))
        kept = len(points["usd"])
        note = "" if kept == points["points_in_ledger"] else f" ({kept} of {points['points_in_ledger']} points shown)"
        out.append(line_chart(lines, title=f"{name} against dollars{note}", x_label="dollars spent", y_label=name,
                              rules=rules, markers=markers, y_from_zero=False, x_fmt=T.usd,
                              css_id=f"chart-metric-{i}"))
    if len(series) > MAX_METRIC_CHARTS:
        out.append(_absent(f"{len(series) - MAX_METRIC_CHARTS} more metrics are in report.json."))
    return out


def _value_at(points: dict, usd: float) -> float:
    """The metric value recorded at or just before ``usd`` (where the forecast starts)."""
    before = [v for u, v in zip(points["usd"], points["value"]) if u <= usd + 1e-12]
    return before[-1] if before else points["value"][0]


def _reading_charts(report: dict) -> list[str]:
    readings = report["series"]["readings"]
    averages = report["averages"]
    longest = max((max(r["elapsed_s"]) for r in readings.values() if r["elapsed_s"]), default=0.0)
    div, x_label = time_axis(longest)
    out = []
    groups = [
        ("Power over time", "watts", ("gpu_power_w", "host_cpu_power_w"), "chart-power"),
        ("GPU utilization and MFU over time", "percent", ("gpu_utilization_pct", "throughput_mfu_pct"), "chart-util"),
        ("Throughput over time", "batches/s", ("throughput_batches_per_s",), "chart-throughput"),
    ]
    for title, unit, keys, css_id in groups:
        lines = [Line(f"{readings[k]['label']} ({readings[k]['unit']})", [x / div for x in readings[k]["elapsed_s"]],
                      readings[k]["value"], css_class=k) for k in keys if k in readings]
        if lines:
            out.append(line_chart(lines, title=title, x_label=x_label, y_label=unit, css_id=css_id))
    missing = []
    if "gpu_power_w" not in readings:
        missing.append(f"GPU power and utilization: {report['energy']['gpu']['status']}"
                       if not report["energy"]["gpu"]["measured"] else "GPU power: no sample recorded")
    if "throughput_mfu_pct" not in readings:
        missing.append(f"MFU: {averages.get('mfu_note', 'not measured')}")
    if "host_cpu_power_w" not in readings:
        missing.append(f"host CPU power: {report['energy']['cpu']['status']}"
                       if not report["energy"]["cpu"]["measured"] else "host CPU power: no sample recorded")
    out += [_absent(text) for text in missing]
    return out


def _events(report: dict) -> str:
    events = report["events"]
    if not events:
        return '<p>None recorded.</p>'
    items = [f'<li class="ev-{escape(ev["name"])}"><span class="ev-name">{escape(ev["name"])}</span> '
             f'({escape(T.event_time(ev))}): {escape(ev["summary"])}</li>' for ev in events[:MAX_EVENTS]]
    more = f"<p>{len(events) - MAX_EVENTS} more events are in report.json.</p>" if len(events) > MAX_EVENTS else ""
    return f'<ol class="events">{"".join(items)}</ol>{more}'
