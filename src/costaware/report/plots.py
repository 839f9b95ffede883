"""Charts as inline SVG strings, drawn by hand: no matplotlib, no script, no network.

The report page must open anywhere (an air-gapped cluster, an artifact viewer) and stay small,
so each chart is a few hundred SVG elements with native ``<title>`` tooltips. All text is
escaped; the same SVG is valid inside HTML and as a standalone ``.svg`` file.

Example::

    from costaware.report.plots import Line, line_chart

    svg = line_chart([Line("dollars", [0, 1, 2], [0.0, 0.5, 1.0])], title="Spend",
                     x_label="time (s)", y_label="$")
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from html import escape
from typing import Callable, Optional, Sequence

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")

_MARGIN_LEFT, _MARGIN_RIGHT, _MARGIN_TOP, _MARGIN_BOTTOM = 78, 24, 52, 46


@dataclass
class Line:
    """A series: ``style`` is ``"line"``, ``"points"`` or ``"step"``; ``dashed`` for forecasts."""

    label: str
    xs: Sequence[float]
    ys: Sequence[float]
    color: Optional[str] = None
    style: str = "line"
    dashed: bool = False
    css_class: str = "series"
    point_labels: Sequence[str] = field(default_factory=tuple)
    legend: bool = True


@dataclass
class Rule:
    """A horizontal (``axis="y"``) or vertical (``axis="x"``) reference line with a label."""

    value: float
    label: str
    axis: str = "y"
    color: str = "#555"
    css_class: str = "rule"


@dataclass
class Marker:
    """One highlighted point (a forecast, a stop) with a label."""

    x: float
    y: float
    label: str
    color: str = "#000"
    hollow: bool = False
    css_class: str = "marker"


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(1, count)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next((m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw), 10 * magnitude)
    start = math.ceil(lo / step - 1e-9) * step
    ticks: list[float] = []
    value = start
    while value <= hi + step * 1e-9 and len(ticks) < 50:
        ticks.append(0.0 if abs(value) < step * 1e-9 else value)
        value += step
    return ticks


def tick_text(value: float) -> str:
    a = abs(value)
    if a == 0:
        return "0"
    if a >= 1e5 or a < 1e-3:
        return f"{value:.3g}"
    return f"{value:.6g}"


def time_axis(max_s: float) -> tuple[float, str]:
    """(divisor, label) to show elapsed seconds in s, min or h."""
    if max_s >= 2 * 3600:
        return 3600.0, "elapsed time (h)"
    if max_s >= 120:
        return 60.0, "elapsed time (min)"
    return 1.0, "elapsed time (s)"


def _extent(values: list[float], pad_zero: bool) -> tuple[float, float]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return 0.0, 1.0
    lo, hi = min(finite), max(finite)
    if pad_zero and lo > 0 and (lo < 0.5 * hi or lo == hi):
        lo = 0.0
    if hi == lo:
        span = abs(hi) * 0.1 or 1.0
        lo, hi = lo - span, hi + span
    else:
        pad = (hi - lo) * 0.04
        lo, hi = (lo - pad if lo != 0 else lo), hi + pad
    return lo, hi


def line_chart(
    lines: Sequence[Line],
    *,
    title: str,
    x_label: str,
    y_label: str,
    rules: Sequence[Rule] = (),
    markers: Sequence[Marker] = (),
    width: int = 900,
    height: int = 320,
    y_from_zero: bool = True,
    x_fmt: Callable[[float], str] = tick_text,
    y_fmt: Callable[[float], str] = tick_text,
    css_id: Optional[str] = None,
) -> str:
    """A chart of lines/points with axes, ticks, legend, reference lines and markers.

    Returns an empty string when no series has a finite point (the caller says why instead).
    """
    series = [(line, [(x, y) for x, y in zip(line.xs, line.ys) if _finite(x) and _finite(y)]) for line in lines]
    series = [(line, pts) for line, pts in series if pts]
    if not series and not markers:
        return ""
    xs = [x for _, pts in series for x, _ in pts] + [m.x for m in markers] + [r.value for r in rules if r.axis == "x"]
    ys = [y for _, pts in series for _, y in pts] + [m.y for m in markers] + [r.value for r in rules if r.axis == "y"]
    legend, legend_rows = _legend([(line.label, line.color or PALETTE[i % len(PALETTE)], line.dashed)
                                   for i, (line, _) in enumerate(series) if line.legend], _MARGIN_LEFT, width)
    extra = 14 * max(0, legend_rows - 1)  # a long legend pushes the plot down, never over it
    plot_w, plot_h = width - _MARGIN_LEFT - _MARGIN_RIGHT, height - _MARGIN_TOP - _MARGIN_BOTTOM
    frame = _Frame(_MARGIN_LEFT, _MARGIN_TOP + extra, plot_w, plot_h, _extent(xs, pad_zero=True),
                   _extent(ys, pad_zero=y_from_zero))
    height += extra
    parts = [_open(width, height, title, css_id), *_axes(frame, height, x_label, y_label, x_fmt, y_fmt)]
    parts += [_rule(frame, rule) for rule in rules]
    parts += [_series(frame, line, pts, line.color or PALETTE[i % len(PALETTE)], x_fmt, y_fmt)
              for i, (line, pts) in enumerate(series)]
    parts += [_marker(frame, marker) for marker in markers]
    parts.append(legend)
    parts.append("</svg>")
    return "".join(parts)


@dataclass
class _Frame:
    """Where a chart's plot area lies (pixels) and what it shows (data extents): maps data to pixels."""

    left: float
    top: float
    plot_w: float
    plot_h: float
    x_range: tuple[float, float]
    y_range: tuple[float, float]

    def px(self, x: float) -> float:
        x0, x1 = self.x_range
        return self.left + (x - x0) / (x1 - x0) * self.plot_w

    def py(self, y: float) -> float:
        y0, y1 = self.y_range
        return self.top + self.plot_h - (y - y0) / (y1 - y0) * self.plot_h

    @property
    def right(self) -> float:
        """Labels of points right of this go to their left."""
        return self.left + 0.7 * self.plot_w


def _axes(f: _Frame, height: int, x_label: str, y_label: str, x_fmt: Callable, y_fmt: Callable) -> list[str]:
    """The plot area, its grid, tick labels and axis titles."""
    left, top, plot_w, plot_h = f.left, f.top, f.plot_w, f.plot_h
    parts = [f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fff" stroke="#ccc"/>']
    for tick in nice_ticks(*f.y_range):
        y = f.py(tick)
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" stroke="#eee"/>'
                     f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">'
                     f'{escape(y_fmt(tick))}</text>')
    for tick in nice_ticks(*f.x_range, 6):
        x = f.px(tick)
        parts.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + plot_h}" stroke="#f3f3f3"/>'
                     f'<text x="{x:.1f}" y="{top + plot_h + 16}" text-anchor="middle" class="tick">'
                     f'{escape(x_fmt(tick))}</text>')
    parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 8}" text-anchor="middle" class="axis">'
                 f'{escape(x_label)}</text>')
    parts.append(f'<text transform="translate(14,{top + plot_h / 2:.1f}) rotate(-90)" text-anchor="middle" '
                 f'class="axis">{escape(y_label)}</text>')
    return parts


def _rule(f: _Frame, rule: Rule) -> str:
    """A dashed reference line across the plot (a cap, a forecast), labelled."""
    head = f'<g class="{escape(rule.css_class)}"><title>{escape(rule.label)}</title>'
    if rule.axis == "y":
        y = f.py(rule.value)
        return (head + f'<line x1="{f.left}" y1="{y:.1f}" x2="{f.left + f.plot_w}" y2="{y:.1f}" stroke="{rule.color}" '
                f'stroke-dasharray="6 4" stroke-width="1.5"/><text x="{f.left + 4}" y="{y - 4:.1f}" '
                f'class="note" fill="{rule.color}">{escape(_clip(rule.label))}</text></g>')
    x = f.px(rule.value)
    return (head + f'<line x1="{x:.1f}" y1="{f.top}" x2="{x:.1f}" y2="{f.top + f.plot_h}" stroke="{rule.color}" '
            f'stroke-dasharray="4 3" stroke-width="1.5"/>{_label(x, f.top + 12, rule.label, rule.color, f.right)}'
            f'</g>')


def _series(f: _Frame, line: Line, pts: list, color: str, x_fmt: Callable, y_fmt: Callable) -> str:
    """One series: a polyline (or steps), and its points where there are few enough to show."""
    parts = [f'<g class="{escape(line.css_class)}"><title>{escape(line.label)}</title>']
    if line.style in ("line", "step") and len(pts) > 1:
        coords = []
        for j, (x, y) in enumerate(pts):
            if line.style == "step" and j:
                coords.append(f"{f.px(x):.1f},{f.py(pts[j - 1][1]):.1f}")
            coords.append(f"{f.px(x):.1f},{f.py(y):.1f}")
        dash = ' stroke-dasharray="6 4"' if line.dashed else ""
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2"{dash} '
                     f'points="{" ".join(coords)}"/>')
    if line.style == "points" or len(pts) == 1 or (line.style == "line" and len(pts) <= 40):
        radius = 4 if line.style == "points" else 2.5
        for j, (x, y) in enumerate(pts):
            tip = line.point_labels[j] if j < len(line.point_labels) else f"{line.label}: {y_fmt(y)} at {x_fmt(x)}"
            parts.append(f'<circle cx="{f.px(x):.1f}" cy="{f.py(y):.1f}" r="{radius}" fill="{color}">'
                         f'<title>{escape(tip)}</title></circle>')
            if line.style == "points" and j < len(line.point_labels):
                parts.append(_label(f.px(x), f.py(y) - 8, _clip(line.point_labels[j], 36), "#222", f.right))
    parts.append("</g>")
    return "".join(parts)


def _marker(f: _Frame, marker: Marker) -> str:
    fill = "#fff" if marker.hollow else marker.color
    x, y = f.px(marker.x), f.py(marker.y)
    return (f'<g class="{escape(marker.css_class)}"><title>{escape(marker.label)}</title>'
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="5.5" fill="{fill}" stroke="{marker.color}" stroke-width="2"/>'
            f'{_label(x, y + 16, marker.label, marker.color, f.right)}</g>')


@dataclass
class Bar:
    """One bar; ``value=None`` draws the ``note`` (e.g. "not measured: no GPU") instead of a bar."""

    label: str
    value: Optional[float]
    note: str = ""
    color: Optional[str] = None


def bar_chart(bars: Sequence[Bar], *, title: str, value_fmt: Callable[[float], str] = tick_text,
              width: int = 900, css_id: Optional[str] = None) -> str:
    """Horizontal bars with their figures; unmeasured parts are said in words, not drawn as zero."""
    if not bars:
        return ""
    row_h, label_w, top = 30, 150, 40
    height = top + row_h * len(bars) + 12
    peak = max([b.value for b in bars if b.value is not None and math.isfinite(b.value)] + [0.0])
    bar_w = width - label_w - 380
    parts = [_open(width, height, title, css_id)]
    for i, bar in enumerate(bars):
        y = top + i * row_h
        color = bar.color or PALETTE[i % len(PALETTE)]
        parts.append(f'<g class="bar"><title>{escape(bar.label)}: '
                     f'{escape(value_fmt(bar.value) if bar.value is not None else bar.note)}</title>'
                     f'<text x="{label_w - 8}" y="{y + 18}" text-anchor="end" class="axis">'
                     f'{escape(_clip(bar.label, 24))}'
                     f'</text>')
        if bar.value is None:
            parts.append(f'<text x="{label_w}" y="{y + 18}" class="missing">{escape(_clip(bar.note, 90))}</text>')
        else:
            length = 0.0 if peak <= 0 else max(0.0, bar.value) / peak * bar_w
            text = value_fmt(bar.value) + (f"  ({bar.note})" if bar.note else "")
            parts.append(f'<rect x="{label_w}" y="{y + 5}" width="{length:.1f}" height="{row_h - 10}" fill="{color}"/>'
                         f'<text x="{label_w + length + 6:.1f}" y="{y + 19}" class="tick">{escape(_clip(text, 58))}'
                         f'</text>')
        parts.append("</g>")
    parts.append("</svg>")
    return "".join(parts)


def _open(width: int, height: int, title: str, css_id: Optional[str]) -> str:
    ident = f' id="{escape(css_id)}"' if css_id else ""
    return (f'<svg xmlns="http://www.w3.org/2000/svg"{ident} class="chart" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" font-family="sans-serif" font-size="12">'
            f'<title>{escape(title)}</title>'
            f'<text x="{_MARGIN_LEFT}" y="18" class="title" font-size="15" font-weight="bold">{escape(title)}</text>')


def _legend(items: list[tuple[str, str, bool]], left: int, width: int) -> tuple[str, int]:
    """The legend's SVG and how many rows it takes (it wraps at the chart's width)."""
    if not items:
        return "", 0
    parts, x, y, rows = [], float(left), 38.0, 1
    for label, color, dashed in items:
        text = _clip(label, 40)
        span = 30 + 7 * len(text)
        if x + span > width - 10 and x > left:
            x, y, rows = float(left), y + 14, rows + 1
        dash = ' stroke-dasharray="5 3"' if dashed else ""
        parts.append(f'<line x1="{x:.0f}" y1="{y - 4:.0f}" x2="{x + 18:.0f}" y2="{y - 4:.0f}" stroke="{color}" '
                     f'stroke-width="3"{dash}/><text x="{x + 22:.0f}" y="{y:.0f}" class="legend">{escape(text)}</text>')
        x += span
    return f'<g class="legend">{"".join(parts)}</g>', rows


def _label(x: float, y: float, text: str, color: str, right: float) -> str:
    """A note beside a point, on its left when the point is near the right edge."""
    if x > right:
        return (f'<text x="{x - 6:.1f}" y="{y:.1f}" text-anchor="end" class="note" fill="{color}">'
                f'{escape(_clip(text))}</text>')
    return f'<text x="{x + 6:.1f}" y="{y:.1f}" class="note" fill="{color}">{escape(_clip(text))}</text>'


def _clip(text: str, limit: int = 48) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
