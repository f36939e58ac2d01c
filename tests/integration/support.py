"""Helpers of the integration suite: upstream handles, client drivers, bounded waits.

Nothing here asserts on time: every wait is a bounded number of polls that fails
with a message when the condition never holds.
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from meshlib import Mesh
from meshlib.demo.services import EchoApp, ServerThread

CLIENT_TIMEOUT = 30.0
"""Generous on purpose: a request that never finishes fails the test instead of hanging."""

# -- upstream servers -----------------------------------------------------------------


@dataclass
class Upstream:
    """One echo server on loopback and the app that records what it saw."""

    app: EchoApp
    server: ServerThread

    @property
    def name(self) -> str:
        return self.app.name

    @property
    def address(self) -> str:
        return self.server.address

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def seen(self) -> list[dict[str, Any]]:
        return self.app.seen

    def hold(self) -> threading.Event:
        """Make requests wait (in flight) until the returned event is set."""
        gate = threading.Event()
        self.app.gate = gate
        return gate

    def release(self) -> None:
        gate = self.app.gate
        if gate is not None:
            gate.set()

    def client_ports(self) -> set[int]:
        """Distinct client-side ports of the connections this server was asked on."""
        return {record["client"][1] for record in self.seen}


StartEcho = Callable[..., tuple[Upstream, ...]]


# -- waiting and files ----------------------------------------------------------------


def wait_until(
    predicate: Callable[[], object], what: str, attempts: int = 1500, interval: float = 0.01
) -> None:
    """Poll ``predicate`` at most ``attempts`` times; fail naming ``what``."""
    for _ in range(attempts):
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"gave up waiting for {what}")


async def async_wait_until(
    predicate: Callable[[], object], what: str, attempts: int = 1500, interval: float = 0.01
) -> None:
    for _ in range(attempts):
        if predicate():
            return
        await asyncio.sleep(interval)
    raise AssertionError(f"gave up waiting for {what}")


def write_atomic(path: Path, text: str) -> None:
    """Replace the file by rename, as deploy tools do: watchers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def line_of(text: str, needle: str) -> int:
    """1-based line of the only line containing ``needle``."""
    found = [i for i, line in enumerate(text.splitlines(), 1) if needle in line]
    assert len(found) == 1, f"{needle!r} is on lines {found}"
    return found[0]


def binomial_bounds(n: int, p: float, sigmas: float = 5.0) -> tuple[float, float]:
    """``n*p`` plus or minus ``sigmas`` standard deviations."""
    mean = n * p
    spread = sigmas * math.sqrt(n * p * (1 - p))
    return mean - spread, mean + spread


# -- client drivers -------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    url: str
    method: str = "GET"
    headers: Mapping[str, str] | None = None
    content: bytes | None = None


@dataclass(frozen=True)
class Reply:
    status: int
    server: str | None  # the x-server response header
    echo: dict[str, Any]  # what the server saw, as it reported it

    @property
    def upstream_headers(self) -> dict[str, str]:
        """The request headers as the upstream received them."""
        headers: dict[str, str] = self.echo["headers"]
        return headers


def _reply(response: httpx.Response) -> Reply:
    echo = response.json() if response.headers.get("content-type") == "application/json" else {}
    return Reply(response.status_code, response.headers.get("x-server"), echo)


class Driver:
    """Sends calls through one of the mesh's clients; ``kind`` is "sync" or "async"."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def send(
        self,
        mesh: Mesh,
        calls: Sequence[Call],
        concurrency: int = 1,
        settle: Callable[[], object] | None = None,
    ) -> list[Reply]:
        """Send every call through one client (so connections are shared); replies in order.

        ``settle``, when given, is polled (bounded) after the last reply and before
        the client is closed, for work the client does in the background (mirroring).
        """
        if self.kind == "sync":
            return self._send_sync(mesh, calls, concurrency, settle)
        return asyncio.run(self._send_async(mesh, calls, concurrency, settle))

    def get(self, mesh: Mesh, url: str, count: int = 1, **options: Any) -> list[Reply]:
        return self.send(mesh, [Call(url, **options)] * count)

    @staticmethod
    def _send_sync(
        mesh: Mesh,
        calls: Sequence[Call],
        concurrency: int,
        settle: Callable[[], object] | None,
    ) -> list[Reply]:
        with mesh.http_client(timeout=CLIENT_TIMEOUT) as client:

            def one(call: Call) -> Reply:
                response = client.request(
                    call.method, call.url, headers=call.headers, content=call.content
                )
                return _reply(response)

            if concurrency == 1:
                replies = [one(call) for call in calls]
            else:
                with ThreadPoolExecutor(concurrency) as pool:
                    replies = list(pool.map(one, calls))
            if settle is not None:
                wait_until(settle, "the client's background work to settle")
            return replies

    @staticmethod
    async def _send_async(
        mesh: Mesh,
        calls: Sequence[Call],
        concurrency: int,
        settle: Callable[[], object] | None,
    ) -> list[Reply]:
        async with mesh.async_http_client(timeout=CLIENT_TIMEOUT) as client:
            slots = asyncio.Semaphore(concurrency)

            async def one(call: Call) -> Reply:
                async with slots:
                    response = await client.request(
                        call.method, call.url, headers=call.headers, content=call.content
                    )
                    return _reply(response)

            replies = list(await asyncio.gather(*(one(call) for call in calls)))
            if settle is not None:
                await async_wait_until(settle, "the client's background work to settle")
            return replies

    def __repr__(self) -> str:
        return f"Driver({self.kind})"


def servers_of(replies: Sequence[Reply]) -> dict[str | None, int]:
    """How many replies each server gave."""
    counts: dict[str | None, int] = {}
    for reply in replies:
        counts[reply.server] = counts.get(reply.server, 0) + 1
    return counts
