"""Charts as server-side SVG: no script, no library, nothing fetched by the browser."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape


def bar_chart(
    points: Sequence[tuple[str, float]], *, width: int = 720, height: int = 180, unit: str = ""
) -> str:
    """Vertical bars, one per ``(label, value)``; labels are escaped (they may be data)."""
    if not points:
        return (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="40" role="img"'
            ' aria-label="no data"><text x="8" y="24" class="muted">no data yet</text></svg>'
        )
    top = max(value for _, value in points) or 1.0
    gap = 4
    plot = height - 30
    top_margin = 16
    bar = max(2, (width - gap * len(points)) // len(points))
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img"'
        f' aria-label="bar chart of {len(points)} values" class="chart">'
    ]
    for index, (label, value) in enumerate(points):
        h = 0 if value <= 0 else max(1, round((plot - top_margin) * value / top))
        x = index * (bar + gap)
        parts.append(
            f'<rect x="{x}" y="{plot - h}" width="{bar}" height="{h}" class="bar">'
            f"<title>{escape(label)}: {value:g}{escape(unit)}</title></rect>"
        )
        if len(points) <= 12 or index % max(1, len(points) // 6) == 0:
            parts.append(
                f'<text x="{x}" y="{height - 10}" class="axis">{escape(label[-5:])}</text>'
            )
    parts.append(f'<text x="{width - 4}" y="12" text-anchor="end" class="axis">')
    parts.append(f"max {top:g}{escape(unit)}</text></svg>")
    return "".join(parts)
