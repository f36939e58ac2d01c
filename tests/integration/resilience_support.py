"""Helpers of the resilience integration tests: bounded load loops that record every
call's outcome (a status or an exception), percentiles, server-side counts, and
policy builders.

A load loop sends a fixed number of calls from a few threads (``mesh.http_client()``)
or tasks (``mesh.async_http_client()`` under ``asyncio.run``), one client shared by
all of them, and never stops on an error: errors are outcomes to count.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from integration.support import CLIENT_TIMEOUT, Upstream
from meshlib import Mesh


class Flaky(Exception):
    """An application error that policies name in ``retries.exceptions``."""


FLAKY = "integration.resilience_support.Flaky"


@dataclass(frozen=True)
class Outcome:
    """One call: its response status and headers, or the exception it raised."""

    status: int | None
    headers: Mapping[str, str]
    body: bytes
    error: BaseException | None
    elapsed: float

    @property
    def ok(self) -> bool:
        return self.error is None and self.status is not None and self.status < 400

    @property
    def server(self) -> str | None:
        return self.headers.get("x-server")

    @property
    def injected(self) -> bool:
        return self.headers.get("x-mesh-fault") == "abort"


def _outcome(response: httpx.Response, started: float) -> Outcome:
    return Outcome(
        response.status_code,
        dict(response.headers),
        response.content,
        None,
        time.perf_counter() - started,
    )


def _failure(exc: BaseException, started: float) -> Outcome:
    return Outcome(None, {}, b"", exc, time.perf_counter() - started)


After = tuple[int, Callable[[], None]]
"""``(n, action)``: run ``action`` once, when the n-th call has completed (mid-load chaos).

No new call starts while the action runs (calls in flight go on), so that the load
after it really meets what it did: stopping a server takes uvicorn a moment, in which
a fast loop could otherwise finish."""


def run_load(
    mesh: Mesh,
    kind: str,
    url: str,
    total: int,
    concurrency: int = 4,
    *,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    content: bytes | None = None,
    after: After | None = None,
) -> list[Outcome]:
    """Send ``total`` calls, ``concurrency`` at a time; outcomes in completion order."""
    if kind == "sync":
        return _load_sync(mesh, url, total, concurrency, method, headers, content, after)
    return asyncio.run(_load_async(mesh, url, total, concurrency, method, headers, content, after))


def _load_sync(
    mesh: Mesh,
    url: str,
    total: int,
    concurrency: int,
    method: str,
    headers: Mapping[str, str] | None,
    content: bytes | None,
    after: After | None,
) -> list[Outcome]:
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    issued = [0]
    resume = threading.Event()
    resume.set()
    with mesh.http_client(timeout=CLIENT_TIMEOUT) as client:

        def worker() -> None:
            while True:
                assert resume.wait(timeout=60), "the mid-load action never finished"
                with lock:
                    if issued[0] >= total:
                        return
                    issued[0] += 1
                started = time.perf_counter()
                try:
                    outcome = _outcome(
                        client.request(method, url, headers=headers, content=content), started
                    )
                except Exception as exc:
                    outcome = _failure(exc, started)
                with lock:
                    outcomes.append(outcome)
                    done = len(outcomes)
                    if after is not None and done == after[0]:
                        resume.clear()
                if after is not None and done == after[0]:
                    try:
                        after[1]()
                    finally:
                        resume.set()

        threads = [threading.Thread(target=worker) for _ in range(concurrency)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not any(thread.is_alive() for thread in threads), "load workers hung"
    return outcomes


async def _load_async(
    mesh: Mesh,
    url: str,
    total: int,
    concurrency: int,
    method: str,
    headers: Mapping[str, str] | None,
    content: bytes | None,
    after: After | None,
) -> list[Outcome]:
    outcomes: list[Outcome] = []
    issued = 0
    resume = asyncio.Event()
    resume.set()
    async with mesh.async_http_client(timeout=CLIENT_TIMEOUT) as client:

        async def worker() -> None:
            nonlocal issued
            while True:
                await asyncio.wait_for(resume.wait(), timeout=60)
                if issued >= total:
                    return
                issued += 1
                started = time.perf_counter()
                try:
                    response = await client.request(method, url, headers=headers, content=content)
                    outcome = _outcome(response, started)
                except Exception as exc:
                    outcome = _failure(exc, started)
                outcomes.append(outcome)
                if after is not None and len(outcomes) == after[0]:
                    resume.clear()
                    try:
                        await asyncio.to_thread(after[1])
                    finally:
                        resume.set()

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcomes


def call_once(
    mesh: Mesh,
    kind: str,
    url: str,
    *,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    content: bytes | None = None,
) -> Outcome:
    """One call through a fresh client of the given flavour."""
    return run_load(mesh, kind, url, 1, 1, method=method, headers=headers, content=content)[0]


# -- measuring ---------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0-100)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


def seen_total(*ups: Upstream) -> int:
    """Requests the upstreams received, all attempts and hedges included."""
    return sum(len(up.seen) for up in ups)


def attempts_seen(up: Upstream) -> list[str]:
    """The attempt number of every request an upstream received: its ``x-mesh-attempt``
    header, and "1" where there is none (the first attempt carries no such header)."""
    return [record["headers"].get("x-mesh-attempt", "1") for record in up.seen]


def errors_of(outcomes: Iterable[Outcome]) -> list[BaseException]:
    return [o.error for o in outcomes if o.error is not None]


def statuses_of(outcomes: Iterable[Outcome]) -> dict[int | None, int]:
    counts: dict[int | None, int] = {}
    for outcome in outcomes:
        counts[outcome.status] = counts.get(outcome.status, 0) + 1
    return counts


# -- policies ---------------------------------------------------------------------------


def users_policy(*ups: Upstream | str, **blocks: Any) -> dict[str, Any]:
    """A policy with one service, ``users``, on these upstreams (or addresses)."""
    addresses = [up if isinstance(up, str) else up.address for up in ups]
    return {"services": {"users": {"endpoints": [{"address": a} for a in addresses], **blocks}}}


def protection(mesh: Mesh, url: str = "http://users/") -> dict[str, Any]:
    """The breaker, outlier and limit state that ``explain`` shows for ``url``'s service."""
    found: dict[str, Any] = mesh.explain("GET", url)["protection"]
    return found
