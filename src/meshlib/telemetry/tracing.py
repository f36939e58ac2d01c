"""OpenTelemetry tracing of the calls through the mesh, written against the API only:
the application installs the SDK (a TracerProvider, exporters, propagators).

Spans. A call made with a mesh client gets one INTERNAL span for the logical call,
named after the method and the destination service (``GET users``), and one CLIENT
child per attempt on the wire, named after the method (``GET``, the semantic
conventions' name for an HTTP client span without a URL template): the fast lane's
first attempt, every retry and every hedged backup, so a retried call shows each try
with its endpoint, status and reason. Every attempt sends its own span's context
through the global propagator (``traceparent``, ``tracestate``, ``baggage`` by
default). ``mesh.asgi`` wraps each request in a SERVER span (``GET users``), child of
the caller's attempt, and makes it the current span while the app runs, so the calls
the app makes through the mesh, and its own spans, become its children.

Sampling is parent-based, decided by the mesh before any SDK call. A call or request
that has a parent (the current span; for a server, the propagated context) follows
the parent's sampled flag; one without rolls ``telemetry.tracing.sample_ratio``
(default 1.0, as the SDK's default sampler; hot-reloadable, unlike the SDK's). An
unsampled request creates no span of any kind; when it has a parent it still passes
the parent's context on (sampled flag off) with its baggage. A request served
unsampled without a parent marks its context (`UNSAMPLED`) so that the calls it
makes do not start traces of their own: the first hop decides for the whole request.
The SDK's own sampler still applies to the spans the mesh starts.

Off. While the API's global TracerProvider is the default proxy (no SDK installed),
a no-op provider, or hands out no-op tracers (``OTEL_SDK_DISABLED``), tracing is off.
`TRACING` keeps that verdict: the request path reads ``TRACING.check_at`` and
``TRACING.on`` and nothing more. It looks again once a second, and whenever a
client or a middleware is created, so a provider installed after the mesh started
is picked up within a second.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import re
from collections.abc import Callable, Mapping
from contextvars import ContextVar, Token
from time import perf_counter
from typing import TYPE_CHECKING, Any

import httpx
from opentelemetry import baggage, propagate, trace
from opentelemetry import context as otel_context
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, StatusCode, Tracer, TracerProvider

from meshlib.endpoint import Endpoint
from meshlib.resilience.outcome import error_kind

if TYPE_CHECKING:
    from meshlib.http.plan import Plan
    from meshlib.resilience.attempts import Attempt
    from meshlib.resilience.faults import Fault
    from meshlib.telemetry.spans import Sink

log = logging.getLogger("meshlib.telemetry")

Headers = list[tuple[bytes, bytes]]

RECHECK_SECONDS = 1.0
"""How often the provider is looked up again (it cannot be watched)."""
SCHEMA_URL = "https://opentelemetry.io/schemas/1.26.0"

# semantic conventions (stable HTTP attributes)
HTTP_METHOD = "http.request.method"
HTTP_METHOD_ORIGINAL = "http.request.method_original"
HTTP_STATUS = "http.response.status_code"
RESEND_COUNT = "http.request.resend_count"
URL_FULL = "url.full"
URL_PATH = "url.path"
URL_SCHEME = "url.scheme"
SERVER_ADDRESS = "server.address"
SERVER_PORT = "server.port"
PEER_ADDRESS = "network.peer.address"
PEER_PORT = "network.peer.port"
PROTOCOL_VERSION = "network.protocol.version"
USER_AGENT = "user_agent.original"
ERROR_TYPE = "error.type"

# the mesh's own
MESH_SERVICE = "mesh.service"
MESH_ROUTE = "mesh.route"
MESH_CLUSTER = "mesh.cluster"
MESH_SUBSET = "mesh.subset"
MESH_CALLER = "mesh.caller"
MESH_ENDPOINT = "mesh.endpoint"
MESH_ATTEMPT = "mesh.attempt"
MESH_ATTEMPTS = "mesh.attempts"
MESH_RETRY_REASON = "mesh.retry_reason"
MESH_HEDGE = "mesh.hedge"
MESH_TIMEOUT_MS = "mesh.timeout_ms"
MESH_FLAGS = "mesh.flags"
MESH_CANCELLED = "mesh.cancelled"

KNOWN_METHODS = frozenset(
    ("CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "QUERY", "TRACE")
)
# query parameters whose values the semantic conventions ask to redact in url.full
_SIGNATURE_PARAMS = frozenset(("AWSAccessKeyId", "Signature", "sig", "X-Goog-Signature"))


def _context_reader() -> Callable[[], Context]:
    """The current OpenTelemetry context, read as cheaply as possible: the ContextVar
    behind the API's default runtime context is one C call, where the API's
    ``get_current`` costs two Python calls more. Any other runtime context goes
    through the API."""
    runtime = getattr(otel_context, "_RUNTIME_CONTEXT", None)
    var = getattr(runtime, "_current_context", None)
    if isinstance(var, ContextVar):
        get: Callable[[], Context] = var.get
        return get
    return otel_context.get_current


current_context = _context_reader()
"""The current OpenTelemetry context (an empty one when nothing was set)."""

UNSAMPLED: ContextVar[bool] = ContextVar("meshlib_unsampled", default=False)
"""True while serving a request that was not sampled and came without a parent: the
calls made meanwhile are not sampled either (there is no context to pass on)."""

_EMPTY = Context()

roll = random.Random().random
"""The sampling draw: its own generator, so that tracing never shifts the draws of a
mesh's seeded random source (splits, balancing)."""


class Tracing:
    """Whether spans can be made (a real provider is installed), and the tracer.

    The request path reads `check_at` and `on`; everything else is looked at in
    `refresh`, at most once a second, and in the ``start_*`` methods, which run only
    for calls that are traced or carry a context to pass on.
    """

    __slots__ = ("_provider", "check_at", "fields", "on", "plain_propagation", "sink", "tracer")

    def __init__(self, provider: Callable[[], TracerProvider] = trace.get_tracer_provider) -> None:
        self._provider = provider
        self.on = False
        self.tracer: Tracer | None = None
        self.sink: Sink | None = None
        """Where client spans go without SDK span objects (see meshlib.telemetry.spans);
        None: through the tracer."""
        self.plain_propagation = False
        """The global propagator is the default one, which the mesh writes itself."""
        self.fields: frozenset[str] = frozenset()
        """Header names the global propagator reads (a request without any of them has
        no propagated context)."""
        self.check_at = -math.inf
        """``perf_counter`` time of the next `refresh` the request path asks for."""

    def refresh(self, now: float | None = None) -> None:
        """Look up the provider and the propagator's fields again."""
        from meshlib import __version__  # at call time: meshlib imports this module

        tracer = None
        try:
            provider = self._provider()
            if not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
                found = provider.get_tracer("meshlib", __version__, SCHEMA_URL)
                if not isinstance(found, trace.NoOpTracer | trace.ProxyTracer):
                    tracer = found
            self.fields = frozenset(propagate.get_global_textmap().fields)
        except Exception:  # a broken provider means no tracing, never a failed request
            log.exception("tracing disabled: the tracer provider failed")
            tracer = None
        self.sink = _sink_for(tracer, self.sink)
        self.plain_propagation = plain_propagation()
        self.tracer = tracer
        self.on = tracer is not None
        self.check_at = (perf_counter() if now is None else now) + RECHECK_SECONDS

    def extract(
        self, headers: Mapping[str, str], context: Context
    ) -> tuple[Context, trace.SpanContext]:
        """``context`` with what the propagator finds in ``headers`` (lowercase
        names), and the span context found (invalid if none): a ``traceparent`` alone,
        the common case, is read directly when the propagator is the default one."""
        if self.plain_propagation and "tracestate" not in headers and "baggage" not in headers:
            value = headers.get("traceparent")
            parsed = _traceparent(value) if value else None
            if parsed is not None:
                span = trace.NonRecordingSpan(parsed)
                return trace.set_span_in_context(span, context), parsed
        found = propagate.extract(headers, context)
        return found, trace.get_current_span(found).get_span_context()

    def start_client(
        self,
        plan: Plan,
        request: httpx.Request,
        parent: Context,
        ratio: float,
        caller: str | None,
    ) -> ClientTrace | None:
        """The trace of one call with a mesh client: a `ClientTrace` if sampled; else
        None, after adding the parent's context (if any) to ``plan.headers``.

        ``ratio`` applies only without a parent span (`start_root` is for a call the
        caller rolled for already)."""
        try:
            span_context = trace.get_current_span(parent).get_span_context()
            tracer = self.tracer
            if _sampled(span_context, ratio) and tracer is not None:
                return ClientTrace(tracer, self.sink, plan, request, parent, span_context, caller)
            if span_context.is_valid and self.plain_propagation:
                plan.headers = inject_direct(plan.headers, span_context, parent)
            elif parent:
                plan.headers = inject(plan.headers, parent)
        except Exception:
            log.exception("tracing failed; the call goes on untraced")
        return None

    def start_root(
        self, plan: Plan, request: httpx.Request, caller: str | None
    ) -> ClientTrace | None:
        """The trace of a call without a parent that the caller rolled to sample."""
        tracer = self.tracer
        if tracer is None:
            return None
        try:
            return ClientTrace(
                tracer, self.sink, plan, request, _EMPTY, trace.INVALID_SPAN_CONTEXT, caller
            )
        except Exception:
            log.exception("tracing failed; the call goes on untraced")
            return None

    def start_server(
        self, scope: Mapping[str, Any], headers: Mapping[str, str], service: str, ratio: float
    ) -> ServerTrace | None:
        """The trace of one request served by ``mesh.asgi``; ``headers`` are lowercase.

        The parent is the current span if there is one (an instrumentation around the
        middleware), else the context propagated in the headers. ``ratio`` applies only
        without a parent (a caller that already rolled passes 1.0)."""
        try:
            parent = current = current_context()
            span_context = (
                trace.get_current_span(parent).get_span_context()
                if parent
                else trace.INVALID_SPAN_CONTEXT  # nothing current: no span in it
            )
            if not span_context.is_valid and not self.fields.isdisjoint(headers):
                parent, span_context = self.extract(headers, parent)
            tracer = self.tracer
            if _sampled(span_context, ratio) and tracer is not None:
                name = _server_name(scope, service)
                attributes = _server_attributes(scope, headers, service)
                span: Span
                if self.sink is not None:
                    above = span_context if span_context.is_valid else None
                    span = self.sink.start(name, above, SpanKind.SERVER, attributes)
                else:
                    span = tracer.start_span(name, parent, SpanKind.SERVER, attributes)
                attached = otel_context.attach(trace.set_span_in_context(span, parent))
                return ServerTrace(span, attached, None, span.get_span_context().trace_id)
            # no span: pass on what came in (the parent, its flags, the baggage)
            passed = otel_context.attach(parent) if parent is not current else None
            unsampled = None if span_context.is_valid else UNSAMPLED.set(True)
            return ServerTrace(None, passed, unsampled, span_context.trace_id)
        except Exception:
            log.exception("tracing failed; the request goes on untraced")
            return None


TRACING = Tracing()
"""The process's tracing state, shared by every mesh (the provider is global)."""


def inject(headers: Headers, context: Context) -> Headers:
    """``headers`` with the propagation headers of ``context`` (a new list): those the
    application set itself under the same names are replaced, since the mesh's span
    is the one on the wire."""
    carrier: dict[str, str] = {}
    try:
        propagate.inject(carrier, context)
        added = [(key.encode("latin-1"), value.encode("latin-1")) for key, value in carrier.items()]
    except Exception:  # a propagator's failure must not fail the call
        log.exception("tracing could not inject the context; the call goes without it")
        return headers
    if not added:
        return headers
    names = {name.lower() for name, _ in added}
    out = [(name, value) for name, value in headers if name.lower() not in names]
    out.extend(added)
    return out


def _sink_for(tracer: Tracer | None, current: Sink | None) -> Sink | None:
    """Where spans go without SDK span objects (meshlib.telemetry.spans, which
    imports the SDK: only looked at once the tracer is the SDK's)."""
    if tracer is None or not type(tracer).__module__.startswith("opentelemetry.sdk."):
        return None
    try:
        from meshlib.telemetry.spans import sink_for
    except ImportError:  # an SDK too different to import from
        log.debug("spans go through the tracer", exc_info=True)
        return None
    return sink_for(tracer, current)


def plain_propagation() -> bool:
    """Whether the global propagator is the API's default (W3C trace context and
    baggage), which `inject_direct` writes without going through it."""
    try:
        from opentelemetry.baggage.propagation import W3CBaggagePropagator
        from opentelemetry.propagators.composite import CompositePropagator
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        textmap = propagate.get_global_textmap()
        if type(textmap) is not CompositePropagator:
            return False
        kinds = [type(p) for p in textmap._propagators]
        return kinds == [TraceContextTextMapPropagator, W3CBaggagePropagator]
    except Exception:
        return False


_PROPAGATED = {b"traceparent": b"traceparent", b"tracestate": b"tracestate", b"baggage": b"baggage"}
_PROPAGATED_LENGTHS = frozenset(len(name) for name in _PROPAGATED)


_TRACEPARENT = re.compile("00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


def _traceparent(value: str) -> trace.SpanContext | None:
    """The remote span of a version 00 ``traceparent`` in its exact form; None for
    anything else, which the propagator then reads (and may refuse)."""
    if _TRACEPARENT.fullmatch(value) is None:
        return None
    trace_id = int(value[3:35], 16)
    span_id = int(value[36:52], 16)
    if not trace_id or not span_id:
        return None
    return trace.SpanContext(trace_id, span_id, True, trace.TraceFlags(int(value[53:], 16)))


def inject_direct(headers: Headers, span: trace.SpanContext, parent: Context) -> Headers:
    """``headers`` with W3C ``traceparent``/``tracestate`` for ``span`` and the
    ``baggage`` of ``parent``, as the default propagator would write them (a new
    list; the application's own headers of those names are replaced)."""
    traceparent = (
        b"traceparent",
        b"00-%032x-%016x-%02x" % (span.trace_id, span.span_id, span.trace_flags),
    )
    state = span.trace_state
    bag = baggage.get_all(parent) if parent else None
    if not state and not bag:  # the common case: one header
        for name, _ in headers:  # the length first: lowering a name allocates
            if len(name) == 11 and name.lower() == b"traceparent":
                headers = [(n, v) for n, v in headers if n.lower() != b"traceparent"]
                break
        return [*headers, traceparent]
    added = [traceparent]
    if state:
        added.append((b"tracestate", state.to_header().encode("latin-1")))
    if bag:
        from opentelemetry.baggage.propagation import W3CBaggagePropagator

        carrier: dict[str, str] = {}
        W3CBaggagePropagator().inject(carrier, parent)
        value = carrier.get("baggage")
        if value:
            added.append((b"baggage", value.encode("latin-1")))
    names = {name for name, _ in added}
    return [(name, value) for name, value in headers if name.lower() not in names] + added


class ClientTrace:
    """The spans of one sampled call: the logical span and one per attempt.

    Attempt spans are children of the logical span through an explicit context, so
    attempts sent from other threads (sync hedging) or tasks need nothing current.
    """

    __slots__ = (
        "_context",
        "_guard",
        "_last",
        "_method",
        "_name",
        "_parent",
        "_reason",
        "_scheme",
        "_sink",
        "_target",
        "_tracer",
        "span",
    )

    def __init__(
        self,
        tracer: Tracer,
        sink: Sink | None,
        plan: Plan,
        request: httpx.Request,
        parent: Context,
        parent_span: trace.SpanContext,
        caller: str | None,
    ) -> None:
        decision = plan.decision
        service = decision.service.name
        method = request.method
        url = request.url
        asked = _redacted(plan.path)
        port = url.port
        attributes: dict[str, Any] = {
            HTTP_METHOD: method,
            # a mesh service is called over http:// (plan_request refuses the rest)
            URL_FULL: f"http://{url.host}:{port}{asked}" if port else f"http://{url.host}{asked}",
            MESH_SERVICE: service,
            MESH_ROUTE: decision.route.name,
            MESH_CLUSTER: decision.cluster.name,
        }
        name = method
        if method not in KNOWN_METHODS:
            attributes[HTTP_METHOD] = method = "_OTHER"
            attributes[HTTP_METHOD_ORIGINAL] = name
            name = "HTTP"
        if decision.cluster.subset:
            attributes[MESH_SUBSET] = decision.cluster.subset
        if caller:
            attributes[MESH_CALLER] = caller
        self.span: Span
        if sink is not None:
            self.span = sink.start(
                f"{name} {service}",
                parent_span if parent_span.is_valid else None,
                SpanKind.INTERNAL,
                attributes,
            )
            self._context = parent  # attempts name their parent span directly
        else:
            self.span = tracer.start_span(
                f"{name} {service}", parent, SpanKind.INTERNAL, attributes
            )
            self._context = trace.set_span_in_context(self.span, parent)
        self._sink = sink
        self._parent = parent
        self._tracer = tracer
        self._name = name
        self._method = method
        self._scheme = "http" if plan.tls is None else "https"
        target = decision.target
        self._target = asked if target == plan.path else _redacted(target)
        self._guard = decision.cluster.guard
        self._reason: str | None = None
        self._last: Endpoint | None = None

    # -- attempts ------------------------------------------------------------------

    def attempt(
        self,
        headers: Headers,
        endpoint: Endpoint,
        number: int,
        timeout: float | None,
        hedge: bool = False,
    ) -> tuple[Headers, Span]:
        """Start the span of one attempt; its headers carry the span's context."""
        attributes: dict[str, Any] = {
            HTTP_METHOD: self._method,
            URL_FULL: f"{self._scheme}://{endpoint.address}{self._target}",
            SERVER_ADDRESS: endpoint.host,
            SERVER_PORT: endpoint.port,
            PEER_ADDRESS: endpoint.host,
            PEER_PORT: endpoint.port,
            MESH_ENDPOINT: endpoint.address,
            MESH_ATTEMPT: number,
        }
        if number > 1:
            attributes[RESEND_COUNT] = number - 1
        if hedge:
            attributes[MESH_HEDGE] = True
        else:
            if self._reason is not None:
                attributes[MESH_RETRY_REASON] = self._reason
                self._reason = None
            self._last = endpoint
        if timeout is not None:
            attributes[MESH_TIMEOUT_MS] = max(1, int(timeout * 1000))
        sink = self._sink
        if sink is None:
            span = self._tracer.start_span(self._name, self._context, SpanKind.CLIENT, attributes)
        else:
            span = sink.start(self._name, self.span.get_span_context(), SpanKind.CLIENT, attributes)
            if TRACING.plain_propagation:
                return inject_direct(headers, span.context, self._parent), span
        return inject(headers, trace.set_span_in_context(span, self._context)), span

    # -- what happened between attempts ----------------------------------------------

    def retry(self, failed: Attempt, following: Attempt, outcome: int | BaseException) -> None:
        """``failed`` ended with ``outcome`` (a status or an error) and ``following``
        retries it: an event on the logical span, the reason on the next attempt's."""
        reason = str(outcome) if isinstance(outcome, int) else error_kind(outcome)
        self._reason = reason
        attributes: dict[str, Any] = {
            MESH_ATTEMPT: following.number,
            MESH_RETRY_REASON: reason,
            MESH_ENDPOINT: failed.endpoint.address,
        }
        if following.delay:
            attributes["mesh.retry_delay_ms"] = following.delay * 1000.0
        self.span.add_event("mesh.retry", attributes)
        self._protection(failed.endpoint)

    def hedge(self, backup: Attempt) -> None:
        """A backup attempt goes out while ``backup.number - 1`` is still in flight."""
        self.span.add_event(
            "mesh.hedge", {MESH_ATTEMPT: backup.number, MESH_ENDPOINT: backup.endpoint.address}
        )

    def fault(self, fault: Fault) -> None:
        """An injected fault (delay and/or abort) applies to this call."""
        attributes: dict[str, Any] = {}
        if fault.delay:
            attributes["mesh.fault.delay_ms"] = fault.delay * 1000.0
        if fault.abort_status is not None:
            attributes["mesh.fault.abort_status"] = fault.abort_status
        self.span.add_event("mesh.fault", attributes)

    def finish(self, response: httpx.Response | None, error: BaseException | None) -> None:
        """End the logical span with the call's response, or the error it raised."""
        span = self.span
        try:
            if response is not None:
                status = response.status_code
                report = response.extensions.get("mesh")
                if report:
                    span.set_attribute(MESH_ATTEMPTS, report.get("attempts", 1))
                    if report.get("flags"):
                        span.set_attribute(MESH_FLAGS, tuple(report["flags"]))
                else:
                    span.set_attribute(MESH_ATTEMPTS, 1)
                _set_status(span, status, 400)
                if status >= 500 and self._last is not None:
                    self._protection(self._last)
            elif error is not None:
                if isinstance(error, asyncio.CancelledError):
                    span.set_attribute(MESH_CANCELLED, True)
                else:
                    span.set_attribute(ERROR_TYPE, _error_type(error))
                    span.record_exception(error)
                    span.set_status(StatusCode.ERROR, str(error) or None)
                    if self._last is not None:
                        self._protection(self._last)
            span.end()
        except Exception:
            log.exception("tracing failed to end a call span")

    def _protection(self, endpoint: Endpoint) -> None:
        """Events for what a failed attempt's outcome left behind, read after it was
        recorded: the endpoint's or the service's breaker open, the endpoint ejected."""
        guard = self._guard
        if guard is None:
            return
        address = endpoint.address
        board = guard.breakers
        if board is not None:
            breaker = board._breakers.get(address)
            if breaker is not None and breaker.state == "open":
                self.span.add_event("mesh.breaker.open", {MESH_ENDPOINT: address})
        service_breaker = guard.cluster_breaker
        if service_breaker is not None and service_breaker.state == "open":
            self.span.add_event("mesh.breaker.open", {"mesh.breaker": "service"})
        outlier = guard.outlier
        if outlier is not None and address in outlier.ejected():
            host = outlier._hosts.get(address)
            reason = host.reason if host is not None and host.reason else "unknown"
            self.span.add_event(
                "mesh.outlier.ejected", {MESH_ENDPOINT: address, "mesh.ejection_reason": reason}
            )


def end_attempt(span: Span, status: int | None, error: BaseException | None) -> None:
    """End an attempt's span with its status, or the error that ended it."""
    try:
        if status is not None:
            _set_status(span, status, 400)
        elif isinstance(error, asyncio.CancelledError):
            span.set_attribute(MESH_CANCELLED, True)  # a hedge that lost the race
        elif error is not None:
            span.set_attribute(ERROR_TYPE, _error_type(error))
            span.set_status(StatusCode.ERROR, str(error) or None)
        span.end()
    except Exception:
        log.exception("tracing failed to end an attempt span")


class ServerTrace:
    """What `Tracing.start_server` set up for one request, undone by `finish`: the
    server span (None when not sampled), the attached context, the unsampled mark."""

    __slots__ = ("_token", "_unsampled", "span", "trace_id")

    def __init__(
        self,
        span: Span | None,
        token: Token[Context] | None,
        unsampled: Token[bool] | None,
        trace_id: int = 0,
    ) -> None:
        self.span = span
        self._token = token
        self._unsampled = unsampled
        self.trace_id = trace_id
        """The request's trace (its span's, or the caller's when not sampled); 0: none."""

    def finish(
        self, status: int, route: str, flags: list[str], error: BaseException | None
    ) -> None:
        """The answer's status (0: none was sent), the inbound rule, the middleware's
        flags (denied, rate_limited, deadline, faulted) and the app's error."""
        try:
            if self._token is not None:
                otel_context.detach(self._token)
            if self._unsampled is not None:
                UNSAMPLED.reset(self._unsampled)
            span = self.span
            if span is None:
                return
            span.set_attribute(MESH_ROUTE, route)
            if flags:
                span.set_attribute(MESH_FLAGS, list(flags))
            if status:
                _set_status(span, status, 500)  # a 4xx is the client's error, not ours
            if error is not None and not isinstance(error, asyncio.CancelledError):
                if not status or status < 500:
                    span.set_attribute(ERROR_TYPE, _error_type(error))
                span.record_exception(error)
                span.set_status(StatusCode.ERROR, str(error) or None)
            span.end()
        except Exception:
            log.exception("tracing failed to end a server span")


# -- helpers ------------------------------------------------------------------------------


def _sampled(parent: trace.SpanContext, ratio: float) -> bool:
    """Parent-based sampling: the parent's flag if there is a parent; else, unless
    an unsampled request is being served, a roll of ``ratio``."""
    if parent.is_valid:
        return bool(parent.trace_flags.sampled)
    return not UNSAMPLED.get() and roll() < ratio


def trace_id_hex(trace_id: int) -> str:
    """A trace id as W3C writes it (32 hex digits), ``""`` for none (0)."""
    return f"{trace_id:032x}" if trace_id else ""


def call_trace_id(call: ClientTrace | None) -> int:
    """The trace a client call is part of: its own spans' if sampled, else the
    current span's (a parent passed on unsampled); 0 outside any trace."""
    if call is not None:
        return call.span.get_span_context().trace_id
    context = trace.get_current_span(current_context()).get_span_context()
    return context.trace_id if context.is_valid else 0


def _set_status(span: Span, status: int, error_from: int) -> None:
    span.set_attribute(HTTP_STATUS, status)
    if status >= error_from:
        span.set_attribute(ERROR_TYPE, str(status))
        span.set_status(StatusCode.ERROR)


def _error_type(error: BaseException) -> str:
    """The exception's fully qualified class name (the convention's error.type)."""
    kind = type(error)
    module = kind.__module__
    return kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"


def _redacted(target: str) -> str:
    """A request target with the values of signature query parameters redacted."""
    path, mark, query = target.partition("?")
    if not mark or not any(name in query for name in _SIGNATURE_PARAMS):
        return target
    parts = []
    for part in query.split("&"):
        name, equals, _ = part.partition("=")
        parts.append(f"{name}=REDACTED" if equals and name in _SIGNATURE_PARAMS else part)
    return f"{path}?{'&'.join(parts)}"


def _server_name(scope: Mapping[str, Any], service: str) -> str:
    method = scope.get("method") or "GET"
    return f"{method if method in KNOWN_METHODS else 'HTTP'} {service}"


def _server_attributes(
    scope: Mapping[str, Any], headers: Mapping[str, str], service: str
) -> dict[str, Any]:
    method = scope.get("method") or "GET"
    attributes: dict[str, Any] = {
        HTTP_METHOD: method if method in KNOWN_METHODS else "_OTHER",
        URL_PATH: scope.get("path") or "/",
        URL_SCHEME: scope.get("scheme") or "http",
        MESH_SERVICE: service,
    }
    if method not in KNOWN_METHODS:
        attributes[HTTP_METHOD_ORIGINAL] = method
    server = scope.get("server")
    if server:
        attributes[SERVER_ADDRESS] = str(server[0])
        if len(server) > 1 and server[1] is not None:
            attributes[SERVER_PORT] = server[1]
    client = scope.get("client")
    if client:
        attributes[PEER_ADDRESS] = str(client[0])
        if len(client) > 1:
            attributes[PEER_PORT] = client[1]
    version = scope.get("http_version")
    if version:
        attributes[PROTOCOL_VERSION] = version
    agent = headers.get("user-agent")
    if agent:
        attributes[USER_AGENT] = agent
    caller = headers.get("x-mesh-caller")
    if caller:
        attributes[MESH_CALLER] = caller
    attempt = headers.get("x-mesh-attempt")
    if attempt and attempt.isdigit():
        attributes[MESH_ATTEMPT] = int(attempt)
    return attributes
