"""Several runs side by side: ranked by metric per dollar, with their Pareto front.

A run's score is its best value of the chosen metric per dollar it spent in total
(``mode="max"``: ``best / usd``, higher is better). For a metric where lower is better
(``mode="min"``, a loss) the score is ``1 / (best x usd)``, so a run that halves either the loss
or the bill doubles its score. Runs whose score cannot be computed (no cost recorded, a
non-positive metric) are ranked after the others, by the Pareto front then by value. The Pareto
front is the set of runs that no other run beats on both the metric and the dollars.

Example::

    from costaware.report import compare_runs
    from costaware.report.compare import render_compare_text

    result = compare_runs(["runs/lora", "runs/full"], metric="val_acc", mode="max")
    print(render_compare_text(result))
"""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Optional, Sequence

from costaware.ledger import LedgerError
from costaware.report import text as T
from costaware.report.build import PathLike, finite_number, guess_mode, load_ledger, report_from_contents
from costaware.report.plots import PALETTE, Line, line_chart

MODES = ("max", "min")

#: Most points kept per run's metric curve: several runs' curves share one chart, so fewer than a
#: single report's plots.
CURVE_POINTS = 400

_COST_PREFIXES = ("cost/", "throughput/", "gpu/", "host/")


class CompareError(ValueError):
    """The runs cannot be compared (no metric in common, or none of them readable)."""


class MetricNotFound(CompareError):
    """The metric asked for is recorded by none of the runs."""


def compare_runs(sources: Sequence[PathLike], metric: Optional[str] = None, mode: Optional[str] = None) -> dict:
    """Rank runs by metric per dollar.

    Args:
        sources: run directories or ledger paths.
        metric: the metric to rank by; default the first non-cost metric recorded by every run.
        mode: ``"max"`` or ``"min"`` (which value of the metric is best); default ``"min"`` for
            names that read as a loss or an error, else ``"max"``.

    Returns:
        A dict with ``metric``, ``mode``, ``runs`` (ranked, best first), ``unranked`` (runs
        without the metric) and ``errors`` (sources that could not be read).

    Raises:
        CompareError: no source readable, or no metric in common.
        MetricNotFound: ``metric`` is recorded by none of the runs.
        ValueError: a bad ``mode``.
    """
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    loaded, errors = _load_runs(sources)
    metric = _pick_metric(loaded, metric)
    mode = mode or guess_mode(metric)
    display = _display_names([run["source"] for run in loaded], [run["report"]["run"]["run_id"] for run in loaded])
    runs, unranked = [], []
    for run, name in zip(loaded, display):
        report = run["report"]
        # A point counts only with a finite value and a finite cost: a NaN (diverged) value or a
        # missing / non-numeric dollar figure says nothing about metric per dollar.
        points = [(value, usd, r.step) for r in run["records"] if r.name == metric
                  for value, usd in [(finite_number(r.value), finite_number(r.usd))]
                  if value is not None and usd is not None]
        entry = {"name": name, "source": run["source"], "run_id": report["run"]["run_id"],
                 "usd": report["totals"]["usd"], "complete": report["ledger"]["complete"],
                 "trusted": report["ledger"]["trusted"], "problems": report["problems"]}
        if not points:
            recorded = any(r.name == metric for r in run["records"])
            unranked.append({**entry, "reason": f"no finite {metric} with its cost recorded" if recorded
                             else f"no {metric} recorded"})
            continue
        pick = max if mode == "max" else min
        best = pick(points, key=lambda p: p[0])
        series = report["series"]["metrics"].get(metric, {"usd": [], "value": []})
        entry.update(best=best[0], usd_at_best=best[1], step_at_best=best[2], evaluations=len(points),
                     curve_usd=series["usd"], curve_value=series["value"], score=_score(best[0], entry["usd"], mode))
        runs.append(entry)
    _mark_pareto(runs, mode)
    sign = 1.0 if mode == "max" else -1.0
    runs.sort(key=lambda r: (r["score"] is None, -(r["score"] or 0.0), not r["pareto"], -sign * r["best"],
                             r["usd"] is None, r["usd"] or 0.0))
    for rank, run in enumerate(runs, start=1):
        run["rank"] = rank
    return {"metric": metric, "mode": mode,
            "score_name": f"{metric} per $" if mode == "max" else f"1 / ({metric} x $)",
            "runs": runs, "unranked": unranked, "errors": errors}


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
        loaded.append({"source": str(source), "report": report, "records": records})
    if not loaded:
        raise CompareError("no run could be read: " + "; ".join(errors))
    return loaded, errors


def _pick_metric(loaded: list[dict], metric: Optional[str]) -> str:
    """The metric asked for (recorded by at least one run), else the first every run records."""
    names = [list(dict.fromkeys(r.name for r in run["records"])) for run in loaded]
    if metric is None:
        common = [n for n in names[0] if all(n in other for other in names[1:])]
        if not common:
            listed = "; ".join(f"{run['source']}: {', '.join(n) or 'none'}" for run, n in zip(loaded, names))
            raise CompareError(f"no metric is recorded by every run (give --metric NAME). Metrics per run: {listed}")
        return common[0]
    if not any(metric in n for n in names):
        available = sorted({x for n in names for x in n})
        raise MetricNotFound(f"metric {metric!r} is recorded by none of the runs; recorded: "
                             f"{', '.join(available) or 'none'}")
    return metric


def _score(best: float, usd: Optional[float], mode: str) -> Optional[float]:
    if usd is None or usd <= 0 or best <= 0:
        return None
    return best / usd if mode == "max" else 1.0 / (best * usd)


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


def _display_names(sources: list[str], run_ids: list) -> list[str]:
    names = [s.rstrip("/") or s for s in sources]
    seen: dict[str, int] = {}
    for n in names:
        seen[n] = seen.get(n, 0) + 1
    return [f"{n} ({str(rid)[:8]})" if seen[n] > 1 and rid else n for n, rid in zip(names, run_ids)]


# ------------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------------


def table_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    metric = result["metric"]
    head = ["rank", "run", f"best {metric} ({result['mode']})", "total $", result["score_name"], "$ at best",
            "step at best", "Pareto", "notes"]
    rows = []
    for run in result["runs"]:
        notes = [] if run["complete"] else ["no end record"]
        if not run["trusted"]:
            notes.append("ledger not trusted")
        if run["problems"]:
            notes.append(f"{len(run['problems'])} problem(s)")
        rows.append([str(run["rank"]), run["name"], f"{run['best']:.4g}", T.recorded(run["usd"], T.usd),
                     f"{run['score']:.4g}" if run["score"] is not None else "n/a", T.usd(run["usd_at_best"]),
                     T.cell(run["step_at_best"]), "*" if run["pareto"] else "", "; ".join(notes)])
    for run in result["unranked"]:
        rows.append(["-", run["name"], "n/a", T.recorded(run["usd"], T.usd), "n/a", "", "", "", run["reason"]])
    return head, rows


def render_compare_text(result: dict) -> str:
    """The ranking as a plain-text table (what ``costaware compare`` prints)."""
    return (T.text_table(*table_rows(result))
            + f"\n\n* on the Pareto front: no other run has a better {result['metric']} for fewer dollars.")


def render_compare_svg(result: dict) -> str:
    """The Pareto plot: each run's metric against dollars, its best point, and the front."""
    metric = result["metric"]
    lines = []
    for i, run in enumerate(result["runs"]):
        color = PALETTE[i % len(PALETTE)]
        if len(run["curve_usd"]) > 1:
            lines.append(Line(f"{run['name']} ({metric} over the run)", run["curve_usd"], run["curve_value"], color,
                              css_class="run-curve", legend=False))
        if run["usd"] is None:  # no total cost recorded: nowhere to put it on the dollars axis
            continue
        lines.append(Line(f"#{run['rank']} {run['name']}", [run["usd"]], [run["best"]], color, style="points",
                          css_class="run-best",
                          point_labels=[f"#{run['rank']} {run['name']}: {run['best']:.4g}, {T.usd(run['usd'])}"]))
    front = sorted((r for r in result["runs"] if r["pareto"]), key=lambda r: r["usd"])
    if len(front) > 1:
        lines.append(Line("Pareto front", [r["usd"] for r in front], [r["best"] for r in front], "#000", style="step",
                          dashed=True, css_class="pareto"))
    svg = line_chart(lines, title=f"{metric} against dollars ({result['mode']} is best)", x_label="dollars spent",
                     y_label=metric, y_from_zero=False, x_fmt=T.usd, css_id="chart-pareto", height=420)
    return svg or ('<svg xmlns="http://www.w3.org/2000/svg" width="400" height="40"><text x="10" y="24">'
                   f'no run records {escape(metric)}</text></svg>')


def render_compare_html(result: dict) -> str:
    """A standalone page: the ranking table and the Pareto plot."""
    from costaware.report.html import CSP, STYLE

    head, rows = table_rows(result)
    th = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    errors = "".join(f"<li>{escape(e)}</li>" for e in result["errors"])
    title = f"costaware: runs compared by {result['metric']} per dollar"
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        f"<title>{escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        f'<p class="meta">Score: {escape(result["score_name"])}; * marks the Pareto front (no other run has a '
        f'better {escape(result["metric"])} for fewer dollars).</p>',
        f'<table id="ranking"><tr>{th}</tr>{body}</table>',
        render_compare_svg(result),
        f'<div class="problems"><strong>Skipped</strong><ul>{errors}</ul></div>' if errors else "",
        "</body></html>",
    ])


def write_compare(result: dict, out: PathLike) -> Path:
    """Write the comparison to ``out``: an SVG plot if it ends in ``.svg``, else an HTML page."""
    from costaware.report.write import atomic_write

    out = Path(out)
    text = render_compare_svg(result) if out.suffix.lower() == ".svg" else render_compare_html(result)
    return atomic_write(out, text + "\n")
