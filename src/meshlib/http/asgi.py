"""Server side: ASGI middleware that enforces a service's inbound policy.

In request order: the propagated deadline (a request whose deadline has
already passed is answered 504 without running the app), the caller's identity
(strict mTLS: 403 without a verified client certificate; JWT: 401 with
WWW-Authenticate), authorization (403 with an opaque reason id), rate limits per
route and per caller (429 with Retry-After), injected faults, then the app,
which is cut off with 504 if it has not started answering by the deadline.

With tracing on, the whole of it runs in a SERVER span that is the current span
while the app runs (`meshlib.telemetry.tracing`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

from meshlib.http.counted import Capture
from meshlib.resilience.deadline import INBOUND_DEADLINE
from meshlib.security.inbound import InboundSecurity
from meshlib.security.peer import INBOUND_AUTHORIZATION, cookies_of, peer_from_scope
from meshlib.security.rbac import RequestFacts, authorize
from meshlib.telemetry.metrics import METRICS, PATH, ServerKey
from meshlib.telemetry.observe import Observers
from meshlib.telemetry.stats import TrafficStats
from meshlib.telemetry.tap import Tap
from meshlib.telemetry.tracing import (
    TRACING,
    UNSAMPLED,
    ServerTrace,
    current_context,
    roll,
    trace_id_hex,
)

if TYPE_CHECKING:
    from meshlib.config.store import SnapshotStore
    from meshlib.security.jwt_auth import Principal

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

TIMEOUT_HEADER = b"x-mesh-timeout-ms"
ATTEMPT_HEADER = b"x-mesh-attempt"
log = logging.getLogger("meshlib.asgi")


class _Headers(Mapping[str, str]):
    """Case-insensitive view of ASGI's raw header list, decoded on first use."""

    __slots__ = ("_map", "_raw")

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self._raw = raw
        self._map: dict[str, str] | None = None

    def decoded(self) -> dict[str, str]:
        """All headers by lowercase name (the last value wins)."""
        return self._decoded()

    def _decoded(self) -> dict[str, str]:
        if self._map is None:
            self._map = {}
            for key, value in self._raw:
                # the last value wins: a mesh client appends its x-mesh-* headers after
                # any the application forwarded
                self._map[key.decode("latin-1").lower()] = value.decode("latin-1")
        return self._map

    def __getitem__(self, name: str) -> str:
        return self._decoded()[name.lower()]

    def get(self, name: str, default: Any = None) -> Any:  # no KeyError raised and caught
        return self._decoded().get(name.lower(), default)

    def __iter__(self) -> Iterator[str]:
        return iter(self._decoded())

    def __len__(self) -> int:
        return len(self._decoded())


def _keeping(receive: Receive, kept: Capture) -> Receive:
    """``receive`` keeping the first bytes of the request body in ``kept``."""

    async def receiving() -> Message:
        message = await receive()
        if message["type"] == "http.request":
            kept.keep(message.get("body", b""))
        return message

    return receiving


async def _respond(send: Send, status: int, text: str, headers: list[tuple[bytes, bytes]]) -> None:
    body = text.encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _attempt_number(value: str | None) -> int:
    """The caller's attempt number: mesh clients send x-mesh-attempt from the second
    attempt on, so a missing (or malformed) header means the first."""
    if value is None or not value.isdigit():
        return 1
    return max(1, int(value))


class _Refusal:
    __slots__ = ("headers", "status", "text")

    def __init__(
        self, status: int, text: str, headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        self.status = status
        self.text = text
        self.headers = headers or []


class MeshASGIMiddleware:
    """Wraps an ASGI app with the inbound policy of ``service`` (hot-reloaded)."""

    def __init__(
        self,
        app: ASGIApp,
        store: SnapshotStore,
        service: str,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        stats: TrafficStats | None = None,
        observers: Observers | None = None,
    ) -> None:
        self.app = app
        self._store = store
        self.service = service
        self._rng = rng or random.Random()
        self._clock = clock
        self._stats = stats or TrafficStats()
        self._observers = observers or Observers(Tap(), lambda: store.config.telemetry)
        TRACING.refresh()  # a provider installed since the last look is used at once
        METRICS.refresh()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 0
        sent = 0  # response body bytes
        response_headers: list[tuple[bytes, bytes]] = []
        flags: list[str] = []
        tap = self._observers.tap
        # bodies only for a tap that asked for them, at most its cap
        request_kept = response_kept = None
        if tap.active and tap.body_cap > 0:
            request_kept, response_kept = Capture(tap.body_cap), Capture(tap.body_cap)
            receive = _keeping(receive, request_kept)

        async def observed_send(message: Message) -> None:
            nonlocal status, response_headers, sent
            kind = message["type"]
            if kind == "http.response.body":
                body = message.get("body", b"")
                sent += len(body)
                if response_kept is not None:
                    response_kept.keep(body)
            elif kind == "http.response.start":
                status = message["status"]
                response_headers = message.get("headers") or []
            await send(message)

        started = time.perf_counter()
        headers = _Headers(scope.get("headers", []))
        # tracing: while off, two attribute reads; while on, an unsampled request
        # without a propagated context sets a context variable and nothing else
        if started >= TRACING.check_at:
            TRACING.refresh(started)
        if started >= METRICS.check_at:
            METRICS.refresh(started)
        telemetry = self._store.config.telemetry
        server: ServerTrace | None = None
        unsampled = None
        if TRACING.on:
            settings = telemetry.tracing
            if settings.enabled:
                seen = headers.decoded()
                if current_context() or not TRACING.fields.isdisjoint(seen):
                    server = TRACING.start_server(scope, seen, self.service, settings.sample_ratio)
                elif roll() < settings.sample_ratio:
                    # rolled already: a root that start_server must not roll for again
                    server = TRACING.start_server(scope, seen, self.service, 1.0)
                else:
                    unsampled = UNSAMPLED.set(True)
        error: BaseException | None = None
        try:
            await self._handle(scope, receive, observed_send, flags, headers)
        except BaseException as exc:
            error = exc
            raise
        finally:
            # golden metrics: every answer counts, refusals included; 5xx and
            # requests that got no answer are failures
            elapsed = time.perf_counter() - started
            policy = self._store.current.inbound.get(self.service)
            route = policy.rule_for(scope.get("path", "/")).name if policy is not None else "*"
            if telemetry.metrics:
                self._stats.inbound(self.service, route).record(0 < status < 500, elapsed)
                if METRICS.on:  # the recorders made once per label set
                    key: ServerKey = (self.service, route, status // 100)
                    if "path" in telemetry.metric_labels:
                        key = (*key, ((PATH, scope.get("path", "/")),))
                    try:
                        recorders = METRICS.server_recorders.get(key) or METRICS.server_recorder(
                            key
                        )
                        recorders[0](elapsed)
                        declared = headers.get("content-length")
                        if declared is not None and declared.isdigit():
                            recorders[1](int(declared))
                        if status:
                            recorders[2](sent)
                        if status == 429 and "rate_limited" in flags:
                            METRICS.server_rate_limited(self.service, route)
                    except Exception:  # a metrics SDK must never break the request
                        log.exception("recording the request's metrics failed")
            if server is not None:
                server.finish(status, route, flags, error)
            elif unsampled is not None:
                UNSAMPLED.reset(unsampled)
            observers = self._observers
            if observers.tap.active or telemetry.access_log:
                scope.setdefault("extensions", {}).setdefault("mesh", {})["flags"] = flags
                try:
                    observers.inbound(
                        self.service,
                        route,
                        scope,
                        status,
                        response_headers,
                        elapsed,
                        error,
                        trace_id_hex(server.trace_id if server is not None else 0),
                        request_kept.data if request_kept is not None else None,
                        response_kept.data if response_kept is not None else None,
                    )
                except Exception:  # observing must never break the request
                    log.exception("tap or access log failed")

    async def _handle(
        self, scope: Scope, receive: Receive, send: Send, flags: list[str], headers: _Headers
    ) -> None:
        budget_ms = headers.get(TIMEOUT_HEADER.decode())
        deadline = None
        if budget_ms is not None:
            try:
                remaining = int(budget_ms) / 1000.0
            except ValueError:
                remaining = None
            if remaining is not None:
                if remaining <= 0:
                    flags.append("deadline")
                    await _respond(send, 504, "deadline exceeded before the request started\n", [])
                    return
                deadline = self._clock() + remaining
        snapshot = self._store.current
        peer = peer_from_scope(scope)
        principal = None
        security = snapshot.inbound_security.get(self.service)
        if security is not None and security.active:
            refusal = await self._check(security, scope, headers, peer)
            if isinstance(refusal, _Refusal):
                flags.append("denied")
                await _respond(send, refusal.status, refusal.text, refusal.headers)
                return
            principal = refusal
        policy = snapshot.inbound.get(self.service)
        if policy is not None:
            # a verified identity beats what the caller says about itself
            caller = peer or headers.get(policy.caller_header)
            if caller is None:
                client = scope.get("client")
                caller = str(client[0]) if client else "unknown"
            verdict = policy.judge(scope.get("path", "/"), caller, headers, self._rng)
            if verdict.limited:
                flags.append("rate_limited")
                retry_after = str(max(1, math.ceil(verdict.retry_after))).encode()
                await _respond(
                    send,
                    429,
                    f"rate limited by rule {verdict.rule!r}\n",
                    [(b"retry-after", retry_after)],
                )
                return
            fault = verdict.fault
            if fault is not None:
                flags.append("faulted")
                if fault.delay:
                    await asyncio.sleep(fault.delay)
                if fault.abort_status is not None:
                    await _respond(
                        send, fault.abort_status, "fault injected\n", [(b"x-mesh-fault", b"abort")]
                    )
                    return
        extensions = scope.setdefault("extensions", {})
        extensions["mesh"] = {
            "service": self.service,
            "deadline": deadline,
            "attempt": _attempt_number(headers.get(ATTEMPT_HEADER.decode())),
            "peer": peer,
            "principal": principal,
            "flags": flags,
        }
        forwarded = None
        if principal is not None and principal.token is not None:
            forwarded = INBOUND_AUTHORIZATION.set(f"Bearer {principal.token}")
        try:
            if deadline is None:
                await self.app(scope, receive, send)
                return
            token = INBOUND_DEADLINE.set(deadline)  # calls made while serving inherit it
            try:
                await self._with_deadline(scope, receive, send, deadline, flags)
            finally:
                INBOUND_DEADLINE.reset(token)
        finally:
            if forwarded is not None:
                INBOUND_AUTHORIZATION.reset(forwarded)

    async def _check(
        self, security: InboundSecurity, scope: Scope, headers: _Headers, peer: str
    ) -> Principal | _Refusal | None:
        """mTLS requirement, then JWT authentication, then authorization."""
        if security.mtls == "strict" and not peer:
            log.info("%s: refused a request without a verified client certificate", self.service)
            return _Refusal(403, "mutual TLS required\n")
        principal = None
        if security.authenticator is not None:
            from meshlib.security.jwt_auth import AuthError  # loaded with the authenticator

            try:
                principal = await security.authenticator.authenticate(
                    headers, cookies_of(headers.get("cookie"))
                )
            except AuthError as exc:
                log.info("%s: JWT rejected: %s", self.service, exc.reason)
                challenge = exc.www_authenticate.encode("latin-1", "replace")
                return _Refusal(401, "invalid token\n", [(b"www-authenticate", challenge)])
        if security.policies:
            server = scope.get("server")
            facts = RequestFacts(
                method=scope.get("method", "GET"),
                path=scope.get("path", "/"),
                port=server[1] if server and len(server) > 1 else None,
                headers=headers,
                peer=peer,
                request_principal=principal.principal if principal is not None else "",
                claims=principal.claims if principal is not None else {},
            )
            verdict = authorize(security.policies, facts)
            if not verdict.allowed:
                return _Refusal(403, f"RBAC: access denied ({verdict.reason_id})\n")
        return principal

    async def _with_deadline(
        self, scope: Scope, receive: Receive, send: Send, deadline: float, flags: list[str]
    ) -> None:
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            async with asyncio.timeout(max(0.0, deadline - self._clock())):
                await self.app(scope, receive, tracking_send)
        except TimeoutError:
            if started:
                raise  # the answer is half sent: all we can do is drop the connection
            log.info("%s: request cut off at its deadline", self.service)
            flags.append("deadline")
            await _respond(send, 504, "deadline exceeded while handling the request\n", [])
