"""The service graph as a self-contained SVG (no Graphviz needed): sources on the
left, destinations on the right, one arrow per edge labelled with its rate,
success rate and p99, red when the success rate is below 99 %."""

from __future__ import annotations

from typing import Any
from xml.sax.saxutils import escape

_BOX_W, _BOX_H, _GAP, _MARGIN, _COLUMN_GAP = 170, 44, 26, 24, 260


def to_svg(graph: dict[str, Any]) -> str:
    """Render ``mesh.graph()`` (nodes and edges) as an SVG document."""
    edges = graph["edges"]
    sources = sorted({edge["source"] for edge in edges})
    targets = sorted(set(graph["nodes"]) - set(sources))
    columns = [sources or graph["nodes"][:1], targets]
    rows = max(len(column) for column in columns) or 1
    width = 2 * _MARGIN + 2 * _BOX_W + _COLUMN_GAP
    height = 2 * _MARGIN + rows * _BOX_H + (rows - 1) * _GAP + 20
    place: dict[str, tuple[float, float]] = {}
    for index, column in enumerate(columns):
        x = _MARGIN + index * (_BOX_W + _COLUMN_GAP)
        for row, name in enumerate(column):
            place[name] = (x, _MARGIN + row * (_BOX_H + _GAP))
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
        "<defs><marker id='arrow' viewBox='0 0 10 10' refX='10' refY='5' markerWidth='8' "
        "markerHeight='8' orient='auto-start-reverse'><path d='M 0 0 L 10 5 L 0 10 z'/>"
        "</marker></defs>",
        f'<text x="{_MARGIN}" y="{height - 8}" fill="#666">'
        f"last {graph.get('window_seconds', 60):g} s, as this process saw it</text>",
    ]
    for edge in edges:
        if edge["source"] not in place or edge["destination"] not in place:
            continue
        sx, sy = place[edge["source"]]
        tx, ty = place[edge["destination"]]
        x1, y1 = sx + _BOX_W, sy + _BOX_H / 2
        x2, y2 = tx, ty + _BOX_H / 2.0
        success = edge["success_rate"]
        color = "#c62828" if success is not None and success < 0.99 else "#37474f"
        parts.append(
            f'<line x1="{x1}" y1="{y1}" x2="{x2}" y2="{y2}" stroke="{color}" '
            'stroke-width="1.5" marker-end="url(#arrow)"/>'
        )
        label = f"{edge['rps']:.1f} rps"
        if success is not None:
            label += f" · {success * 100:.1f}% ok"
        if edge.get("p99_ms") is not None:
            label += f" · p99 {edge['p99_ms']:.1f} ms"
        parts.append(
            f'<text x="{(x1 + x2) / 2}" y="{(y1 + y2) / 2 - 6}" text-anchor="middle" '
            f'fill="{color}">{escape(label)}</text>'
        )
    for name, (left, top) in place.items():
        parts.append(
            f'<rect x="{left}" y="{top}" width="{_BOX_W}" height="{_BOX_H}" rx="8" '
            'fill="#eceff1" stroke="#37474f"/>'
        )
        parts.append(
            f'<text x="{left + _BOX_W / 2}" y="{top + _BOX_H / 2 + 4}" text-anchor="middle">'
            f"{escape(name)}</text>"
        )
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
