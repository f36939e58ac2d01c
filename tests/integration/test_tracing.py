"""Tracing through the mesh on loopback: one trace from the test's client through
three services, each behind ``mesh.asgi``: ``a`` calls ``b`` with the sync client
(from a thread), ``b`` calls ``c`` with the async client, ``c`` is the echo app.

Checked: parent/child links across the hops (logical span → attempt span → server
span of the next hop → ...), a retry as two attempt spans under one logical span,
the propagated headers and baggage, the attributes, hedged backups, the protection
events, and that an unsampled or untraced request starts no span while still passing
on a parent's context.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from opentelemetry import baggage, trace
from opentelemetry import context as otel_context
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace import Tracer as SdkTracer
from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NoOpTracer, SpanKind, StatusCode, Tracer, TracerProvider

from integration.support import CLIENT_TIMEOUT, Call, Driver, StartEcho, wait_until
from meshlib import Mesh
from meshlib.demo.services import EchoApp, ServerThread
from meshlib.telemetry.spans import Sink
from meshlib.telemetry.tracing import TRACING

pytestmark = pytest.mark.integration

FAST_BACKOFF = {"base": "1ms", "max": "2ms"}
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


# -- the session's tracer provider --------------------------------------------------------


class _Started(SpanProcessor):
    """Names of the spans started: an unsampled request must start none, and a span
    starts before the response that would reveal it, so this needs no waiting."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        self.names.append(span.name)


class _Switchable(TracerProvider):
    """The process's global provider, set once (the API allows no more): the SDK's
    tracers while this module runs, no-op tracers afterwards, so that the modules
    after it run as they would without a provider."""

    def __init__(self) -> None:
        self.sdk: SdkTracerProvider | None = None

    def get_tracer(self, *args: Any, **kwargs: Any) -> Tracer:
        return NoOpTracer() if self.sdk is None else self.sdk.get_tracer(*args, **kwargs)


@dataclass
class Recorded:
    exporter: InMemorySpanExporter
    started: _Started

    def spans(self, count: int) -> list[ReadableSpan]:
        """The finished spans, once there are ``count`` (server spans end after their
        response has been sent)."""
        wait_until(lambda: len(self.exporter.get_finished_spans()) >= count, f"{count} spans")
        finished = list(self.exporter.get_finished_spans())
        assert len(finished) == count, [s.name for s in finished]
        return finished


def _recording_starts(patch: pytest.MonkeyPatch, started: _Started) -> None:
    """Record the names of the spans started both ways a span can start: through an
    SDK tracer, and straight to the processors (which no processor sees start)."""
    sink_start = Sink.start
    tracer_start = SdkTracer.start_span

    def through_sink(self: Sink, name: str, *args: Any, **kwargs: Any) -> Any:
        started.names.append(name)
        return sink_start(self, name, *args, **kwargs)

    def through_tracer(self: SdkTracer, name: str, *args: Any, **kwargs: Any) -> Any:
        started.names.append(name)
        return tracer_start(self, name, *args, **kwargs)

    patch.setattr(Sink, "start", through_sink)
    patch.setattr(SdkTracer, "start_span", through_tracer)


@pytest.fixture(scope="module", params=["direct", "sdk"])
def recorder(request: pytest.FixtureRequest) -> Iterator[Recorded]:
    """Every test runs twice: with the SDK set up the standard way, where the mesh
    writes its client spans straight to the processors (``direct``), and with a
    processor of the application's own, where every span goes through the tracer."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, _Switchable):
        provider = _Switchable()
        trace.set_tracer_provider(provider)
        assert trace.get_tracer_provider() is provider, "a global TracerProvider was set already"
    sdk = SdkTracerProvider()
    recorded = Recorded(InMemorySpanExporter(), _Started())
    with pytest.MonkeyPatch.context() as patch:
        if request.param == "sdk":
            sdk.add_span_processor(recorded.started)
        else:
            _recording_starts(patch, recorded.started)
        sdk.add_span_processor(SimpleSpanProcessor(recorded.exporter))
        provider.sdk = sdk
        TRACING.refresh()
        assert (TRACING.sink is not None) == (request.param == "direct")
        yield recorded
        provider.sdk = None
        TRACING.refresh()


@pytest.fixture
def recorded(recorder: Recorded) -> Iterator[Recorded]:
    recorder.exporter.clear()
    recorder.started.names.clear()
    yield recorder
    recorder.exporter.clear()


# -- three services -----------------------------------------------------------------------


async def _drain(receive: Any) -> None:
    while (await receive()).get("more_body"):
        pass


async def _relay(send: Any, response: httpx.Response) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": response.status_code,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": response.content})


@dataclass
class Hops:
    client: Mesh  # the test's own mesh
    services: dict[str, Mesh]
    c: EchoApp
    addresses: dict[str, str] = field(default_factory=dict)

    def configure(self, ratio: float = 1.0, enabled: bool = True, access_log: bool = False) -> None:
        policy = {
            "telemetry": {
                "tracing": {"enabled": enabled, "sample_ratio": ratio},
                "access_log": access_log,
            },
            "services": {
                "a": {"endpoints": [{"address": self.addresses["a"]}]},
                # a timeout makes a's calls resilient: the sync fast lane
                "b": {"endpoints": [{"address": self.addresses["b"]}], "timeout": "20s"},
                "c": {
                    "endpoints": [{"address": self.addresses["c"]}],
                    "retries": {"attempts": 2, "on": ["5xx"], "backoff": FAST_BACKOFF},
                },
            },
        }
        for mesh in (self.client, *self.services.values()):
            mesh.update(policy)
        self.c.seen.clear()
        self.c.statuses = ()


@pytest.fixture(scope="module")
def hops(recorder: Recorded) -> Iterator[Hops]:
    meshes = {name: Mesh({}, service=name) for name in ("client", "a", "b", "c")}
    sync_client = meshes["a"].http_client(timeout=CLIENT_TIMEOUT)

    async def service_a(scope: Any, receive: Any, send: Any) -> None:
        await _drain(receive)
        # the context (span, baggage) follows into the thread
        response = await asyncio.to_thread(sync_client.get, "http://b/work")
        await _relay(send, response)

    async def service_b(scope: Any, receive: Any, send: Any) -> None:
        await _drain(receive)
        async with meshes["b"].async_http_client(timeout=CLIENT_TIMEOUT) as client:
            response = await client.get("http://c/echo")
        await _relay(send, response)

    echo = EchoApp("c")
    apps = {"a": service_a, "b": service_b, "c": echo}
    servers = {name: ServerThread(meshes[name].asgi(app)).start() for name, app in apps.items()}
    client = meshes.pop("client")
    hops = Hops(client, meshes, echo, {name: s.address for name, s in servers.items()})
    try:
        yield hops
    finally:
        sync_client.close()
        for server in servers.values():
            server.stop()
        for mesh in (client, *meshes.values()):
            mesh.close()


# -- span helpers -------------------------------------------------------------------------


def _children(spans: Sequence[ReadableSpan]) -> dict[int | None, list[ReadableSpan]]:
    tree: dict[int | None, list[ReadableSpan]] = {}
    for span in spans:
        parent = span.parent.span_id if span.parent is not None else None
        tree.setdefault(parent, []).append(span)
    for kids in tree.values():
        kids.sort(key=lambda s: (s.attributes or {}).get("mesh.attempt", 0))
    return tree


def _only_child(tree: dict[int | None, list[ReadableSpan]], span: ReadableSpan) -> ReadableSpan:
    kids = tree.get(span.context.span_id, [])
    assert len(kids) == 1, (span.name, [k.name for k in kids])
    return kids[0]


def _attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def _traceparent(span: ReadableSpan) -> str:
    context = span.context
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"


# -- the tests ----------------------------------------------------------------------------


def test_one_trace_across_three_hops_with_a_retry(
    hops: Hops, recorded: Recorded, driver: Driver
) -> None:
    hops.configure(ratio=1.0)
    hops.c.statuses = (503, 200)
    token = otel_context.attach(baggage.set_baggage("tenant", "acme"))
    try:
        [reply] = driver.get(hops.client, "http://a/start")
    finally:
        otel_context.detach(token)
    assert reply.status == 200

    # client: call + attempt; a: server, call, attempt; b: server, call, two attempts;
    # c: a server span per attempt
    spans = recorded.spans(11)
    assert len({span.context.trace_id for span in spans}) == 1
    tree = _children(spans)
    [root] = tree[None]
    assert (root.name, root.kind) == ("GET a", SpanKind.INTERNAL)
    attempt_a = _only_child(tree, root)
    server_a = _only_child(tree, attempt_a)
    call_b = _only_child(tree, server_a)
    attempt_b = _only_child(tree, call_b)
    server_b = _only_child(tree, attempt_b)
    call_c = _only_child(tree, server_b)
    first, second = tree[call_c.context.span_id]
    server_c1, server_c2 = _only_child(tree, first), _only_child(tree, second)

    for attempt in (attempt_a, attempt_b, first, second):
        assert (attempt.name, attempt.kind) == ("GET", SpanKind.CLIENT)
    for server, name in ((server_a, "GET a"), (server_b, "GET b"), (server_c1, "GET c")):
        assert (server.name, server.kind) == (name, SpanKind.SERVER)
        assert server.parent is not None and server.parent.is_remote
    assert (call_b.name, call_c.name) == ("GET b", "GET c")

    # the logical call to c: two attempts, the first failed and retried
    call = _attrs(call_c)
    assert call["http.request.method"] == "GET"
    assert call["url.full"] == "http://c/echo"
    assert "server.address" not in call  # an INTERNAL span: the attempts name the server
    assert call["mesh.service"] == "c" and call["mesh.caller"] == "b"
    assert call["mesh.route"] and call["mesh.cluster"]
    assert call["http.response.status_code"] == 200
    assert call["mesh.attempts"] == 2 and call["mesh.flags"] == ("retried",)
    assert call_c.status.status_code == StatusCode.UNSET
    [retry] = [event for event in call_c.events if event.name == "mesh.retry"]
    assert dict(retry.attributes or {}) == {
        "mesh.attempt": 2,
        "mesh.retry_reason": "503",
        "mesh.endpoint": hops.addresses["c"],
        "mesh.retry_delay_ms": pytest.approx(retry.attributes["mesh.retry_delay_ms"]),  # type: ignore[index]
    }

    failed, retried = _attrs(first), _attrs(second)
    host, port = hops.addresses["c"].split(":")
    for attempt in (failed, retried):
        assert attempt["url.full"] == f"http://{hops.addresses['c']}/echo"
        assert (attempt["server.address"], attempt["server.port"]) == (host, int(port))
        assert (attempt["network.peer.address"], attempt["network.peer.port"]) == (host, int(port))
        assert attempt["mesh.endpoint"] == hops.addresses["c"]
    assert failed["mesh.attempt"] == 1 and "http.request.resend_count" not in failed
    assert failed["http.response.status_code"] == 503 and failed["error.type"] == "503"
    assert first.status.status_code == StatusCode.ERROR
    assert retried["mesh.attempt"] == 2 and retried["http.request.resend_count"] == 1
    assert retried["mesh.retry_reason"] == "503"
    assert retried["http.response.status_code"] == 200 and "error.type" not in retried
    assert second.status.status_code == StatusCode.UNSET

    # c's server spans: the mesh's attributes, 503 as an error of the server
    served = _attrs(server_c1)
    assert served["url.path"] == "/echo" and served["mesh.service"] == "c"
    assert served["mesh.caller"] == "b" and served["http.response.status_code"] == 503
    assert server_c1.status.status_code == StatusCode.ERROR
    assert _attrs(server_c2)["mesh.attempt"] == 2
    assert _attrs(server_a)["mesh.caller"] == "client"

    # each attempt carried its own span's context, and the baggage made it to c
    seen = [record["headers"] for record in hops.c.seen]
    assert [headers["traceparent"] for headers in seen] == [
        _traceparent(first),
        _traceparent(second),
    ]
    assert all(headers["baggage"] == "tenant=acme" for headers in seen)
    assert reply.upstream_headers["traceparent"] == _traceparent(second)


def test_an_unsampled_request_starts_no_span_and_sends_no_context(
    hops: Hops, recorded: Recorded, driver: Driver
) -> None:
    hops.configure(ratio=0.0)
    [reply] = driver.get(hops.client, "http://a/start")
    assert reply.status == 200
    assert recorded.started.names == []
    assert "traceparent" not in reply.upstream_headers


@pytest.mark.parametrize("flags", ["00", "01"])
def test_a_propagated_parent_is_followed(
    hops: Hops, recorded: Recorded, flags: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The parent's flag decides, whatever the ratio: unsampled, no span but the same
    context (and baggage) all the way; sampled, a trace under the remote parent.
    Either way every access log line, on every hop and side, names the trace."""
    hops.configure(ratio=0.0 if flags == "01" else 1.0, access_log=True)
    parent = f"00-{TRACE_ID}-{PARENT_ID}-{flags}"
    with (
        caplog.at_level(logging.INFO, logger="meshlib.access"),
        httpx.Client(timeout=CLIENT_TIMEOUT) as plain,
    ):
        response = plain.get(
            f"http://{hops.addresses['a']}/start",
            headers={"traceparent": parent, "baggage": "tenant=acme"},
        )

        def lines() -> list[dict[str, Any]]:
            return [
                json.loads(r.getMessage()) for r in caplog.records if r.name == "meshlib.access"
            ]

        # a, b: in and out; c: in (server lines come once the answer is sent)
        wait_until(lambda: len(lines()) >= 5, "5 access log lines")
    assert response.status_code == 200
    assert sorted((line["direction"], line["destination"]) for line in lines()) == [
        ("inbound", "a"),
        ("inbound", "b"),
        ("inbound", "c"),
        ("outbound", "b"),
        ("outbound", "c"),
    ]
    assert {line["trace_id"] for line in lines()} == {TRACE_ID}
    seen = response.json()["headers"]
    assert seen["baggage"] == "tenant=acme"
    if flags == "00":
        assert seen["traceparent"] == parent  # passed on: no span of ours in between
        assert recorded.started.names == []
        return
    spans = recorded.spans(7)  # a: server, call, attempt; b: the same; c: server
    assert {f"{span.context.trace_id:032x}" for span in spans} == {TRACE_ID}
    [server_a] = [
        s for s in spans if s.parent is not None and s.parent.span_id == int(PARENT_ID, 16)
    ]
    assert server_a.name == "GET a" and server_a.parent is not None and server_a.parent.is_remote
    assert seen["traceparent"].startswith(f"00-{TRACE_ID}-")
    assert int(seen["traceparent"][-2:], 16) & 1  # sampled


def test_tracing_disabled_by_the_policy(hops: Hops, recorded: Recorded) -> None:
    hops.configure(enabled=False)
    [reply] = Driver("sync").get(hops.client, "http://a/start")
    assert reply.status == 200
    assert recorded.started.names == []
    assert "traceparent" not in reply.upstream_headers


def test_failed_attempts_and_the_failed_call(
    recorded: Recorded, driver: Driver, dead_address: str
) -> None:
    retries = {"attempts": 2, "on": ["connect-failure"], "backoff": FAST_BACKOFF}
    policy = {"services": {"users": {"endpoints": [{"address": dead_address}], "retries": retries}}}
    with Mesh(policy) as mesh, pytest.raises(httpx.ConnectError):
        driver.get(mesh, "http://users/x")
    spans = recorded.spans(3)
    tree = _children(spans)
    [call] = tree[None]
    first, second = tree[call.context.span_id]
    assert _attrs(call)["error.type"] == "httpx.ConnectError"
    assert call.status.status_code == StatusCode.ERROR
    assert [event.name for event in call.events] == ["mesh.retry", "exception"]
    assert _attrs(first)["error.type"] == _attrs(second)["error.type"] == "httpx.ConnectError"
    assert first.status.status_code == second.status.status_code == StatusCode.ERROR
    assert _attrs(second)["mesh.retry_reason"] == "connect-failure"
    assert _attrs(second)["http.request.resend_count"] == 1


def test_protection_events_on_the_failed_call(
    recorded: Recorded, driver: Driver, echo: StartEcho
) -> None:
    [broken] = echo("broken", status=503)
    policy = {
        "services": {
            "users": {
                "endpoints": [{"address": broken.address}],
                "circuit_breaker": {"consecutive_failures": 1, "open_for": "30s"},
                "outlier_detection": {"consecutive_5xx": 1},
            }
        }
    }
    with Mesh(policy) as mesh:
        [reply] = driver.get(mesh, "http://users/x")
    assert reply.status == 503
    spans = recorded.spans(2)
    [call] = [span for span in spans if span.kind == SpanKind.INTERNAL]
    events = {(e.name, tuple(sorted((e.attributes or {}).items()))) for e in call.events}
    assert events == {
        ("mesh.breaker.open", (("mesh.endpoint", broken.address),)),
        ("mesh.breaker.open", (("mesh.breaker", "service"),)),
        (
            "mesh.outlier.ejected",
            (("mesh.ejection_reason", "consecutive_5xx"), ("mesh.endpoint", broken.address)),
        ),
    }


def test_a_hedged_backup_has_its_own_span(
    recorded: Recorded, driver: Driver, echo: StartEcho
) -> None:
    slow, fast = echo("slow", "fast")
    slow.app.delay = 0.5
    hedging = {"hedge_after": "20ms", "max_extra_percent": 100}
    endpoints = [{"address": slow.address}, {"address": fast.address}]
    policy = {"services": {"users": {"endpoints": endpoints, "hedging": hedging}}}
    with Mesh(policy) as mesh:
        # round robin: one of the two starts on the slow endpoint; the client stays open
        # until every span has ended (a sync loser when its answer comes, an async one
        # when it is cancelled)
        replies = driver.send(
            mesh,
            [Call("http://users/x")] * 2,
            settle=lambda: len(recorded.exporter.get_finished_spans()) >= 5,
        )
    assert [reply.status for reply in replies] == [200, 200]
    spans = recorded.spans(5)
    tree = _children(spans)
    [hedged] = [s for s in tree[None] if any(e.name == "mesh.hedge" for e in s.events)]
    first, backup = tree[hedged.context.span_id]
    assert _attrs(first)["mesh.endpoint"] == slow.address and "mesh.hedge" not in _attrs(first)
    assert _attrs(backup)["mesh.endpoint"] == fast.address
    assert _attrs(backup)["mesh.hedge"] is True
    assert _attrs(backup)["http.request.resend_count"] == 1
    assert _attrs(backup)["http.response.status_code"] == 200
    if driver.kind == "async":
        assert _attrs(first)["mesh.cancelled"] is True
    else:
        assert _attrs(first)["http.response.status_code"] == 200
    assert _attrs(hedged)["mesh.flags"] == ("hedged",)
    seen = {up.name: [r["headers"]["traceparent"] for r in up.seen] for up in (slow, fast)}
    assert _traceparent(first) in seen["slow"] and _traceparent(backup) in seen["fast"]
