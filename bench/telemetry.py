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

The server side is measured the same way in a second phase, in process and
without sockets: ``mesh.asgi`` around an app that answers 200 at once, driven by
one event loop with requests that carry a ``traceparent`` from their caller, flag
``01`` (sampled) or ``00`` (not sampled); the per-request CPU of the middleware and
the app, same four configurations.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import gc
import json
import sys
import time
from collections.abc import Callable, Sequence
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


Installed = dict[str, tuple[MeterProvider, trace.TracerProvider]]
Rounds = list[dict[str, dict[str, float]]]


def interleaved(
    installed: Installed, rounds_n: int, label: str, block: Callable[[str], dict[str, float]]
) -> Rounds:
    """``rounds_n`` rounds of ``block`` for every configuration in a rotating order,
    each run with its providers installed."""
    rounds: Rounds = []
    for r in range(rounds_n):
        result = {}
        for name in rotated(list(NAMES), r):
            install(*installed[name])
            result[name] = block(name)
        rounds.append(result)
        print(
            f"  {label} {r + 1}/{rounds_n}: "
            + ", ".join(f"{n} cpu {result[n]['cpu_us']:.1f} µs" for n in NAMES),
            flush=True,
        )
    return rounds


TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-{flags}"


async def _answer(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def _scope(sampled: bool) -> dict[str, Any]:
    flags = "01" if sampled else "00"
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/users/1",
        "raw_path": b"/users/1",
        "query_string": b"",
        "root_path": "",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50000),
        "headers": [
            (b"host", b"users"),
            (b"user-agent", b"python-httpx/0.28"),
            (b"x-mesh-caller", b"front"),
            (b"traceparent", TRACEPARENT.format(flags=flags).encode()),
        ],
    }


def server_block(
    loop: asyncio.AbstractEventLoop, app: Any, sampled: bool, n: int
) -> dict[str, float]:
    """CPU per request of ``n`` requests through ``app`` (mesh.asgi around _answer)."""
    scope = _scope(sampled)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        return None

    async def run() -> None:
        for _ in range(n):
            await app(dict(scope), receive, send)

    gc.collect()
    cpu0 = time.process_time()
    loop.run_until_complete(run())
    return {"cpu_us": (time.process_time() - cpu0) / n * 1e6}


def bench_server_side(
    installed: Installed,
    rounds_n: int,
    requests: int,
) -> dict[str, Any]:
    """The second phase: mesh.asgi in process, the four configurations interleaved."""
    meshes = {
        "baseline": Mesh({"telemetry": {"metrics": False}}, service="users"),
        "metrics": Mesh({}, service="users"),
        "unsampled": Mesh({}, service="users"),
        "sampled": Mesh({}, service="users"),
    }
    apps = {name: mesh.asgi(_answer) for name, mesh in meshes.items()}
    loop = asyncio.new_event_loop()
    try:
        for name in NAMES:
            install(*installed[name])
            server_block(loop, apps[name], name == "sampled", requests // 4)
        rounds = interleaved(
            installed,
            rounds_n,
            "server round",
            lambda name: server_block(loop, apps[name], name == "sampled", requests),
        )
    finally:
        loop.close()
        for mesh in meshes.values():
            mesh.close()
    out: dict[str, Any] = aggregate(rounds, NAMES)
    measured = ("cpu_us",)
    out["metrics_vs_baseline"] = paired_delta(rounds, "metrics", "baseline", measured)
    out["unsampled_vs_metrics"] = paired_delta(rounds, "unsampled", "metrics", measured)
    out["unsampled_vs_baseline"] = paired_delta(rounds, "unsampled", "baseline", measured)
    out["sampled_vs_unsampled"] = paired_delta(rounds, "sampled", "unsampled", measured)
    return out


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
            rounds = interleaved(
                installed,
                rounds_n,
                "round",
                lambda name: sync_block(clients[name], MESH_URL, requests).summary(),
            )
        finally:
            for client in clients.values():
                client.close()
            for mesh in meshes.values():
                mesh.close()
            install(*nothing)
    print("server side (mesh.asgi in process):", flush=True)
    try:
        served = bench_server_side(installed, rounds_n, requests * 4)
    finally:
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
    out["server"] = served
    out["requests_per_round"] = requests
    out["elapsed_s"] = round(time.perf_counter() - started, 1)

    def line(what: str, value: float, target: float | None) -> str:
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
        print(line(what, out[key]["cpu_us"], target))
    print("server side, mesh.asgi in process:")
    for name in NAMES:
        print(f"  {name:<12} {served[name]['cpu_us']:7.1f} µs")
    for what, key, target in report:
        print(line(what, served[key]["cpu_us"], target))
    output: Path = args.output or RESULTS_DIR / (
        "telemetry-quick.json" if args.quick else "telemetry.json"
    )
    output.write_text(json.dumps(out, indent=1, default=float) + "\n", encoding="utf-8")
    print(f"spans exported: {exporter.spans}; written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
