"""Small SVG charts for the dashboard, drawn on the server: line charts and (grouped) bar charts.

Inline SVG needs no JavaScript, no chart library and no network, passes the
dashboard's strict Content-Security-Policy (colours are SVG attributes, not
inline styles), and every point carries a ``<title>`` the browser shows as a
tooltip. The live panels redraw by re-fetching their HTML fragment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from markupsafe import Markup, escape

PALETTE = ("#2563eb", "#f97316", "#16a34a", "#9333ea", "#dc2626", "#0891b2")
STATUS_COLOURS = {
    "succeeded": "#16a34a",
    "rejected": "#f59e0b",
    "failed": "#dc2626",
    "skipped": "#9ca3af",
    "running": "#2563eb",
    "queued": "#93c5fd",
}
PAD_LEFT, PAD_RIGHT, PAD_TOP, PAD_BOTTOM = 56, 16, 28, 46


@dataclass
class Series:
    name: str
    values: list[float | None]  # None leaves a gap
    colour: str | None = None
    dashed: bool = False


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten) covering [low, high]."""
    if not math.isfinite(low) or not math.isfinite(high):
        return [0.0, 1.0]
    if high <= low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / max(count, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    start = math.floor(low / step) * step
    ticks = []
    value = start
    while value < high + step * 0.5:
        ticks.append(round(value, 12))
        value += step
    return ticks


def _format(value: float, unit: str = "") -> str:
    if value == 0:
        text = "0"
    elif abs(value) >= 100:
        text = f"{value:,.0f}"
    elif abs(value) >= 1:
        text = f"{value:.3g}"
    else:
        text = f"{value:.3f}".rstrip("0").rstrip(".")
    return text + unit


def _frame(width: int, height: int, title: str, ticks: list[float], y_of, unit: str) -> list[str]:
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
        f'<text x="{PAD_LEFT}" y="16" font-size="13" font-weight="600" fill="#111827">{escape(title)}</text>',
    ]
    for tick in ticks:
        y = y_of(tick)
        out.append(f'<line x1="{PAD_LEFT}" x2="{width - PAD_RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e7eb"/>')
        out.append(
            f'<text x="{PAD_LEFT - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end" fill="#4b5563">'
            f"{escape(_format(tick, unit))}</text>"
        )
    out.append(f'<line x1="{PAD_LEFT}" x2="{PAD_LEFT}" y1="{PAD_TOP}" y2="{height - PAD_BOTTOM}" stroke="#9ca3af"/>')
    return out


def _x_labels(labels: list[str], x_of, height: int, max_labels: int = 8, hang_ends: bool = False) -> list[str]:
    every = max(1, math.ceil(len(labels) / max_labels))
    out = []
    for i, label in enumerate(labels):
        if i % every == 0 or i == len(labels) - 1:
            # The end labels hang inward so they are not cut off at the edges.
            anchor = "middle"
            if hang_ends and len(labels) > 1 and i in (0, len(labels) - 1):
                anchor = "start" if i == 0 else "end"
            out.append(
                f'<text x="{x_of(i):.1f}" y="{height - PAD_BOTTOM + 16}" font-size="11" text-anchor="{anchor}" '
                f'fill="#4b5563">{escape(label)}</text>'
            )
    return out


def _legend(series_names: list[tuple[str, str, bool]], width: int, height: int) -> list[str]:
    out, x = [], PAD_LEFT
    y = height - 10
    for name, colour, dashed in series_names:
        dash = ' stroke-dasharray="5 3"' if dashed else ""
        out.append(f'<line x1="{x}" x2="{x + 18}" y1="{y - 4}" y2="{y - 4}" stroke="{colour}" stroke-width="3"{dash}/>')
        out.append(f'<text x="{x + 22}" y="{y}" font-size="11" fill="#374151">{escape(name)}</text>')
        x += 34 + 7.5 * len(name)
    return out


def line_chart(
    title: str,
    labels: list[str],
    series: list[Series],
    width: int = 640,
    height: int = 220,
    unit: str = "",
    zero_based: bool = True,
    point_notes: list[str] | None = None,
) -> Markup:
    """One line per series over the same x labels; hover a point for its value."""
    values = [v for s in series for v in s.values if v is not None and math.isfinite(v)]
    if not values or not labels:
        return Markup(f'<p class="empty">{escape(title)}: no data yet.</p>')
    low = 0.0 if zero_based else min(values)
    ticks = nice_ticks(min(low, min(values)), max(values))
    lo, hi = ticks[0], ticks[-1]
    plot_w, plot_h = width - PAD_LEFT - PAD_RIGHT, height - PAD_TOP - PAD_BOTTOM

    def x_of(i: int) -> float:
        return PAD_LEFT + (plot_w * i / (len(labels) - 1) if len(labels) > 1 else plot_w / 2)

    def y_of(v: float) -> float:
        return PAD_TOP + plot_h * (1 - (v - lo) / ((hi - lo) or 1.0))

    out = _frame(width, height, title, ticks, y_of, unit)
    legend = []
    for n, line in enumerate(series):
        colour = line.colour or PALETTE[n % len(PALETTE)]
        legend.append((line.name, colour, line.dashed))
        dash = ' stroke-dasharray="5 3"' if line.dashed else ""
        segment: list[str] = []
        segments = []
        for i, v in enumerate(line.values):
            if v is None or not math.isfinite(v):
                if segment:
                    segments.append(segment)
                segment = []
                continue
            segment.append(f"{x_of(i):.1f},{y_of(v):.1f}")
        if segment:
            segments.append(segment)
        for points in segments:
            out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2"{dash} points="{" ".join(points)}"/>')
        for i, v in enumerate(line.values):
            if v is None or not math.isfinite(v):
                continue
            note = f" ({point_notes[i]})" if point_notes and point_notes[i] else ""
            out.append(
                f'<circle cx="{x_of(i):.1f}" cy="{y_of(v):.1f}" r="3.5" fill="{colour}">'
                f"<title>{escape(line.name)} at {escape(labels[i])}: {escape(_format(v, unit))}{escape(note)}</title></circle>"
            )
    out += _x_labels(labels, x_of, height, hang_ends=True)
    out += _legend(legend, width, height)
    out.append("</svg>")
    return Markup("".join(out))


def bar_chart(
    title: str,
    labels: list[str],
    series: list[Series],
    width: int = 640,
    height: int = 220,
    unit: str = "",
    bar_colours: list[str] | None = None,
) -> Markup:
    """Grouped bars: one group per label, one bar per series (``bar_colours`` colours single-series bars)."""
    values = [v for s in series for v in s.values if v is not None and math.isfinite(v)]
    if not values or not labels:
        return Markup(f'<p class="empty">{escape(title)}: no data yet.</p>')
    ticks = nice_ticks(min(0.0, min(values)), max(values))
    lo, hi = ticks[0], ticks[-1]
    plot_w, plot_h = width - PAD_LEFT - PAD_RIGHT, height - PAD_TOP - PAD_BOTTOM
    group_w = plot_w / len(labels)
    bar_w = max(2.0, group_w * 0.8 / len(series))

    def y_of(v: float) -> float:
        return PAD_TOP + plot_h * (1 - (v - lo) / ((hi - lo) or 1.0))

    def x_of(i: int) -> float:
        return PAD_LEFT + group_w * (i + 0.5)

    out = _frame(width, height, title, ticks, y_of, unit)
    for n, bars in enumerate(series):
        colour = bars.colour or PALETTE[n % len(PALETTE)]
        for i, v in enumerate(bars.values):
            if v is None or not math.isfinite(v):
                continue
            fill = bar_colours[i] if bar_colours and len(series) == 1 else colour
            x = PAD_LEFT + group_w * i + group_w * 0.1 + bar_w * n
            top, base = y_of(max(v, 0.0)), y_of(min(v, 0.0))
            out.append(
                f'<rect x="{x:.1f}" y="{top:.1f}" width="{bar_w:.1f}" height="{max(base - top, 0.5):.1f}" fill="{fill}">'
                f"<title>{escape(bars.name)} · {escape(labels[i])}: {escape(_format(v, unit))}</title></rect>"
            )
    out += _x_labels(labels, x_of, height, max_labels=12)
    if len(series) > 1:
        out += _legend(
            [(s.name, s.colour or PALETTE[n % len(PALETTE)], False) for n, s in enumerate(series)], width, height
        )
    out.append("</svg>")
    return Markup("".join(out))
