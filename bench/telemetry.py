"""What OpenTelemetry metrics and tracing cost a sync mesh request.

Usage::

    .venv/bin/python bench/telemetry.py          # full run, ~1.5 min
    .venv/bin/python bench/telemetry.py --quick  # smoke run

Same method as bench/run.py's sync phase (its server, policy and helpers): clients
interleaved in rounds with their order rotating, medians of per-round differences
of client CPU per request. The clients, all on the same policy:

- ``baseline``: ``telemetry.metrics: false`` (no golden-metric windows either), no
  MeterProvider, no TracerProvider;
- ``metrics``: the golden metrics plus OpenTelemetry metrics into an SDK
  MeterProvider whose reader is never collected during the run;
- ``unsampled``: the same plus an SDK TracerProvider, ``sample_ratio: 0``;
- ``sampled``: the same with ``sample_ratio: 1``, spans batched to an exporter that
  drops them.

The providers are process-wide, so each client's block runs with its own installed
(`METRICS` and `TRACING` are pointed at them and refreshed before the block).
Targets (the issue): metrics plus unsampled tracing add <= 5 µs per request
(``unsampled - baseline``); a sampled request's span work <= 20 µs
(``sampled - unsampled``).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
from opentelemetry import trace
from opentelemetry.metrics import MeterProvider, NoOpMeterProvider
from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

sys.path.insert(0, str(Path(__file__).resolve().parent))

from meshlib import Mesh
from meshlib.telemetry.metrics import METRICS
from meshlib.telemetry.tracing import TRACING
from run import (
    MESH_URL,
    RESULTS_DIR,
    aggregate,
    bench_policy,
    bench_server,
    med,
    paired_delta,
    rotated,
    sync_block,
)

TARGET_METRICS_UNSAMPLED_US = 5.0
TARGET_SAMPLED_SPANS_US = 20.0
NAMES = ("baseline", "metrics", "unsampled", "sampled")


class _Dropping(SpanExporter):
    """Takes every batch and keeps nothing."""

    def __init__(self) -> None:
        self.spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def policy(port: int, metrics: bool, ratio: float) -> dict[str, Any]:
    out = copy.deepcopy(bench_policy(port))
    out["telemetry"] = {"metrics": metrics, "tracing": {"sample_ratio": ratio}}
    return out


def install(meter: MeterProvider, tracer: trace.TracerProvider) -> None:
    METRICS._provider = lambda: meter
    TRACING._provider = lambda: tracer
    METRICS.refresh()
    TRACING.refresh()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run")
    parser.add_argument("--output", type=Path, help="JSON file to write")
    args = parser.parse_args(argv)
    rounds_n, requests, warmup = (4, 800, 200) if args.quick else (8, 3000, 500)

    reader = InMemoryMetricReader()  # never collected while the clients run
    meters = SdkMeterProvider(metric_readers=[reader])
    exporter = _Dropping()
    tracers = SdkTracerProvider()
    tracers.add_span_processor(BatchSpanProcessor(exporter))
    nothing = (NoOpMeterProvider(), trace.NoOpTracerProvider())
    installed = {
        "baseline": nothing,
        "metrics": (meters, trace.NoOpTracerProvider()),
        "unsampled": (meters, tracers),
        "sampled": (meters, tracers),
    }
    started = time.perf_counter()
    with bench_server() as server:
        port = server.port
        meshes = {
            "baseline": Mesh(policy(port, False, 1.0), service="bench-client"),
            "metrics": Mesh(policy(port, True, 1.0), service="bench-client"),
            "unsampled": Mesh(policy(port, True, 0.0), service="bench-client"),
            "sampled": Mesh(policy(port, True, 1.0), service="bench-client"),
        }
        clients: dict[str, httpx.Client] = {}
        try:
            for name in NAMES:
                install(*installed[name])
                clients[name] = meshes[name].http_client()
                sync_block(clients[name], MESH_URL, warmup)
            rounds: list[dict[str, dict[str, float]]] = []
            for r in range(rounds_n):
                result = {}
                for name in rotated(list(NAMES), r):
                    install(*installed[name])
                    result[name] = sync_block(clients[name], MESH_URL, requests).summary()
                rounds.append(result)
                print(
                    f"  round {r + 1}/{rounds_n}: "
                    + ", ".join(f"{n} cpu {result[n]['cpu_us']:.1f} µs" for n in NAMES),
                    flush=True,
                )
        finally:
            for client in clients.values():
                client.close()
            for mesh in meshes.values():
                mesh.close()
            install(*nothing)
    tracers.shutdown()  # flushes the batches still queued
    collected = reader.get_metrics_data()
    meters.shutdown()

    measured = ("cpu_us", "p50_us")
    out: dict[str, Any] = aggregate(rounds, NAMES)
    out["metrics_vs_baseline"] = paired_delta(rounds, "metrics", "baseline", measured)
    out["unsampled_vs_metrics"] = paired_delta(rounds, "unsampled", "metrics", measured)
    out["unsampled_vs_baseline"] = paired_delta(rounds, "unsampled", "baseline", measured)
    out["sampled_vs_unsampled"] = paired_delta(rounds, "sampled", "unsampled", measured)
    out["spans_exported"] = exporter.spans
    out["histogram_points"] = sum(
        len(metric.data.data_points)
        for resource in (collected.resource_metrics if collected else [])
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == "http.client.request.duration"
    )
    out["requests_per_round"] = requests
    out["elapsed_s"] = round(time.perf_counter() - started, 1)

    def line(what: str, key: str, target: float | None) -> str:
        value = out[key]["cpu_us"]
        verdict = "" if target is None else (" ok" if value <= target else " OVER")
        limit = "" if target is None else f" (target <= {target:g} µs){verdict}"
        return f"  {what:<42} {value:+6.2f} µs CPU/request{limit}"

    print(f"client CPU per request, medians over {rounds_n} rounds of {requests}:")
    for name in NAMES:
        print(f"  {name:<12} {med([r[name]['cpu_us'] for r in rounds]):7.1f} µs")
    report: list[tuple[str, str, float | None]] = [
        ("OTel metrics (metrics - baseline)", "metrics_vs_baseline", None),
        ("unsampled tracing (unsampled - metrics)", "unsampled_vs_metrics", None),
        (
            "metrics + unsampled (unsampled - baseline)",
            "unsampled_vs_baseline",
            TARGET_METRICS_UNSAMPLED_US,
        ),
        ("span work (sampled - unsampled)", "sampled_vs_unsampled", TARGET_SAMPLED_SPANS_US),
    ]
    for what, key, target in report:
        print(line(what, key, target))
    output: Path = args.output or RESULTS_DIR / (
        "telemetry-quick.json" if args.quick else "telemetry.json"
    )
    output.write_text(json.dumps(out, indent=1, default=float) + "\n", encoding="utf-8")
    print(f"spans exported: {exporter.spans}; written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
