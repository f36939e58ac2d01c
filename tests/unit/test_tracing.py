"""Tracing without I/O: when tracing is off, the sampling decisions of clients and
servers, the headers each attempt sends, and the transports' and middleware's hot path
with a stand-in send.

The tests hand ``TRACING`` a provider of their own instead of the API's global one
(which a process can set only once), and give it back afterwards.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from opentelemetry import baggage, trace
from opentelemetry import context as otel_context
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import (
    NonRecordingSpan,
    NoOpTracer,
    NoOpTracerProvider,
    ProxyTracerProvider,
    SpanContext,
    SpanKind,
    TraceFlags,
    Tracer,
    TracerProvider,
)

from meshlib import Mesh
from meshlib.errors import ConfigError
from meshlib.http.plan import Plan, plan_request
from meshlib.telemetry import tracing
from meshlib.telemetry.tracing import TRACING, UNSAMPLED, Tracing, current_context, inject

TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
PARENT_ID = 0x00F067AA0BA902B7
Headers = list[tuple[bytes, bytes]]


class _Started(SpanProcessor):
    def __init__(self) -> None:
        self.names: list[str] = []

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        self.names.append(span.name)


@dataclass
class Sdk:
    provider: SdkTracerProvider
    exporter: InMemorySpanExporter
    started: _Started

    @property
    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())


def _sdk() -> Sdk:
    provider = SdkTracerProvider()
    sdk = Sdk(provider, InMemorySpanExporter(), _Started())
    provider.add_span_processor(sdk.started)
    provider.add_span_processor(SimpleSpanProcessor(sdk.exporter))
    return sdk


@pytest.fixture
def sdk() -> Sdk:
    return _sdk()


@pytest.fixture
def traced(sdk: Sdk, monkeypatch: pytest.MonkeyPatch) -> Iterator[Sdk]:
    """The process's TRACING on, with this test's provider."""
    monkeypatch.setattr(TRACING, "_provider", lambda: sdk.provider)
    TRACING.refresh()
    yield sdk
    monkeypatch.undo()
    TRACING.refresh()


@pytest.fixture
def untraced(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The process's TRACING as without an SDK: the API's default proxy provider."""
    monkeypatch.setattr(TRACING, "_provider", ProxyTracerProvider)
    TRACING.refresh()
    yield
    monkeypatch.undo()
    TRACING.refresh()


def _parent(sampled: bool) -> otel_context.Context:
    span_context = SpanContext(
        TRACE_ID, PARENT_ID, is_remote=True, trace_flags=TraceFlags(1 if sampled else 0)
    )
    return trace.set_span_in_context(NonRecordingSpan(span_context))


def _mesh(**telemetry: Any) -> Mesh:
    policy = {
        "telemetry": {"tracing": telemetry},
        "services": {"users": {"endpoints": [{"address": "127.0.0.1:9"}]}},
    }
    return Mesh(policy, service="front", rng=random.Random(1))


def _plan(mesh: Mesh, headers: dict[str, str] | None = None) -> tuple[Plan, httpx.Request]:
    request = httpx.Request("GET", "http://users/x?sig=secret&a=1", headers=headers)
    plan = plan_request(mesh.snapshot, request, random.Random(1))
    assert plan is not None
    return plan, request


def _header(headers: Headers, name: bytes) -> list[str]:
    return [value.decode() for key, value in headers if key.lower() == name]


# -- off ----------------------------------------------------------------------------------


class _NoOpTracers(TracerProvider):
    def get_tracer(self, *args: Any, **kwargs: Any) -> Tracer:
        return NoOpTracer()


def _broken() -> TracerProvider:
    raise RuntimeError("no provider")


@pytest.mark.parametrize(
    "provider", [ProxyTracerProvider, NoOpTracerProvider, _NoOpTracers, _broken]
)
def test_off_without_a_real_provider(provider: Any) -> None:
    state = Tracing(provider)
    assert not state.on and state.check_at == float("-inf")  # the first request looks
    state.refresh(100.0)
    assert not state.on and state.tracer is None
    assert state.check_at == 100.0 + tracing.RECHECK_SECONDS


def test_on_with_an_sdk_provider_and_off_again_when_it_stops_tracing(sdk: Sdk) -> None:
    provider: list[TracerProvider] = [sdk.provider]
    state = Tracing(lambda: provider[0])
    state.refresh()
    assert state.on and state.tracer is not None
    assert state.fields == {"traceparent", "tracestate", "baggage"}
    provider[0] = NoOpTracerProvider()
    state.refresh()
    assert not state.on and state.tracer is None


def test_current_context_reads_what_the_api_attached() -> None:
    assert current_context() == otel_context.get_current()
    token = otel_context.attach(_parent(True))
    try:
        assert current_context() is otel_context.get_current()
        assert trace.get_current_span(current_context()).get_span_context().span_id == PARENT_ID
    finally:
        otel_context.detach(token)


def test_the_policy_block() -> None:
    assert _mesh().snapshot is not None  # defaults: enabled, ratio 1
    with pytest.raises(ConfigError):
        _mesh(sample_ratio=1.5)
    with pytest.raises(ConfigError):
        _mesh(rate=0.5)


# -- the client's decision ----------------------------------------------------------------


def test_a_root_is_sampled_by_the_ratio(sdk: Sdk) -> None:
    state = Tracing(lambda: sdk.provider)
    state.refresh()
    with _mesh() as mesh:
        plan, request = _plan(mesh)
        before = plan.headers
        assert state.start_client(plan, request, otel_context.Context(), 0.0, "front") is None
        assert plan.headers is before and sdk.started.names == []
        call = state.start_client(plan, request, otel_context.Context(), 1.0, "front")
    assert call is not None
    call.finish(httpx.Response(200), None)
    [span] = sdk.spans
    assert (span.name, span.kind, span.parent) == ("GET users", SpanKind.INTERNAL, None)
    attributes = dict(span.attributes or {})
    assert attributes["url.full"] == "http://users/x?sig=REDACTED&a=1"
    assert attributes["mesh.caller"] == "front" and attributes["mesh.service"] == "users"
    assert attributes["http.response.status_code"] == 200 and attributes["mesh.attempts"] == 1


def test_a_sampled_parent_is_followed_whatever_the_ratio(sdk: Sdk) -> None:
    state = Tracing(lambda: sdk.provider)
    state.refresh()
    with _mesh() as mesh:
        plan, request = _plan(mesh)
        call = state.start_client(plan, request, _parent(True), 0.0, None)
    assert call is not None
    call.finish(None, httpx.ConnectError("refused"))
    [span] = sdk.spans
    assert span.parent is not None and span.parent.span_id == PARENT_ID
    assert span.context.trace_id == TRACE_ID
    assert dict(span.attributes or {})["error.type"] == "httpx.ConnectError"


def test_an_unsampled_parent_is_passed_on_without_a_span(sdk: Sdk) -> None:
    state = Tracing(lambda: sdk.provider)
    state.refresh()
    parent = baggage.set_baggage("tenant", "acme", _parent(False))
    with _mesh() as mesh:
        plan, request = _plan(mesh, {"traceparent": "00-stale-01", "x-app": "1"})
        assert state.start_client(plan, request, parent, 1.0, None) is None
    assert sdk.started.names == []
    assert _header(plan.headers, b"traceparent") == [f"00-{TRACE_ID:032x}-{PARENT_ID:016x}-00"]
    assert _header(plan.headers, b"baggage") == ["tenant=acme"]
    assert _header(plan.headers, b"x-app") == ["1"]


def test_baggage_alone_travels_unsampled(sdk: Sdk) -> None:
    state = Tracing(lambda: sdk.provider)
    state.refresh()
    with _mesh() as mesh:
        plan, request = _plan(mesh)
        parent = baggage.set_baggage("tenant", "acme")
        assert state.start_client(plan, request, parent, 0.0, None) is None
    assert sdk.started.names == []
    assert _header(plan.headers, b"baggage") == ["tenant=acme"]
    assert _header(plan.headers, b"traceparent") == []


def test_calls_made_while_serving_an_unsampled_root_are_not_sampled(sdk: Sdk) -> None:
    state = Tracing(lambda: sdk.provider)
    state.refresh()
    token = UNSAMPLED.set(True)
    try:
        with _mesh() as mesh:
            plan, request = _plan(mesh)
            assert state.start_client(plan, request, otel_context.Context(), 1.0, None) is None
    finally:
        UNSAMPLED.reset(token)
    assert sdk.started.names == []


# -- the headers of each attempt ----------------------------------------------------------


def test_each_attempt_sends_its_own_span_context(sdk: Sdk) -> None:
    state = Tracing(lambda: sdk.provider)
    state.refresh()
    with _mesh() as mesh:
        plan, request = _plan(mesh, {"traceparent": "00-stale-01"})
        call = state.start_client(plan, request, baggage.set_baggage("k", "v"), 1.0, None)
        assert call is not None
        endpoint = plan.decision.endpoint
        original = list(plan.headers)
        first_headers, first = call.attempt(plan.headers, endpoint, 1, 0.25)
        second_headers, second = call.attempt(plan.headers, endpoint, 2, None, hedge=True)
    assert plan.headers == original  # never changed in place
    for headers, span in ((first_headers, first), (second_headers, second)):
        context = span.get_span_context()
        expected = f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"
        assert _header(headers, b"traceparent") == [expected]
        assert _header(headers, b"baggage") == ["k=v"]
    tracing.end_attempt(first, 503, None)
    tracing.end_attempt(second, None, asyncio.CancelledError())
    call.finish(httpx.Response(200), None)
    spans = {
        span.name + str(dict(span.attributes or {}).get("mesh.attempt")): span for span in sdk.spans
    }
    one, two = dict(spans["GET1"].attributes or {}), dict(spans["GET2"].attributes or {})
    assert one["mesh.timeout_ms"] == 250 and one["error.type"] == "503"
    assert one["url.full"] == "http://127.0.0.1:9/x?sig=REDACTED&a=1"
    assert two["mesh.hedge"] is True and two["http.request.resend_count"] == 1
    assert two["mesh.cancelled"] is True and "error.type" not in two


def test_inject_leaves_headers_alone_when_there_is_nothing_to_send() -> None:
    headers = [(b"traceparent", b"app's own")]
    assert inject(headers, otel_context.Context()) is headers


def test_a_failing_propagator_never_fails_the_call(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise ValueError("bad propagator")

    monkeypatch.setattr(tracing.propagate, "inject", broken)
    headers = [(b"x-app", b"1")]
    assert inject(headers, _parent(True)) is headers


def test_unknown_methods_follow_the_conventions(sdk: Sdk) -> None:
    state = Tracing(lambda: sdk.provider)
    state.refresh()
    with _mesh() as mesh:
        request = httpx.Request("PURGE", "http://users/x")
        plan = plan_request(mesh.snapshot, request, random.Random(1))
        assert plan is not None
        call = state.start_client(plan, request, otel_context.Context(), 1.0, None)
    assert call is not None
    call.finish(httpx.Response(204), None)
    [span] = sdk.spans
    attributes = dict(span.attributes or {})
    assert span.name == "HTTP users"
    assert attributes["http.request.method"] == "_OTHER"
    assert attributes["http.request.method_original"] == "PURGE"


# -- the transports' hot path, with a stand-in send ---------------------------------------


class _Recorder:
    """Replaces MeshTransport._send: records the headers, answers 200."""

    def __init__(self) -> None:
        self.headers: list[Headers] = []

    def __call__(
        self, request: httpx.Request, endpoint: Any, target: bytes, headers: Headers, *rest: Any
    ) -> httpx.Response:
        self.headers.append(list(headers))
        return httpx.Response(200, content=b"ok")


def _send_through(mesh: Mesh, parent: otel_context.Context | None = None) -> Headers:
    transport = mesh.transport()
    recorder = _Recorder()
    transport._send = recorder  # type: ignore[method-assign]
    token = otel_context.attach(parent) if parent is not None else None
    try:
        with httpx.Client(transport=transport) as client:
            assert client.get("http://users/x").status_code == 200
    finally:
        if token is not None:
            otel_context.detach(token)
    [headers] = recorder.headers
    return headers


@pytest.mark.usefixtures("untraced")
def test_off_sends_exactly_what_it_sent_without_tracing() -> None:
    assert not TRACING.on
    with _mesh() as mesh:
        headers = _send_through(mesh, baggage.set_baggage("k", "v", _parent(True)))
    assert _header(headers, b"traceparent") == [] and _header(headers, b"baggage") == []


def test_sampled_call_through_the_transport(traced: Sdk) -> None:
    with _mesh(sample_ratio=1.0) as mesh:
        headers = _send_through(mesh)
    call, attempt = sorted(traced.spans, key=lambda span: span.kind.value)
    assert (call.kind, attempt.kind) == (SpanKind.INTERNAL, SpanKind.CLIENT)
    assert attempt.parent is not None and attempt.parent.span_id == call.context.span_id
    context = attempt.context
    expected = f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"
    assert _header(headers, b"traceparent") == [expected]


def test_unsampled_call_through_the_transport_builds_nothing(
    traced: Sdk, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_spans(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("an unsampled call started a span")

    assert TRACING.tracer is not None
    monkeypatch.setattr(TRACING.tracer, "start_span", no_spans)
    with _mesh(sample_ratio=0.0) as mesh:
        assert _header(_send_through(mesh), b"traceparent") == []
        # with an unsampled parent: its context goes on, still without a span
        headers = _send_through(mesh, _parent(False))
    assert _header(headers, b"traceparent") == [f"00-{TRACE_ID:032x}-{PARENT_ID:016x}-00"]
    assert traced.started.names == []


# -- the server's decision ----------------------------------------------------------------


class _App:
    """Records the span and the unsampled mark it runs under."""

    def __init__(self) -> None:
        self.span_context: SpanContext | None = None
        self.unsampled: bool | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.span_context = trace.get_current_span().get_span_context()
        self.unsampled = UNSAMPLED.get()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def _serve(mesh: Mesh, headers: dict[str, str]) -> tuple[_App, int]:
    app = _App()
    middleware = mesh.asgi(app, "users")
    sent: list[dict[str, Any]] = []
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/x",
        "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8080),
        "http_version": "1.1",
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def run() -> None:
        await middleware(scope, receive, send)
        # everything set for the request is undone once it is served
        assert not trace.get_current_span().get_span_context().is_valid
        assert not UNSAMPLED.get()

    asyncio.run(run())
    return app, sent[0]["status"]


def test_server_span_under_the_propagated_parent(traced: Sdk) -> None:
    parent = f"00-{TRACE_ID:032x}-{PARENT_ID:016x}-01"
    with _mesh(sample_ratio=0.0) as mesh:
        app, status = _serve(mesh, {"traceparent": parent, "x-mesh-caller": "front"})
    assert status == 200
    [span] = traced.spans
    assert (span.name, span.kind) == ("GET users", SpanKind.SERVER)
    assert span.parent is not None and span.parent.span_id == PARENT_ID and span.parent.is_remote
    assert app.span_context is not None and app.span_context.span_id == span.context.span_id
    attributes = dict(span.attributes or {})
    assert attributes["url.path"] == "/x" and attributes["mesh.caller"] == "front"
    assert attributes["network.peer.address"] == "127.0.0.1"
    assert (attributes["server.address"], attributes["server.port"]) == ("127.0.0.1", 8080)
    assert attributes["http.response.status_code"] == 200 and attributes["mesh.route"]


def test_server_without_a_parent_rolls_the_ratio(traced: Sdk) -> None:
    with _mesh(sample_ratio=1.0) as mesh:
        app, _ = _serve(mesh, {})
    [span] = traced.spans
    assert span.parent is None and app.unsampled is False
    with _mesh(sample_ratio=0.0) as mesh:
        app, _ = _serve(mesh, {})
    assert len(traced.spans) == 1
    assert app.unsampled is True  # the calls the app makes will not start traces
    assert app.span_context is not None and not app.span_context.is_valid


def test_server_with_an_unsampled_parent_passes_it_to_the_app(traced: Sdk) -> None:
    parent = f"00-{TRACE_ID:032x}-{PARENT_ID:016x}-00"
    with _mesh(sample_ratio=1.0) as mesh:
        app, _ = _serve(mesh, {"traceparent": parent})
    assert traced.started.names == []
    assert app.span_context is not None and app.span_context.span_id == PARENT_ID
    assert app.unsampled is False  # it has a context to follow


@pytest.mark.usefixtures("untraced")
def test_server_untraced_sets_nothing() -> None:
    with _mesh() as mesh:
        app, status = _serve(mesh, {"traceparent": f"00-{TRACE_ID:032x}-{PARENT_ID:016x}-01"})
    assert status == 200 and app.unsampled is False
    assert app.span_context is not None and not app.span_context.is_valid


# -- helpers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/x", "/x"),
        ("/x?a=1", "/x?a=1"),
        ("/x?Signature=abc&a=1&sig", "/x?Signature=REDACTED&a=1&sig"),
        (
            "/x?AWSAccessKeyId=k&X-Goog-Signature=s",
            "/x?AWSAccessKeyId=REDACTED&X-Goog-Signature=REDACTED",
        ),
        ("/x?signature=lower", "/x?signature=lower"),
    ],
)
def test_signature_parameters_are_redacted(target: str, expected: str) -> None:
    assert tracing._redacted(target) == expected


def test_error_types_are_qualified_names() -> None:
    assert tracing._error_type(httpx.ReadError("x")) == "httpx.ReadError"
    assert tracing._error_type(TimeoutError()) == "TimeoutError"
    assert tracing._error_type(ConfigError([])) == "meshlib.errors.ConfigError"
