"""Per-request observers beyond the golden metrics: the live tap and the access log.

Both cost nothing while off: the request path reads `Observers.wanted` (one
attribute of the tap and one of the policy) and builds an event only when someone
listens.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import httpx

from meshlib.telemetry.tap import Tap, TapEvent, redact

access_log = logging.getLogger("meshlib.access")


class Observers:
    """The tap and the access log of one mesh; ``settings`` returns the policy's
    `telemetry` block in force (access_log, redact_headers), read per event.

    The request path checks ``tap.active or <policy>.telemetry.access_log`` itself
    before calling in: two attribute reads when nobody listens.
    """

    def __init__(self, tap: Tap, settings: Callable[[], Any]) -> None:
        self.tap = tap
        self._settings = settings

    def outbound(
        self,
        source: str | None,
        destination: str,
        route: str,
        default_endpoint: str,
        request: httpx.Request,
        response: httpx.Response | None,
        error: BaseException | None,
        seconds: float,
        trace_id: str = "",
        response_body: bytes | None = None,
    ) -> None:
        """One call made by a mesh client (after it answered or failed; the answer's
        body only for a tap that asked for bodies, once the application read it)."""
        redacted = self._settings().redact_headers
        report: dict[str, Any] = {}
        if response is not None:
            report = response.extensions.get("mesh") or {}
        body_cap = self.tap.body_cap
        event = TapEvent(
            timestamp=time.time(),
            direction="outbound",
            source=source or "",
            destination=destination,
            route=route,
            method=request.method,
            path=request.url.path,
            status=response.status_code if response is not None else None,
            error=_error(error),
            duration_ms=seconds * 1000.0,
            endpoint=report.get("endpoint", default_endpoint),
            attempts=report.get("attempts", 1),
            request_headers=redact(request.headers.raw, redacted),
            response_headers=redact(response.headers.raw, redacted) if response else (),
            peer="",
            flags=tuple(report.get("flags", ())),
            trace_id=trace_id,
            request_body=_body(request, body_cap),
            response_body=response_body,
        )
        self.emit(event)

    def inbound(
        self,
        service: str,
        route: str,
        scope: dict[str, Any] | Any,
        status: int,
        response_headers: Iterable[tuple[bytes, bytes]],
        seconds: float,
        error: BaseException | None,
        trace_id: str = "",
        request_body: bytes | None = None,
        response_body: bytes | None = None,
    ) -> None:
        """One request served through mesh.asgi (after the answer, or the failure);
        the bodies only for a tap that asked for them."""
        redacted = self._settings().redact_headers
        mesh = scope.get("extensions", {}).get("mesh") or {}
        headers = dict(scope.get("headers") or [])
        caller = headers.get(b"x-mesh-caller", b"").decode("latin-1")
        event = TapEvent(
            timestamp=time.time(),
            direction="inbound",
            source=caller,
            destination=service,
            route=route,
            method=scope.get("method", ""),
            path=scope.get("path", ""),
            status=status or None,
            error=_error(error),
            duration_ms=seconds * 1000.0,
            endpoint="",
            attempts=1,
            request_headers=redact(scope.get("headers") or (), redacted),
            response_headers=redact(response_headers, redacted),
            peer=mesh.get("peer", ""),
            flags=tuple(mesh.get("flags", ())),
            trace_id=trace_id,
            request_body=request_body,
            response_body=response_body,
        )
        self.emit(event)

    def emit(self, event: TapEvent) -> None:
        if self.tap.active:
            self.tap.publish(event)
        if self._settings().access_log:
            access_log.info("%s", json.dumps(access_record(event), separators=(",", ":")))


def access_record(event: TapEvent) -> dict[str, Any]:
    """The access log's JSON object for one request (no headers, no bodies)."""
    return {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(event.timestamp))
        + f".{int(event.timestamp * 1000) % 1000:03d}Z",
        "trace_id": event.trace_id,
        "direction": event.direction,
        "source": event.source,
        "destination": event.destination,
        "route": event.route,
        "method": event.method,
        "path": event.path,
        "endpoint": event.endpoint,
        "peer": event.peer,
        "status": event.status,
        "error": event.error,
        "duration_ms": round(event.duration_ms, 3),
        "attempts": event.attempts,
        "flags": list(event.flags),
    }


def _error(error: BaseException | None) -> str | None:
    if error is None:
        return None
    text = str(error)
    return f"{type(error).__name__}: {text[:200]}" if text else type(error).__name__


def _body(request: httpx.Request, cap: int) -> bytes | None:
    if cap <= 0:
        return None
    try:
        return request.content[:cap]
    except httpx.RequestNotRead:
        return None  # a streamed body is never read for the tap
