"""Server side: ASGI middleware that enforces a service's inbound policy.

In request order: the propagated deadline (a request whose deadline has
already passed is answered 504 without running the app), rate limits per
route and per caller (429 with Retry-After), injected faults, then the app,
which is cut off with 504 if it has not started answering by the deadline.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

from meshlib.resilience.deadline import INBOUND_DEADLINE

if TYPE_CHECKING:
    from meshlib.config.store import SnapshotStore

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

    def __iter__(self) -> Iterator[str]:
        return iter(self._decoded())

    def __len__(self) -> int:
        return len(self._decoded())


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
    ) -> None:
        self.app = app
        self._store = store
        self.service = service
        self._rng = rng or random.Random()
        self._clock = clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _Headers(scope.get("headers", []))
        budget_ms = headers.get(TIMEOUT_HEADER.decode())
        deadline = None
        if budget_ms is not None:
            try:
                remaining = int(budget_ms) / 1000.0
            except ValueError:
                remaining = None
            if remaining is not None:
                if remaining <= 0:
                    await _respond(send, 504, "deadline exceeded before the request started\n", [])
                    return
                deadline = self._clock() + remaining
        policy = self._store.current.inbound.get(self.service)
        if policy is not None:
            caller = headers.get(policy.caller_header)
            if caller is None:
                client = scope.get("client")
                caller = str(client[0]) if client else "unknown"
            verdict = policy.judge(scope.get("path", "/"), caller, headers, self._rng)
            if verdict.limited:
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
                if fault.delay:
                    await asyncio.sleep(fault.delay)
                if fault.abort_status is not None:
                    await _respond(
                        send, fault.abort_status, "fault injected\n", [(b"x-mesh-fault", b"abort")]
                    )
                    return
        extensions = scope.setdefault("extensions", {})
        extensions["mesh"] = {"service": self.service, "deadline": deadline}
        if deadline is None:
            await self.app(scope, receive, send)
            return
        token = INBOUND_DEADLINE.set(deadline)  # calls made while serving inherit it
        try:
            await self._with_deadline(scope, receive, send, deadline)
        finally:
            INBOUND_DEADLINE.reset(token)

    async def _with_deadline(
        self, scope: Scope, receive: Receive, send: Send, deadline: float
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
            await _respond(send, 504, "deadline exceeded while handling the request\n", [])
