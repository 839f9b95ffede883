"""A report dict as Markdown (``report.md``, and the text TensorBoard shows).

Every piece of text that comes from the run (run id, metric names, event fields, paths) is
escaped, so a metric called ``<script>`` or ``a|b`` stays text in any Markdown renderer.

Example::

    from costaware.report import build_report, render_markdown

    print(render_markdown(build_report("lightning_logs/version_0")))
"""

from __future__ import annotations

import re

from costaware.report import text as T

_MD_SPECIAL = re.compile(r"([\\`*_\[\]{}#|!~])")

#: Most events listed in the Markdown; report.json holds them all.
MAX_EVENTS = 200


def escape(value: object) -> str:
    """Text safe inside Markdown paragraphs and table cells (HTML-escaped, markup backslashed)."""
    text = str(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    text = _MD_SPECIAL.sub(r"\\\1", text)
    return text.replace("\r", " ").replace("\n", " ")


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(escape(h) for h in head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(escape(c) for c in row) + " |" for row in rows]
    return lines


def _pairs(rows: list[tuple[str, str]]) -> list[str]:
    return _table(["", ""], [[a, b] for a, b in rows])


def render_markdown(report: dict) -> str:
    """The whole report as Markdown."""
    out = [f"# {escape(T.title(report))}", ""]
    ledger = report["ledger"]
    out += [f"Ledger: {escape(ledger['path'])} (schema {escape(ledger['schema'])}, "
            f"{'complete' if ledger['complete'] else 'no end record'}). "
            f"Generated {escape(report['generated_at'])} by costaware {escape(report['costaware_version'])}.", ""]
    if report["problems"]:
        out += ["**Problems with the ledger** (the report shows what could be read):", ""]
        out += [f"- {escape(p)}" for p in report["problems"]] + [""]
    out += ["## Summary", ""] + _pairs(T.summary_rows(report)) + [""]
    breakdown = T.breakdown_rows(report)
    if breakdown:
        out += ["## Where the dollars went", ""] + _pairs(breakdown) + [""]
    head, rows = T.phase_table(report)
    if rows:
        out += ["## Where the time and dollars went, by phase", ""] + _table(head, rows) + [""]
    out += ["## Prices and carbon intensity", ""] + _pairs(T.price_rows(report)) + [""]
    out += ["## Meters", ""] + _pairs(T.meter_rows(report)) + [""]
    head, rows = T.metric_rows(report)
    out += ["## Metrics", ""]
    out += (_table(head, rows) if rows else ["No metric was recorded (metrics are recorded at validation)."]) + [""]
    events = report["events"]
    out += ["## Decisions and events", ""]
    if not events:
        out += ["None recorded."]
    for event in events[:MAX_EVENTS]:
        out.append(f"- **{escape(event['name'])}** ({escape(T.event_time(event))}): {escape(event['summary'])}")
    if len(events) > MAX_EVENTS:
        out.append(f"- ... {len(events) - MAX_EVENTS} more in report.json")
    out.append("")
    head, rows = T.strategy_table(report)
    if rows:
        out += ["## Teacher, student and quantized results", ""] + _table(head, rows) + [""]
    if report["notes"]:
        out += ["## Notes", ""] + [f"- {escape(n)}" for n in report["notes"]] + [""]
    return "\n".join(out)
