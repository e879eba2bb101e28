"""Inline SVG charts for the self-contained HTML report (no JavaScript, no network).

Each function returns an ``<svg>`` element as a string; every label is HTML-escaped.
"""
from __future__ import annotations

from html import escape
from typing import Sequence

BAR_COLOR = "#3b6ea8"
LABEL_WIDTH = 180
ROW_HEIGHT = 22


def _fmt(value: float) -> str:
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.3g}"
    return f"{int(value):,}"


def _tick(value: float) -> str:
    """Short axis label: power-of-two multiples in binary k/M (16384 -> 16k), so ticks do not collide."""
    for unit, suffix in ((1 << 20, "M"), (1 << 10, "k")):
        if value >= unit and value % unit == 0:
            return f"{int(value) // unit}{suffix}"
    return _fmt(value)


def bar_chart(items: Sequence[tuple[str, float]], title: str, width: int = 640, value_format=_fmt,
              maximum: float | None = None) -> str:
    """Horizontal bars, one row per ``(label, value)``; full width = ``maximum`` (default: the largest value)."""
    if not items:
        return f'<p class="empty">{escape(title)}: no data</p>'
    top = maximum or max(value for _, value in items) or 1
    plot = width - LABEL_WIDTH - 90
    height = 28 + ROW_HEIGHT * len(items)
    rows = []
    for i, (label, value) in enumerate(items):
        y = 24 + i * ROW_HEIGHT
        bar = max(plot * value / top, 1 if value else 0)
        rows.append(
            f'<text x="{LABEL_WIDTH - 6}" y="{y + 14}" text-anchor="end">{escape(str(label)[:28])}</text>'
            f'<rect x="{LABEL_WIDTH}" y="{y + 3}" width="{bar:.1f}" height="{ROW_HEIGHT - 6}" fill="{BAR_COLOR}">'
            f'<title>{escape(str(label))}: {escape(value_format(value))}</title></rect>'
            f'<text x="{LABEL_WIDTH + bar + 4:.1f}" y="{y + 14}">{escape(value_format(value))}</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
            f'aria-label="{escape(title)}"><text x="0" y="14" class="title">{escape(title)}</text>'
            + "".join(rows) + "</svg>")


def histogram(edges: Sequence[float], counts: Sequence[int], title: str, x_label: str,
              width: int = 640, height: int = 260) -> str:
    """Vertical bars for bins ``[edges[i], edges[i+1])``; bins are equal-width on screen."""
    if not counts or not sum(counts):
        return f'<p class="empty">{escape(title)}: no data</p>'
    left, bottom, top_pad = 50, 60, 26
    plot_w, plot_h = width - left - 30, height - bottom - top_pad  # right margin: the last tick label
    top = max(counts)
    bar_w = plot_w / len(counts)
    parts = [f'<text x="0" y="14" class="title">{escape(title)}</text>',
             f'<line x1="{left}" y1="{top_pad + plot_h}" x2="{left + plot_w}" y2="{top_pad + plot_h}" stroke="#444"/>',
             f'<text x="{left - 4}" y="{top_pad + 8}" text-anchor="end">{top:,}</text>',
             f'<text x="{left + plot_w / 2}" y="{height - 6}" text-anchor="middle">{escape(x_label)}</text>']
    for i, count in enumerate(counts):
        h = plot_h * count / top
        x = left + i * bar_w
        parts.append(f'<rect x="{x + 1:.1f}" y="{top_pad + plot_h - h:.1f}" width="{bar_w - 2:.1f}" height="{h:.1f}" '
                     f'fill="{BAR_COLOR}"><title>[{_fmt(edges[i])}, {_fmt(edges[i + 1])}): {count:,}</title></rect>')
    for i, edge in enumerate(edges):  # ticks on the bin boundaries
        parts.append(f'<text x="{left + i * bar_w:.1f}" y="{top_pad + plot_h + 14}" text-anchor="middle" '
                     f'class="tick">{_tick(edge)}</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
            f'aria-label="{escape(title)}">' + "".join(parts) + "</svg>")
