"""What OpenTelemetry metrics and tracing cost a sync mesh request.

Usage::

    .venv/bin/python bench/telemetry.py          # full run, ~4 min
    .venv/bin/python bench/telemetry.py --quick  # smoke run

Same method as bench/run.py's sync phase (its server, policy and helpers): clients
interleaved in rounds with their order rotating, medians of per-round differences
of client CPU per request. The clients, all on the same policy:

- ``baseline``: ``telemetry.metrics: false`` (no golden-metric windows either), no
  MeterProvider, no TracerProvider;
- ``metrics``: the golden metrics plus OpenTelemetry metrics into an SDK
  MeterProvider whose reader is never collected during the run;
- ``unsampled``: the same plus an SDK TracerProvider, ``sample_ratio: 0``: calls
  without a parent, not sampled (nothing on the wire);
- ``sampled``: the same with ``sample_ratio: 1``, spans batched to an exporter that
  drops them; each call sends a ``traceparent``;
- ``unsampled_in_trace`` and ``sampled_in_trace``: calls made inside a trace, under
  a parent span whose flag is off or on, as in a service serving a traced request:
  both send a ``traceparent`` (the parent's, or the call's attempt span's);
- ``baseline_header``: ``baseline`` whose requests carry a ``traceparent`` the
  application set: what one more header costs httpx and h11, without any tracing.

The providers are process-wide, so each client's block runs with its own installed
(`METRICS` and `TRACING` are pointed at them and refreshed before the block).
Targets (the issue): metrics plus unsampled tracing add <= 5 µs per request
(``unsampled - baseline``); a sampled request's span work <= 20 µs
(``sampled_in_trace - unsampled_in_trace``: the same headers go on the wire, so
the difference is the spans). ``sampled - unsampled`` is reported too: span work
plus the cost of sending one more header.

The server side is measured the same way in a second phase, in process and
without sockets: ``mesh.asgi`` around an app that answers 200 at once, driven by
one event loop with requests that carry a ``traceparent`` from their caller, flag
``00`` (``unsampled``) or ``01`` (``sampled``); the per-request CPU of the
middleware and the app, four configurations.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import gc
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.metrics import MeterProvider, NoOpMeterProvider
from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

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
    paired_delta,
    rotated,
    sync_block,
)

TARGET_METRICS_UNSAMPLED_US = 5.0
TARGET_SAMPLED_SPANS_US = 20.0
SERVER_NAMES = ("baseline", "metrics", "unsampled", "sampled")
CLIENT_NAMES = (*SERVER_NAMES, "unsampled_in_trace", "sampled_in_trace", "baseline_header")
PARENT_FLAGS = {"unsampled_in_trace": 0, "sampled_in_trace": 1}
TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
PARENT_ID = 0x00F067AA0BA902B7


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
    names: Sequence[str],
    installed: Installed,
    rounds_n: int,
    label: str,
    block: Callable[[str], dict[str, float]],
) -> Rounds:
    """``rounds_n`` rounds of ``block`` for every configuration in a rotating order,
    each run with its providers installed."""
    rounds: Rounds = []
    for r in range(rounds_n):
        result = {}
        for name in rotated(list(names), r):
            install(*installed[name])
            result[name] = block(name)
        rounds.append(result)
        print(
            f"  {label} {r + 1}/{rounds_n}: "
            + ", ".join(f"{n} {result[n]['cpu_us']:.1f}" for n in names)
            + " µs CPU",
            flush=True,
        )
    return rounds


def pin(server_pid: int) -> bool:
    """Client on the first CPU, server on the second, when there are two: no
    migrations between the blocks being compared (less noise in small deltas)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cpus) < 2:
        return False
    os.sched_setaffinity(0, {cpus[0]})
    os.sched_setaffinity(server_pid, {cpus[1]})
    return True


def client_block(client: httpx.Client, name: str, n: int) -> dict[str, float]:
    """``n`` calls with ``client``, inside a trace for the ``*_in_trace`` clients."""
    flags = PARENT_FLAGS.get(name)
    if flags is None:
        return sync_block(client, MESH_URL, n).summary()
    parent = SpanContext(TRACE_ID, PARENT_ID, is_remote=True, trace_flags=TraceFlags(flags))
    token = otel_context.attach(trace.set_span_in_context(NonRecordingSpan(parent)))
    try:
        return sync_block(client, MESH_URL, n).summary()
    finally:
        otel_context.detach(token)


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
        for name in SERVER_NAMES:
            install(*installed[name])
            server_block(loop, apps[name], name == "sampled", requests // 4)
        rounds = interleaved(
            SERVER_NAMES,
            installed,
            rounds_n,
            "server round",
            lambda name: server_block(loop, apps[name], name == "sampled", requests),
        )
    finally:
        loop.close()
        for mesh in meshes.values():
            mesh.close()
    return deltas(rounds, SERVER_NAMES, SERVER_DELTAS, ("cpu_us",))


# (key, a, b, what it shows, target in µs or None)
Delta = tuple[str, str, str, str, "float | None"]
SERVER_DELTAS: tuple[Delta, ...] = (
    ("metrics_vs_baseline", "metrics", "baseline", "OTel metrics", None),
    (
        "unsampled_vs_baseline",
        "unsampled",
        "baseline",
        "metrics + unsampled tracing",
        TARGET_METRICS_UNSAMPLED_US,
    ),
    ("sampled_vs_unsampled", "sampled", "unsampled", "span work", TARGET_SAMPLED_SPANS_US),
)
CLIENT_DELTAS: tuple[Delta, ...] = (
    SERVER_DELTAS[0],
    SERVER_DELTAS[1],
    (
        "in_trace_vs_baseline",
        "unsampled_in_trace",
        "baseline",
        "metrics + passing a parent on, unsampled",
        None,
    ),
    (
        "span_work",
        "sampled_in_trace",
        "unsampled_in_trace",
        "span work (same headers on the wire)",
        TARGET_SAMPLED_SPANS_US,
    ),
    (
        "sampled_vs_unsampled",
        "sampled",
        "unsampled",
        "span work + one more header (roots)",
        None,
    ),
    ("header_vs_baseline", "baseline_header", "baseline", "one more header, no tracing", None),
)


def deltas(
    rounds: Rounds, names: Sequence[str], wanted: Sequence[Delta], measured: Sequence[str]
) -> dict[str, Any]:
    """Medians per configuration and the paired differences ``wanted``."""
    out: dict[str, Any] = aggregate(rounds, names)
    for key, a, b, _, _ in wanted:
        out[key] = paired_delta(rounds, a, b, measured)
    return out


def report(
    title: str, result: dict[str, Any], names: Sequence[str], wanted: Sequence[Delta]
) -> None:
    print(title)
    for name in names:
        print(f"  {name:<20} {result[name]['cpu_us']:7.1f} µs")
    for key, a, b, what, target in wanted:
        value = result[key]["cpu_us"]
        verdict = "" if target is None else (" ok" if value <= target else " OVER")
        limit = "" if target is None else f" (target <= {target:g} µs){verdict}"
        print(f"  {what + f' ({a} - {b})':<66} {value:+6.2f} µs{limit}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run")
    parser.add_argument("--output", type=Path, help="JSON file to write")
    args = parser.parse_args(argv)
    rounds_n, requests, warmup = (4, 800, 200) if args.quick else (20, 2000, 500)

    reader = InMemoryMetricReader()  # never collected while the clients run
    meters = SdkMeterProvider(metric_readers=[reader])
    exporter = _Dropping()
    tracers = SdkTracerProvider()
    tracers.add_span_processor(BatchSpanProcessor(exporter))
    nothing = (NoOpMeterProvider(), trace.NoOpTracerProvider())
    installed: Installed = {
        "baseline": nothing,
        "baseline_header": nothing,
        "metrics": (meters, trace.NoOpTracerProvider()),
        **{name: (meters, tracers) for name in CLIENT_NAMES[2:-1]},
    }
    ratios = {"unsampled": 0.0}  # the rest: 1.0 (the in-trace ones follow their parent)
    started = time.perf_counter()
    with bench_server() as server:
        port = server.port
        pinned = pin(server.process.pid)
        meshes = {
            name: Mesh(
                policy(port, name != "baseline", ratios.get(name, 1.0)), service="bench-client"
            )
            for name in CLIENT_NAMES
        }
        clients: dict[str, httpx.Client] = {}
        try:
            for name in CLIENT_NAMES:
                install(*installed[name])
                headers = {"traceparent": TRACEPARENT.format(flags="00")}
                clients[name] = meshes[name].http_client(
                    headers=headers if name == "baseline_header" else None
                )
                client_block(clients[name], name, warmup)
            rounds = interleaved(
                CLIENT_NAMES,
                installed,
                rounds_n,
                "round",
                lambda name: client_block(clients[name], name, requests),
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

    out = deltas(rounds, CLIENT_NAMES, CLIENT_DELTAS, ("cpu_us", "p50_us"))
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
    out["pinned"] = pinned
    out["elapsed_s"] = round(time.perf_counter() - started, 1)
    report(
        f"client CPU per request, medians over {rounds_n} rounds of {requests}:",
        out,
        CLIENT_NAMES,
        CLIENT_DELTAS,
    )
    report("server side, mesh.asgi in process:", served, SERVER_NAMES, SERVER_DELTAS)
    output: Path = args.output or RESULTS_DIR / (
        "telemetry-quick.json" if args.quick else "telemetry.json"
    )
    output.write_text(json.dumps(out, indent=1, default=float) + "\n", encoding="utf-8")
    print(f"spans exported: {exporter.spans}; written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
