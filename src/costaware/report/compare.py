"""Several runs side by side: ranked by the monitored metric at its cost, Pareto front first.

Each run is placed by the best value of its monitored metric (``MarginalGainStopping``'s
``monitor`` when the ledger records one, else the first validation metric it recorded, ``val*``,
else its first metric; ``metric=`` / ``--metric`` overrides) against the dollars it spent in
total, every phase included (training, validation, checkpointing, probe, and strategies after
the fit such as a distilled student). Runs that
monitor different metrics are not ranked against each other: each metric is its own group. In a
group, the runs on the Pareto front (no other run has a better metric for fewer dollars) come
first, by metric; then the others, by metric, then by dollars. There is no single "metric per
dollar" score: a ratio of accuracy to dollars, or of a loss times dollars, means nothing across
runs of different lengths, so the table shows both figures and the front.

Example::

    from costaware.report import compare_runs
    from costaware.report.compare import render_compare_text

    result = compare_runs(["runs/lora", "runs/full"], metric="val_acc", mode="max")
    print(render_compare_text(result))
"""

from __future__ import annotations

import re
from html import escape
from pathlib import Path, PurePath
from typing import Optional, Sequence

from costaware.ledger import LedgerError
from costaware.records import MarginalGainPolicyEvent
from costaware.report import text as T
from costaware.report.build import PathLike, finite_number, guess_mode, load_ledger, report_from_contents
from costaware.report.plots import PALETTE, Line, line_chart

MODES = ("max", "min")

#: Most points kept per run's metric curve: several runs' curves share one chart, so fewer than a
#: single report's plots.
CURVE_POINTS = 400

_COST_PREFIXES = ("cost/", "throughput/", "gpu/", "host/")


class CompareError(ValueError):
    """The runs cannot be compared (none of them readable)."""


class MetricNotFound(CompareError):
    """The metric asked for is recorded by none of the runs."""


def compare_runs(sources: Sequence[PathLike], metric: Optional[str] = None, mode: Optional[str] = None) -> dict:
    """Rank runs by their monitored metric at its cost, in one group per metric.

    Args:
        sources: run directories or ledger paths.
        metric: the metric to rank every run by; default each run's monitored metric
            (``MarginalGainStopping``'s, else the first it recorded), grouped by metric.
        mode: ``"max"`` or ``"min"`` (which value is best); default the run's policy's mode, else
            ``"min"`` for names that read as a loss or an error, else ``"max"``.

    Returns:
        A dict with ``groups`` (one per metric, largest first: ``metric``, ``mode``, ``runs``
        ranked best first), ``metric``/``mode``/``runs`` of the first group, ``unranked`` (runs
        without the metric) and ``errors`` (sources that could not be read).

    Raises:
        CompareError: no source readable.
        MetricNotFound: ``metric`` is recorded by none of the runs.
        ValueError: a bad ``mode``.
    """
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    loaded, errors = _load_runs(sources)
    if metric is not None and not any(r.name == metric for run in loaded for r in run["records"]):
        available = sorted({r.name for run in loaded for r in run["records"]})
        raise MetricNotFound(f"metric {metric!r} is recorded by none of the runs; recorded: "
                             f"{', '.join(available) or 'none'}")
    names = run_labels([run["source"] for run in loaded], [run["report"]["run"]["run_id"] for run in loaded])
    groups: dict = {}
    unranked = []
    monitored_by = [_monitored(run, metric) for run in loaded]
    modes = _mode_per_metric(monitored_by, mode)
    for run, name, (monitored, _) in zip(loaded, names, monitored_by):
        entry = _entry(run, name, monitored)
        if monitored is None:
            unranked.append({**entry, "reason": "no metric recorded"})
            continue
        entry_mode = modes[monitored]
        points = [(value, usd, r.step) for r in run["records"] if r.name == monitored
                  for value, usd in [(finite_number(r.value), finite_number(r.usd))]
                  if value is not None and usd is not None]
        if not points:
            recorded = any(r.name == monitored for r in run["records"])
            unranked.append({**entry, "reason": f"no finite {monitored} with its cost recorded" if recorded
                             else f"no {monitored} recorded"})
            continue
        best = (max if entry_mode == "max" else min)(points, key=lambda p: p[0])
        series = run["report"]["series"]["metrics"].get(monitored, {"usd": [], "value": []})
        entry.update(best=best[0], usd_at_best=best[1], step_at_best=best[2], evaluations=len(points),
                     curve_usd=series["usd"], curve_value=series["value"])
        groups.setdefault((monitored, entry_mode), []).append(entry)
    ranked = [{"metric": m, "mode": md, "runs": _rank(runs, md)} for (m, md), runs in groups.items()]
    ranked.sort(key=lambda g: -len(g["runs"]))
    first = ranked[0] if ranked else {"metric": metric, "mode": mode, "runs": []}
    return {"groups": ranked, "metric": first["metric"], "mode": first["mode"], "runs": first["runs"],
            "unranked": unranked, "errors": errors}


def _monitored(run: dict, metric: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    """The metric a run is ranked by, and the mode its policy gave it (None if no policy)."""
    policy = next((e for e in run["events"] if isinstance(e, MarginalGainPolicyEvent) and e.monitor), None)
    if metric is not None:
        if policy is not None and policy.monitor == metric and policy.mode in MODES:
            return metric, policy.mode
        return metric, None
    if policy is not None:
        return policy.monitor, policy.mode if policy.mode in MODES else None
    names = list(dict.fromkeys(r.name for r in run["records"]))
    validation = [n for n in names if n.lower().startswith(("val", "valid"))]  # not a training loss logged per step
    return (validation or names or [None])[0], None


def _entry(run: dict, name: str, metric: Optional[str]) -> dict:
    report = run["report"]
    phases = report.get("phases") or {}
    total = phases.get("total_usd") if report["totals"]["usd"] is not None else None
    return {"name": name, "source": run["source"], "run_id": report["run"]["run_id"], "metric": metric,
            "usd": total, "metered_usd": report["totals"]["usd"],
            "strategies_usd": next((r["usd"] for r in phases.get("rows") or [] if r["phase"] == "strategies"), 0.0),
            "stages_after_fit_usd": sum(r["usd"] for r in phases.get("rows") or []
                                        if r.get("after_fit") and r["phase"] != "strategies"),
            "how": report["outcome"]["how"], "stopped_by": report["outcome"].get("stopped_by"),
            "complete": report["ledger"]["complete"],
            "trusted": report["ledger"]["trusted"], "problems": report["problems"]}


def _mode_per_metric(monitored_by: list, mode: Optional[str]) -> dict:
    """One mode per metric, so runs of one metric are ranked in one group: the mode given, else
    the one most of the runs' policies state for it (the first on a tie), else a guess from its name."""
    stated: dict = {}
    for monitored, policy_mode in monitored_by:
        if monitored is not None:
            stated.setdefault(monitored, [])
            if policy_mode is not None:
                stated[monitored].append(policy_mode)
    return {m: mode or (max(dict.fromkeys(said), key=said.count) if said else guess_mode(m))
            for m, said in stated.items()}


def _rank(runs: list[dict], mode: str) -> list[dict]:
    """The Pareto front first, by metric; then the others, by metric, then dollars."""
    _mark_pareto(runs, mode)
    sign = 1.0 if mode == "max" else -1.0
    runs.sort(key=lambda r: (not r["pareto"], -sign * r["best"], r["usd"] is None, r["usd"] or 0.0))
    for rank, run in enumerate(runs, start=1):
        run["rank"] = rank
    return runs


def _load_runs(sources: Sequence[PathLike]) -> tuple[list[dict], list[str]]:
    """Each readable run's report and metric records; an error line for each unreadable one."""
    loaded, errors = [], []
    for source in sources:
        try:
            path, contents, trusted = load_ledger(source)
        except (LedgerError, OSError) as err:
            errors.append(f"{source}: {err}")
            continue
        report = report_from_contents(path, contents, trusted, CURVE_POINTS)
        records = [m for m in contents.metrics if isinstance(m.name, str) and not m.name.startswith(_COST_PREFIXES)]
        loaded.append({"source": str(source), "report": report, "records": records, "events": contents.events})
    if not loaded:
        raise CompareError("no run could be read: " + "; ".join(errors))
    return loaded, errors


def _mark_pareto(runs: list[dict], mode: str) -> None:
    sign = 1.0 if mode == "max" else -1.0
    for run in runs:
        if run["usd"] is None:  # a run whose total cost is not recorded cannot be placed on the front
            run["pareto"] = False
            continue
        run["pareto"] = not any(
            other is not run and other["usd"] is not None
            and other["usd"] <= run["usd"] and sign * other["best"] >= sign * run["best"]
            and (other["usd"] < run["usd"] or sign * other["best"] > sign * run["best"])
            for other in runs
        )


def run_labels(sources: list[str], run_ids: list) -> list[str]:
    """Short, readable names for runs: their paths less the parts every run shares (a leading
    ``runs/``, a trailing ``costaware/ledger.jsonl``), e.g. ``lora/version_0`` and ``full/version_0``;
    a run id suffix tells apart runs that would still share a name."""
    parts = [_meaningful_parts(s) for s in sources]
    if len(parts) > 1:
        lead = _shared(parts)
        trail = _shared([p[::-1] for p in parts])
        parts = [p[lead:len(p) - trail] or p[max(lead - 1, 0):] or p for p in parts]
    names = ["/".join(p) or str(s) for p, s in zip(parts, sources)]
    names = [n if len(n) <= 48 else "..." + n[-45:] for n in names]
    counts = {n: names.count(n) for n in names}
    return [f"{n} ({str(rid)[:8]})" if counts[n] > 1 and rid else n for n, rid in zip(names, run_ids)]


def _shared(lists: list[list[str]]) -> int:
    """How many leading items every list shares."""
    count = 0
    for items in zip(*lists):
        if len(set(items)) > 1:
            break
        count += 1
    return count


def _meaningful_parts(source: str) -> list[str]:
    parts = [p for p in PurePath(source).parts if p not in ("", ".", "/")]
    while parts and parts[-1] in ("ledger.jsonl", "costaware"):
        parts.pop()
    return parts


# ------------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------------


def table_rows(group: dict) -> tuple[list[str], list[list[str]]]:
    """One group's ranking: rank, run, best metric, total dollars (every phase), where the best was."""
    metric = group["metric"]
    head = ["rank", "run", f"best {metric} ({group['mode']})", "total $", "$ at best", "step at best", "Pareto",
            "ended", "notes"]
    rows = []
    for run in group["runs"]:
        rows.append([str(run["rank"]), run["name"], f"{run['best']:.4g}", T.recorded(run["usd"], T.usd),
                     T.usd(run["usd_at_best"]), T.cell(run["step_at_best"]), "*" if run["pareto"] else "",
                     run["how"], "; ".join(_notes(run))])
    return head, rows


def _notes(run: dict) -> list[str]:
    notes = [] if run["complete"] else ["no end record"]
    if run.get("stopped_by"):  # Lightning's EarlyStopping, max_time: its name, without the details
        notes.append("stopped early by " + run["stopped_by"].split("(")[0].split(":")[0].strip())
    if run.get("strategies_usd"):
        notes.append(f"total includes {T.usd(run['strategies_usd'])} of strategies after the fit")
    if run.get("stages_after_fit_usd"):
        notes.append(f"total includes {T.usd(run['stages_after_fit_usd'])} of test/validate/predict after the fit")
    if not run["trusted"]:
        notes.append("ledger not trusted")
    if run["problems"]:
        notes.append(f"{len(run['problems'])} problem(s)")
    return notes


def unranked_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    head = ["run", "total $", "why not ranked"]
    return head, [[run["name"], T.recorded(run["usd"], T.usd), run["reason"]] for run in result["unranked"]]


def render_compare_text(result: dict) -> str:
    """The rankings as plain-text tables, one per monitored metric (what ``costaware compare`` prints)."""
    out = []
    if len(result["groups"]) > 1:
        out.append(f"The runs monitor {len(result['groups'])} different metrics: each is ranked only against runs "
                   "that monitor the same one.\n")
    for group in result["groups"]:
        out.append(f"{group['metric']} ({group['mode']} is best): {len(group['runs'])} run(s), the Pareto front "
                   "first")
        out.append(T.text_table(*table_rows(group)) + "\n")
    if result["unranked"]:
        out.append("Not ranked:")
        out.append(T.text_table(*unranked_rows(result)) + "\n")
    out.append("* on the Pareto front: no other run has a better metric for fewer dollars. total $: every phase "
               "(training, validation, checkpointing, probe, and strategies after the fit).")
    return "\n".join(out)


def render_compare_svg(result: dict) -> str:
    """The Pareto plot of every group, stacked (largest group first): each run's metric against
    dollars, its best point, the front. One group's plot is returned as it is."""
    groups = result["groups"] or [{"metric": result["metric"], "mode": result["mode"], "runs": []}]
    charts = [_group_svg(group, i) for i, group in enumerate(groups)]
    if len(charts) == 1:
        return charts[0]
    sizes = [_svg_size(chart) for chart in charts]
    width, y, parts = max(w for w, _ in sizes), 0, []
    for chart, (_, height) in zip(charts, sizes):
        parts.append(chart.replace("<svg ", f'<svg x="0" y="{y}" ', 1))  # a nested svg placed at y
        y += height
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{y}" viewBox="0 0 {width} {y}">'
            + "".join(parts) + "</svg>")


def _svg_size(svg: str) -> tuple[int, int]:
    """An svg's ``width`` and ``height`` attributes, pixels."""
    head = svg[:svg.index(">")]
    width, height = (re.search(rf'\b{name}="(\d+)', head) for name in ("width", "height"))
    return (int(width.group(1)) if width else 400), (int(height.group(1)) if height else 40)


def _group_svg(group: dict, index: int) -> str:
    metric = str(group["metric"])
    lines = []
    for i, run in enumerate(group["runs"]):
        color = PALETTE[i % len(PALETTE)]
        if len(run["curve_usd"]) > 1:
            lines.append(Line(f"{run['name']} ({metric} over the run)", run["curve_usd"], run["curve_value"], color,
                              css_class="run-curve", legend=False))
        if run["usd"] is None:  # no total cost recorded: nowhere to put it on the dollars axis
            continue
        lines.append(Line(f"#{run['rank']} {run['name']}", [run["usd"]], [run["best"]], color, style="points",
                          css_class="run-best",
                          point_labels=[f"#{run['rank']} {run['name']}: {run['best']:.4g}, {T.usd(run['usd'])}"]))
    front = sorted((r for r in group["runs"] if r["pareto"] and r["usd"] is not None), key=lambda r: r["usd"])
    if len(front) > 1:
        lines.append(Line("Pareto front", [r["usd"] for r in front], [r["best"] for r in front], "#000", style="step",
                          dashed=True, css_class="pareto"))
    svg = line_chart(lines, title=f"{metric} against dollars ({group['mode']} is best)", x_label="dollars spent",
                     y_label=metric, y_from_zero=False, x_fmt=T.usd, css_id=f"chart-pareto-{index}", height=420)
    return svg or ('<svg xmlns="http://www.w3.org/2000/svg" width="400" height="40"><text x="10" y="24">'
                   f'no run records {escape(metric)}</text></svg>')


def render_compare_html(result: dict) -> str:
    """A standalone page: per monitored metric, the ranking table and the Pareto plot."""
    from costaware.report.html import CSP, STYLE

    def table(head: list[str], rows: list[list[str]], css_id: str) -> str:
        th = "".join(f"<th>{escape(h)}</th>" for h in head)
        body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows)
        return f'<table id="{css_id}"><tr>{th}</tr>{body}</table>'

    title = "costaware: runs compared by their monitored metric at its cost"
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
           f"<title>{escape(title)}</title><style>{STYLE}</style></head><body>", f"<h1>{escape(title)}</h1>",
           '<p class="meta">* marks the Pareto front (no other run has a better metric for fewer dollars); total $ '
           "includes every phase. Runs that monitor different metrics are not ranked against each other.</p>"]
    for i, group in enumerate(result["groups"]):
        out += [f"<h2>{escape(group['metric'])} ({escape(group['mode'])} is best)</h2>",
                table(*table_rows(group), f"ranking-{i}"), _group_svg(group, i)]
    if result["unranked"]:
        out += ["<h2>Not ranked</h2>", table(*unranked_rows(result), "unranked")]
    if result["errors"]:
        errors = "".join(f"<li>{escape(e)}</li>" for e in result["errors"])
        out.append(f'<div class="problems"><strong>Skipped</strong><ul>{errors}</ul></div>')
    out.append("</body></html>")
    return "\n".join(out)


def write_compare(result: dict, out: PathLike) -> Path:
    """Write the comparison to ``out``: an SVG plot if it ends in ``.svg``, else an HTML page."""
    from costaware.report.write import atomic_write

    out = Path(out)
    text = render_compare_svg(result) if out.suffix.lower() == ".svg" else render_compare_html(result)
    return atomic_write(out, text + "\n")
