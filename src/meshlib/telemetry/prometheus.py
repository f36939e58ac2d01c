"""The golden metrics in the Prometheus text exposition format (version 0.0.4), for the
admin endpoint's ``/metrics``."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from meshlib.mesh import Mesh

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

DIRECTIONS = ("outbound", "inbound")
_QUANTILES = (("0.5", "p50_ms"), ("0.95", "p95_ms"), ("0.99", "p99_ms"))

Labels = tuple[tuple[str, str], ...]
Sample = tuple[Labels, float | int]


def render(mesh: Mesh) -> str:
    """Every metric family of ``mesh`` with HELP and TYPE lines, one sample per
    direction, service and route (a family may have no samples yet)."""
    stats = mesh.stats()
    source = mesh.service or ""
    # TrafficStats has no public accessor for its windows; the lifetime counters are
    # only there (stats() reports the sliding window), so read its tables directly.
    traffic = mesh._traffic
    tables = {"outbound": dict(traffic._outbound), "inbound": dict(traffic._inbound)}

    rps: list[Sample] = []
    success: list[Sample] = []
    latency: list[Sample] = []
    for direction, service, route, summary in _routes(stats):
        labels = _labels(direction, source, service, route)
        rps.append((labels, summary["rps"]))
        # no requests in the window: no rate or quantile to report, so no sample
        if summary["success_rate"] is not None:
            success.append((labels, summary["success_rate"]))
        for quantile, key in _QUANTILES:
            if summary[key] is not None:
                latency.append(((*labels, ("quantile", quantile)), summary[key]))
    totals: list[Sample] = [
        (_labels(direction, source, service, route), window.total)
        for direction in DIRECTIONS
        for (service, route), window in sorted(tables[direction].items())
    ]

    lines: list[str] = []
    _family(
        lines,
        "meshlib_requests_per_second",
        "gauge",
        "Requests per second over the sliding window.",
        rps,
    )
    _family(
        lines,
        "meshlib_success_rate",
        "gauge",
        "Share of requests in the window answered below 500 (0 to 1).",
        success,
    )
    _family(
        lines,
        "meshlib_latency_ms",
        "gauge",
        "Latency quantiles in milliseconds over the sliding window.",
        latency,
    )
    _family(
        lines,
        "meshlib_requests_total",
        "counter",
        "Requests since the process started measuring this route.",
        totals,
    )
    return "\n".join(lines) + "\n"


def _routes(stats: Mapping[str, Any]) -> Iterable[tuple[str, str, str, Mapping[str, Any]]]:
    for direction in DIRECTIONS:
        for service, entry in sorted(stats.get(direction, {}).items()):
            for route, summary in sorted(entry["routes"].items()):
                yield direction, service, route, summary


def _labels(direction: str, source: str, service: str, route: str) -> Labels:
    return (("direction", direction), ("source", source), ("service", service), ("route", route))


def _family(lines: list[str], name: str, kind: str, help_text: str, samples: list[Sample]) -> None:
    lines.append(f"# HELP {name} {_escape_help(help_text)}")
    lines.append(f"# TYPE {name} {kind}")
    for labels, value in samples:
        pairs = ",".join(f'{key}="{_escape_label(text)}"' for key, text in labels)
        lines.append(f"{name}{{{pairs}}} {format_value(value)}")


def format_value(value: float | int) -> str:
    """A sample value as the format spells it (``+Inf``, ``-Inf``, ``NaN``)."""
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


__all__ = ["CONTENT_TYPE", "format_value", "render"]
