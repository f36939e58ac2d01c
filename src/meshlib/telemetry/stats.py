"""Golden metrics per destination and route (client side) and per service and route
(server side), kept in process: what `mesh.stats()` and the service graph show."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from meshlib.telemetry.window import Window, summarize

Key = tuple[str, str]  # (service, route)


class TrafficStats:
    """One `Window` per (service, route), in each direction, made on first use."""

    def __init__(
        self, *, window: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.window = window
        self._clock = clock
        self._lock = threading.Lock()
        self._outbound: dict[Key, Window] = {}
        self._inbound: dict[Key, Window] = {}

    def outbound(self, destination: str, route: str) -> Window:
        """The window of calls to ``destination`` that matched ``route``."""
        window = self._outbound.get((destination, route))
        return window if window is not None else self._make(self._outbound, destination, route)

    def inbound(self, service: str, route: str) -> Window:
        """The window of requests ``service`` served under ``route``."""
        window = self._inbound.get((service, route))
        return window if window is not None else self._make(self._inbound, service, route)

    def _make(self, table: dict[Key, Window], service: str, route: str) -> Window:
        with self._lock:
            window = table.get((service, route))
            if window is None:
                window = table[service, route] = Window(self.window, clock=self._clock)
            return window

    def snapshot(self) -> dict[str, Any]:
        """Per service: the totals and each route's rate, success rate and latency."""
        return {
            "window_seconds": self.window,
            "outbound": _by_service(dict(self._outbound)),
            "inbound": _by_service(dict(self._inbound)),
        }

    def graph(self, source: str | None) -> dict[str, Any]:
        """Edges this process observed: ``source`` → each destination it called, and
        each caller-less inbound service (``source`` is this process's service)."""
        me = source or "(this process)"
        edges = []
        for destination, routes in _group(dict(self._outbound)).items():
            edges.append({"source": me, "destination": destination, **summarize(routes)})
        nodes = sorted({me, *(edge["destination"] for edge in edges)})
        return {"nodes": nodes, "edges": edges, "window_seconds": self.window}


def _group(table: dict[Key, Window]) -> dict[str, list[Window]]:
    grouped: dict[str, list[Window]] = {}
    for (service, _), window in sorted(table.items()):
        grouped.setdefault(service, []).append(window)
    return grouped


def _by_service(table: dict[Key, Window]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for (service, route), window in sorted(table.items()):
        out.setdefault(service, {"routes": {}})["routes"][route] = window.summary()
    for service, windows in _group(table).items():
        out[service]["total"] = summarize(windows)
    return out


def to_dot(graph: dict[str, Any]) -> str:
    """The graph in Graphviz DOT: one edge per destination, labelled with its rate,
    success rate and p99."""
    lines = ["digraph mesh {", "  rankdir=LR;", "  node [shape=box, style=rounded];"]
    for node in graph["nodes"]:
        lines.append(f"  {_quote(node)};")
    for edge in graph["edges"]:
        success = edge["success_rate"]
        p99 = edge["p99_ms"]
        label = f"{edge['rps']:.1f} rps"
        label += f"\\n{success * 100:.1f}% ok" if success is not None else ""
        label += f"\\np99 {p99:.1f} ms" if p99 is not None else ""
        color = "black" if success is None or success >= 0.99 else "red"
        lines.append(
            f"  {_quote(edge['source'])} -> {_quote(edge['destination'])} "
            f'[label="{label}", color={color}];'
        )
    lines.append("}")
    return "\n".join(lines) + "\n"


def _quote(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
