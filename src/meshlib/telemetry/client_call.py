"""What both mesh transports record about each call: the golden-metrics window,
OpenTelemetry metrics and spans, and the tap and access log. One copy for the sync
and the async client, so they cannot drift apart.

While tracing and metrics are off and nobody listens, a call costs ``begin`` and
``succeeded`` (or ``failed``): a window update and a few attribute reads.
"""

from __future__ import annotations

import logging
from time import perf_counter
from typing import TYPE_CHECKING, Any

import httpx

from meshlib.errors import RateLimitedError
from meshlib.http.counted import Capture, CountedBody
from meshlib.telemetry.metrics import ENDPOINT, METRICS, PATH, ClientKey, Extra
from meshlib.telemetry.observe import Observers
from meshlib.telemetry.stats import TrafficStats
from meshlib.telemetry.tap import Tap
from meshlib.telemetry.tracing import (
    TRACING,
    UNSAMPLED,
    ClientTrace,
    call_trace_id,
    current_context,
    roll,
    trace_id_hex,
)
from meshlib.telemetry.window import Window

if TYPE_CHECKING:
    from meshlib.config.store import SnapshotStore
    from meshlib.http.plan import Plan
    from meshlib.routing.decide import Decision

log = logging.getLogger("meshlib.http")

Call = tuple[Any, "Window | None", float, "ClientTrace | None"]
"""``begin``'s answer: the telemetry settings in force, the window, the start time
(perf_counter) and the trace (None: not traced)."""


def _asked(
    labels: list[str],
    decision: Decision,
    request: httpx.Request,
    response: httpx.Response | None,
) -> Extra:
    """The labels ``telemetry.metric_labels`` asks for: the endpoint that answered
    (the last attempt's) and the request path."""
    out = []
    for label in labels:
        if label == "endpoint":
            report = response.extensions.get("mesh") if response is not None else None
            endpoint = report.get("endpoint") if report else None
            out.append((ENDPOINT, endpoint or decision.endpoint.address))
        elif label == "path":
            out.append((PATH, request.url.path))
    return tuple(out)


class ClientTelemetry:
    """The per-call telemetry of one transport (``caller``: this process's service)."""

    __slots__ = ("_caller", "_observers", "_stats", "_store")

    def __init__(
        self,
        store: SnapshotStore,
        stats: TrafficStats | None,
        observers: Observers | None,
        caller: str | None,
    ) -> None:
        self._store = store
        self._stats = stats or TrafficStats()
        self._observers = observers or Observers(Tap(), lambda: store.config.telemetry)
        self._caller = caller
        # providers installed since the last look are used at once; the store's
        # breakers, budgets and endpoints are reported by the observable instruments
        TRACING.refresh()
        METRICS.refresh()
        METRICS.watch(store, caller)

    def begin(self, plan: Plan, request: httpx.Request) -> Call:
        """Before the call: its window, its start time, and its trace if sampled."""
        telemetry = self._store.config.telemetry
        decision = plan.decision
        window = (
            self._stats.outbound(decision.service.name, decision.route.name)
            if telemetry.metrics
            else None
        )
        started = perf_counter()
        # tracing: while off, two attribute reads (see meshlib.telemetry.tracing); while
        # on, an unsampled call without a parent costs a few more and two C calls
        if started >= TRACING.check_at:
            TRACING.refresh(started)
        if started >= METRICS.check_at:
            METRICS.refresh(started)
        trace = None
        if TRACING.on:
            settings = telemetry.tracing
            if settings.enabled:
                parent = current_context()
                if parent:
                    trace = TRACING.start_client(
                        plan, request, parent, settings.sample_ratio, self._caller
                    )
                elif roll() < settings.sample_ratio and not UNSAMPLED.get():
                    trace = TRACING.start_root(plan, request, self._caller)
        return telemetry, window, started, trace

    def succeeded(
        self, call: Call, decision: Decision, request: httpx.Request, response: httpx.Response
    ) -> None:
        """The call answered ``response``."""
        telemetry, window, started, trace = call
        elapsed = perf_counter() - started
        if window is not None:
            status = response.status_code
            window.record(status < 500, elapsed)
            if METRICS.on:  # the recorders made once per label set
                key: ClientKey = (
                    self._caller,
                    decision.service.name,
                    decision.route.name,
                    decision.cluster.subset,
                    status // 100,
                )
                if telemetry.metric_labels:
                    key = (*key, _asked(telemetry.metric_labels, decision, request, response))
                try:
                    recorders = METRICS.client_recorders.get(key) or METRICS.client_recorder(key)
                    recorders[0](elapsed)
                    # the answer's size when the application closes it (a mesh body
                    # counts what was read); the request's as its Content-Length
                    # declares it (not looked up for GET, whose body means nothing)
                    body = response.stream
                    if isinstance(body, CountedBody):
                        body.on_close = recorders[2]
                    if request.method != "GET":
                        sent = request.headers.get("content-length")
                        if sent is not None and sent.isdigit():
                            recorders[1](int(sent))
                except Exception:  # a metrics SDK must never cost the caller its response
                    log.exception("recording the request's metrics failed")
        if trace is not None:
            trace.finish(response, None)
        if self._observers.tap.active or telemetry.access_log:
            self._observe(decision, request, response, None, elapsed, trace)

    def failed(
        self, call: Call, decision: Decision, request: httpx.Request, error: Exception
    ) -> None:
        """The call raised ``error`` (no response)."""
        telemetry, window, started, trace = call
        elapsed = perf_counter() - started
        if window is not None:
            window.record(False, elapsed)
            if METRICS.on:
                self._record_error(telemetry.metric_labels, decision, request, error, elapsed)
        if trace is not None:
            trace.finish(None, error)
        if self._observers.tap.active or telemetry.access_log:
            self._observe(decision, request, None, error, elapsed, trace)

    def _record_error(
        self,
        labels: list[str],
        decision: Decision,
        request: httpx.Request,
        error: Exception,
        seconds: float,
    ) -> None:
        try:
            key: ClientKey = (
                self._caller,
                decision.service.name,
                decision.route.name,
                decision.cluster.subset,
                0,
            )
            if labels:
                key = (*key, _asked(labels, decision, request, None))
            (METRICS.client_recorders.get(key) or METRICS.client_recorder(key))[0](seconds)
            if isinstance(error, RateLimitedError):
                METRICS.client_rate_limited(
                    self._caller, decision.service.name, decision.route.name
                )
        except Exception:  # metrics must never change the call's outcome
            log.exception("recording metrics failed")

    def _observe(
        self,
        decision: Decision,
        request: httpx.Request,
        response: httpx.Response | None,
        error: BaseException | None,
        seconds: float,
        trace: ClientTrace | None,
    ) -> None:
        try:
            trace_id = trace_id_hex(call_trace_id(trace))
        except Exception:  # observing must never break the call
            log.exception("reading the call's trace id failed")
            trace_id = ""

        def emit(response_body: bytes | None = None) -> None:
            try:
                self._observers.outbound(
                    self._caller,
                    decision.service.name,
                    decision.route.name,
                    decision.endpoint.address,
                    request,
                    response,
                    error,
                    seconds,
                    trace_id,
                    response_body,
                )
            except Exception:  # observing must never break the call
                log.exception("tap or access log failed")

        tap = self._observers.tap
        body = response.stream if response is not None else None
        if tap.active and tap.body_cap > 0 and isinstance(body, CountedBody):
            # a tap wants the answer's body: the event waits until the application
            # has read it and closed the response
            body.capture = Capture(tap.body_cap, emit)
            return
        emit()
