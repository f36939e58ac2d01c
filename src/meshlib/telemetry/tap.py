"""Live tap: a stream of request/response metadata that matches a filter, in process.

The request path checks ``tap.active`` (a plain attribute) before building any
`TapEvent`, so an idle tap costs one attribute read per request. While at least one
`TapSubscription` is open, the request path builds an event (headers already passed
through `redact`, bodies captured up to ``tap.body_cap`` bytes) and hands it to
`Tap.publish`, which never blocks and never raises: each subscription has a bounded
queue, and an event that finds it full is dropped and counted on that subscription.

Subscriptions are read with plain or async iteration, from any thread or event loop::

    with tap.subscribe(TapFilter(service="users", status="5xx"), limit=100) as sub:
        for event in sub:
            ...
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import logging
import math
import random
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

log = logging.getLogger("meshlib.telemetry.tap")

DIRECTIONS = ("outbound", "inbound")
"""``outbound``: seen by the client side; ``inbound``: seen by the serving side."""

REDACTED = "[redacted]"
DEFAULT_REDACTED = frozenset(
    {"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key"}
)
"""Header names whose values never leave the request path (lowercase)."""

STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")

Headers = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class TapEvent:
    """One request as a side of the mesh saw it, after the response (or the failure)."""

    timestamp: float
    """When the request started, epoch seconds."""
    direction: str
    """``"outbound"`` (client side) or ``"inbound"`` (server side)."""
    source: str
    """The calling service, ``""`` if unknown."""
    destination: str
    """The service called (outbound) or served (inbound)."""
    route: str
    method: str
    path: str
    """Without the query string."""
    status: int | None
    """``None`` when no response came back."""
    error: str | None
    """``"ExceptionClass: message"``, short; ``None`` when the request did not fail."""
    duration_ms: float
    endpoint: str
    """``"host:port"`` of the endpoint that answered, or ``""``."""
    attempts: int
    request_headers: Headers
    """Already passed through `redact`."""
    response_headers: Headers
    """Already passed through `redact`."""
    peer: str
    """The caller's verified SPIFFE ID (inbound with mTLS), else ``""``."""
    flags: tuple[str, ...]
    """E.g. ``"retried"``, ``"hedged"``, ``"ejected"``, ``"faulted"``, ``"denied"``."""
    trace_id: str = ""
    """The W3C trace id (32 hex digits) of the trace the request is part of, sampled
    or not; ``""`` outside any trace."""
    request_body: bytes | None = None
    """Only when a subscription asked for bodies; at most its cap."""
    response_body: bytes | None = None
    """Only when a subscription asked for bodies; at most its cap."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (``json.dumps(..., allow_nan=False)`` accepts it).

        Headers become ``[name, value]`` lists (order and repeats kept), bodies are
        base64 strings (bodies are arbitrary bytes), and a non-finite float is ``None``.
        """
        return {
            "timestamp": _finite(self.timestamp),
            "direction": self.direction,
            "source": self.source,
            "destination": self.destination,
            "route": self.route,
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "error": self.error,
            "duration_ms": _finite(self.duration_ms),
            "endpoint": self.endpoint,
            "attempts": self.attempts,
            "request_headers": [[name, value] for name, value in self.request_headers],
            "response_headers": [[name, value] for name, value in self.response_headers],
            "peer": self.peer,
            "flags": list(self.flags),
            "trace_id": self.trace_id,
            "request_body": _b64(self.request_body),
            "response_body": _b64(self.response_body),
        }


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _b64(body: bytes | None) -> str | None:
    return None if body is None else base64.b64encode(body).decode("ascii")


def redact(
    headers: Iterable[tuple[str | bytes, str | bytes]], extra: Iterable[str] = ()
) -> Headers:
    """Headers as lowercase ``str`` pairs (bytes decoded as latin-1), with the values
    of `DEFAULT_REDACTED` and ``extra`` names (any case) replaced by ``"[redacted]"``."""
    # a lone string would otherwise redact its single characters
    names = (extra,) if isinstance(extra, str) else extra
    sensitive = DEFAULT_REDACTED.union(name.lower() for name in names)
    out: list[tuple[str, str]] = []
    for raw_name, raw_value in headers:
        name = (raw_name.decode("latin-1") if isinstance(raw_name, bytes) else raw_name).lower()
        if name in sensitive:
            value = REDACTED
        elif isinstance(raw_value, bytes):
            value = raw_value.decode("latin-1")
        else:
            value = raw_value
        out.append((name, value))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class TapFilter:
    """Which events a subscription receives; every field left ``None`` matches all.

    ``status`` is an exact code (100-599), a class (``"4xx"``, ``"5xx"``, ...) or
    ``"error"``: events with no response or with an error recorded. An event without
    a status matches no code or class. ``sample`` keeps that fraction of the matching
    events, drawn per subscription from ``random.Random(seed)``.
    """

    service: str | None = None
    """Matches the event's destination."""
    route: str | None = None
    status: int | str | None = None
    path_prefix: str | None = None
    direction: str | None = None
    sample: float = 1.0
    seed: int | None = None
    """Seeds each subscription's sampler; ``None`` for a fresh random one."""

    def __post_init__(self) -> None:
        for name in ("service", "route"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"tap filter: {name} must be a non-empty string, got {value!r}")
        if self.path_prefix is not None and (
            not isinstance(self.path_prefix, str) or not self.path_prefix.startswith("/")
        ):
            raise ValueError(
                f"tap filter: path_prefix must start with '/', got {self.path_prefix!r}"
            )
        if self.direction is not None and self.direction not in DIRECTIONS:
            raise ValueError(
                f"tap filter: direction must be 'outbound' or 'inbound', got {self.direction!r}"
            )
        # frozen: normalising goes through object.__setattr__
        object.__setattr__(self, "status", _status(self.status))
        sample = self.sample
        if (
            isinstance(sample, bool)
            or not isinstance(sample, int | float)
            or not 0.0 <= sample <= 1.0
        ):
            raise ValueError(f"tap filter: sample must be a number in [0, 1], got {sample!r}")
        object.__setattr__(self, "sample", float(sample))
        seed = self.seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"tap filter: seed must be an integer, got {self.seed!r}")

    def matches(self, event: TapEvent) -> bool:
        """Whether ``event`` passes every criterion (sampling is the subscription's)."""
        if self.service is not None and event.destination != self.service:
            return False
        if self.route is not None and event.route != self.route:
            return False
        if self.direction is not None and event.direction != self.direction:
            return False
        if self.path_prefix is not None and not event.path.startswith(self.path_prefix):
            return False
        wanted = self.status
        if wanted is None:
            return True
        if isinstance(wanted, int):
            return event.status == wanted
        if wanted == "error":
            return event.status is None or event.error is not None
        return event.status is not None and event.status // 100 == int(wanted[0])


def _status(status: object) -> int | str | None:
    """``status`` checked and normalised: an int code, a lowercase class, or "error"."""
    if status is None:
        return None
    if isinstance(status, str):
        text = status.strip().lower()
        if text.isdigit():
            status = int(text)
        elif text in STATUS_CLASSES or text == "error":
            return text
        else:
            raise ValueError(
                "tap filter: status must be a code (100-599), a class "
                f"({', '.join(STATUS_CLASSES)}) or 'error', got {status!r}"
            )
    if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
        raise ValueError(f"tap filter: status code must be in 100-599, got {status!r}")
    return status


def _fit(event: TapEvent, cap: int) -> TapEvent:
    """``event`` with its bodies cut to ``cap`` bytes (none at all when ``cap`` is 0)."""
    request, response = event.request_body, event.response_body
    if request is None and response is None:
        return event
    if cap <= 0:
        return dataclasses.replace(event, request_body=None, response_body=None)
    if (request is None or len(request) <= cap) and (response is None or len(response) <= cap):
        return event
    return dataclasses.replace(
        event,
        request_body=None if request is None else bytes(request[:cap]),
        response_body=None if response is None else bytes(response[:cap]),
    )


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class Tap:
    """The hub: publishers call `publish`, readers `subscribe`. Thread-safe."""

    active: bool
    """True while at least one subscription is open: the request path reads it
    before building an event."""
    body_cap: int
    """How many bytes of each body to capture: the largest cap of the open
    subscriptions, 0 (capture nothing) when none asked."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # copy-on-write, so publish iterates a snapshot without taking the lock
        self._subscriptions: tuple[TapSubscription, ...] = ()
        self._failed = False
        self.body_cap = 0
        self.active = False

    @property
    def subscriptions(self) -> int:
        """How many subscriptions are open (and not yet at their limit)."""
        return len(self._subscriptions)

    def subscribe(
        self,
        filter: TapFilter,
        *,
        max_queued: int = 1000,
        limit: int | None = None,
        capture_bodies: int = 0,
    ) -> TapSubscription:
        """A new subscription to events matching ``filter``.

        At most ``max_queued`` events wait for the reader (more are dropped), the
        stream ends after ``limit`` events, and bodies are kept up to
        ``capture_bodies`` bytes (0: never). Close it (or use ``with``) when done.
        """
        if not isinstance(filter, TapFilter):
            raise TypeError(f"tap: filter must be a TapFilter, got {type(filter).__name__}")
        _check_int("max_queued", max_queued, 1)
        if limit is not None:
            _check_int("limit", limit, 1)
        _check_int("capture_bodies", capture_bodies, 0)
        subscription = TapSubscription(self, filter, max_queued, limit, capture_bodies)
        with self._lock:
            self._subscriptions = (*self._subscriptions, subscription)
            self._refresh()
        return subscription

    def publish(self, event: TapEvent) -> None:
        """Offer ``event`` to every open subscription; never blocks, never raises."""
        for subscription in self._subscriptions:
            try:
                subscription._offer(event)
            except Exception:
                # a tap must not break the request it observes; say so once, loudly
                if not self._failed:
                    self._failed = True
                    log.warning("tap: an event could not be delivered", exc_info=True)
                else:
                    log.debug("tap: an event could not be delivered", exc_info=True)

    def close(self) -> None:
        """Close every subscription (their readers see the end of the stream)."""
        for subscription in self._subscriptions:
            subscription.close()

    def _detach(self, subscription: TapSubscription) -> None:
        with self._lock:
            self._subscriptions = tuple(s for s in self._subscriptions if s is not subscription)
            self._refresh()

    def _refresh(self) -> None:
        # publishers read these without the lock: body_cap before active, so that
        # one seeing active=True also sees the cap of the subscription that set it
        self.body_cap = max((s.capture_bodies for s in self._subscriptions), default=0)
        self.active = bool(self._subscriptions)


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"tap: {name} must be an integer >= {minimum}, got {value!r}")


class TapSubscription:
    """Events matching a filter, read by iteration (plain or async) or `next`.

    The stream ends after ``limit`` events or on `close` (which discards what is
    still queued). Readers may be on any thread or event loop.
    """

    def __init__(
        self, tap: Tap, filter: TapFilter, max_queued: int, limit: int | None, capture_bodies: int
    ) -> None:
        self.filter = filter
        self.max_queued = max_queued
        self.limit = limit
        self.capture_bodies = capture_bodies
        self.dropped = 0
        """Matching events lost because the queue was full."""
        self.delivered = 0
        """Events handed to the reader."""
        self._tap = tap
        self._rng = random.Random(filter.seed)
        self._queue: deque[TapEvent] = deque()
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._accepted = 0
        self._exhausted = False
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def done(self) -> bool:
        """True once the stream has ended: closed, or at its limit and drained."""
        return self._closed or (self._exhausted and not self._queue)

    @property
    def queued(self) -> int:
        """Events waiting for the reader."""
        return len(self._queue)

    def _offer(self, event: TapEvent) -> None:
        """Queue ``event`` if it matches, is sampled in and fits (publisher side)."""
        if self._closed or self._exhausted or not self.filter.matches(event):
            return
        sample = self.filter.sample
        with self._lock:
            if self._closed or self._exhausted:
                return
            if sample < 1.0 and self._rng.random() >= sample:
                return
            if len(self._queue) >= self.max_queued:
                self.dropped += 1
                return
            self._queue.append(_fit(event, self.capture_bodies))
            self._accepted += 1
            exhausted = self._exhausted = self._accepted == self.limit
            self._ready.notify()
            waiters, self._waiters = self._waiters, []
        for loop, waiter in waiters:
            _call_soon(loop, waiter)
        if exhausted:
            # no more events will be accepted: stop making the request path build them
            self._tap._detach(self)

    def _pop(self) -> TapEvent:
        self.delivered += 1
        return self._queue.popleft()

    def next(self, timeout: float | None = None) -> TapEvent | None:
        """The next event, waiting up to ``timeout`` seconds (``None``: until one
        comes); ``None`` on timeout or when the stream has ended (see `done`)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._ready:
            while not self._queue:
                if self._closed or self._exhausted:
                    return None
                if deadline is None:
                    self._ready.wait()
                else:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return None
                    self._ready.wait(remaining)
            return self._pop()

    async def next_async(self, timeout: float | None = None) -> TapEvent | None:
        """`next` for a coroutine: waits without blocking the event loop."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            with self._lock:
                if self._queue:
                    return self._pop()
                if self._closed or self._exhausted:
                    return None
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    return None
                waiter: asyncio.Future[None] = loop.create_future()
                entry = (loop, waiter)
                self._waiters.append(entry)
            timer = None if remaining is None else loop.call_later(remaining, _wake, waiter)
            try:
                await waiter
            finally:
                if timer is not None:
                    timer.cancel()
                with self._lock, contextlib.suppress(ValueError):
                    self._waiters.remove(entry)

    def close(self) -> None:
        """End the stream: readers waiting now or later get no more events."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.clear()
            self._ready.notify_all()
            waiters, self._waiters = self._waiters, []
        for loop, waiter in waiters:
            _call_soon(loop, waiter)
        self._tap._detach(self)

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> TapEvent:
        event = self.next()
        if event is None:
            raise StopIteration
        return event

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> TapEvent:
        event = await self.next_async()
        if event is None:
            raise StopAsyncIteration
        return event

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "done" if self.done else "open"
        return (
            f"<TapSubscription {state} {self.filter!r} queued={len(self._queue)} "
            f"delivered={self.delivered} dropped={self.dropped}>"
        )


def _call_soon(loop: asyncio.AbstractEventLoop, waiter: asyncio.Future[None]) -> None:
    # the waiter's loop may be another thread's, or already closed (its reader is gone)
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(_wake, waiter)
