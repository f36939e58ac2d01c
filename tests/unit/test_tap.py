"""The live tap: filters, sampling, redaction, the hub's bounded fan-out and reading
subscriptions from threads and event loops."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import math
import threading
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshlib.telemetry.tap import (
    DEFAULT_REDACTED,
    Tap,
    TapEvent,
    TapFilter,
    TapSubscription,
    redact,
)

WAIT = 2.0  # upper bound of every wait; the happy paths take milliseconds


def event(**changes: Any) -> TapEvent:
    base = TapEvent(
        timestamp=1_700_000_000.0,
        direction="outbound",
        source="web",
        destination="users",
        route="get-user",
        method="GET",
        path="/users/42",
        status=200,
        error=None,
        duration_ms=1.5,
        endpoint="10.0.0.1:8080",
        attempts=1,
        request_headers=(("accept", "application/json"),),
        response_headers=(("content-type", "application/json"),),
        peer="",
        flags=(),
    )
    return dataclasses.replace(base, **changes)


def drain(sub: TapSubscription) -> list[TapEvent]:
    events = []
    while (got := sub.next(timeout=0)) is not None:
        events.append(got)
    return events


# --- filters ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("tap_filter", "changes", "expected"),
    [
        (TapFilter(), {}, True),
        (TapFilter(service="users"), {}, True),
        (TapFilter(service="users"), {"destination": "orders"}, False),
        (TapFilter(service="users"), {"source": "users", "destination": "web"}, False),
        (TapFilter(route="get-user"), {}, True),
        (TapFilter(route="get-user"), {"route": "list-users"}, False),
        (TapFilter(status=200), {}, True),
        (TapFilter(status=200), {"status": 201}, False),
        (TapFilter(status="503"), {"status": 503}, True),
        (TapFilter(status=200), {"status": None}, False),
        (TapFilter(status="2xx"), {"status": 204}, True),
        (TapFilter(status="5xx"), {"status": 503}, True),
        (TapFilter(status="5XX"), {"status": 500}, True),
        (TapFilter(status="5xx"), {"status": 404}, False),
        (TapFilter(status="4xx"), {"status": 404}, True),
        (TapFilter(status="4xx"), {"status": 499}, True),
        (TapFilter(status="4xx"), {"status": 500}, False),
        (TapFilter(status="5xx"), {"status": None, "error": "ConnectError: refused"}, False),
        (TapFilter(status="error"), {"status": None, "error": "ConnectError: refused"}, True),
        (TapFilter(status="error"), {"status": None}, True),
        (TapFilter(status="error"), {"status": 200, "error": "ReadError: reset"}, True),
        (TapFilter(status="error"), {"status": 500}, False),
        (TapFilter(path_prefix="/users"), {}, True),
        (TapFilter(path_prefix="/users/"), {"path": "/users"}, False),
        (TapFilter(path_prefix="/orders"), {}, False),
        (TapFilter(direction="outbound"), {}, True),
        (TapFilter(direction="inbound"), {}, False),
        (TapFilter(direction="inbound"), {"direction": "inbound"}, True),
        (TapFilter(service="users", route="get-user", status=200, direction="outbound"), {}, True),
        (TapFilter(service="users", route="get-user", status="4xx"), {}, False),
    ],
)
def test_filter_matching(tap_filter: TapFilter, changes: dict[str, Any], expected: bool) -> None:
    assert tap_filter.matches(event(**changes)) is expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"service": ""}, "service"),
        ({"route": ""}, "route"),
        ({"status": 99}, "100-599"),
        ({"status": 600}, "100-599"),
        ({"status": True}, "100-599"),
        ({"status": "6xx"}, "class"),
        ({"status": "oops"}, "class"),
        ({"path_prefix": "users"}, "path_prefix"),
        ({"direction": "sideways"}, "direction"),
        ({"sample": 1.5}, "sample"),
        ({"sample": -0.1}, "sample"),
        ({"sample": math.nan}, "sample"),
        ({"seed": "x"}, "seed"),
    ],
)
def test_filter_rejects_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TapFilter(**kwargs)


def test_subscribe_rejects_bad_arguments() -> None:
    tap = Tap()
    for kwargs in ({"max_queued": 0}, {"limit": 0}, {"capture_bodies": -1}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            tap.subscribe(TapFilter(), **kwargs)
    with pytest.raises(TypeError):
        tap.subscribe("service=users")  # type: ignore[arg-type]
    assert not tap.active


# --- sampling --------------------------------------------------------------


def sampled(tap_filter: TapFilter, n: int) -> list[int]:
    tap = Tap()
    with tap.subscribe(tap_filter, max_queued=n) as sub:
        for i in range(n):
            tap.publish(event(attempts=i))
        return [got.attempts for got in drain(sub)]


def test_sampling_is_deterministic_with_a_seed() -> None:
    first = sampled(TapFilter(sample=0.3, seed=7), 500)
    assert first == sampled(TapFilter(sample=0.3, seed=7), 500)
    assert first != sampled(TapFilter(sample=0.3, seed=8), 500)


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_sampling_is_roughly_proportional(p: float, seed: int) -> None:
    n = 2000
    kept = len(sampled(TapFilter(sample=p, seed=seed), n))
    # five standard deviations of Binomial(n, p)
    bound = 5 * math.sqrt(n * p * (1 - p))
    assert n * p - bound <= kept <= n * p + bound


def test_sampling_extremes_and_only_matching_events() -> None:
    assert sampled(TapFilter(sample=0.0, seed=1), 100) == []
    assert len(sampled(TapFilter(sample=1.0), 100)) == 100
    tap = Tap()
    with tap.subscribe(TapFilter(service="users", sample=0.5, seed=3)) as sub:
        for _ in range(100):
            tap.publish(event(destination="orders"))
        assert drain(sub) == []
        assert sub.dropped == 0


# --- redaction -------------------------------------------------------------


def test_redaction_of_default_names_any_case_str_and_bytes() -> None:
    headers: list[tuple[str | bytes, str | bytes]] = [
        ("Authorization", "Bearer secret"),
        (b"COOKIE", b"session=abc"),
        ("Set-Cookie", b"id=1"),
        (b"x-api-key", "k"),
        ("Proxy-Authorization", "Basic Zm9v"),
        (b"Content-Type", b"text/plain; charset=\xe9"),
        ("Accept", "*/*"),
    ]
    assert redact(headers) == (
        ("authorization", "[redacted]"),
        ("cookie", "[redacted]"),
        ("set-cookie", "[redacted]"),
        ("x-api-key", "[redacted]"),
        ("proxy-authorization", "[redacted]"),
        ("content-type", "text/plain; charset=é"),
        ("accept", "*/*"),
    )
    assert {"authorization", "cookie", "set-cookie", "x-api-key"} <= DEFAULT_REDACTED


def test_redaction_of_extra_names() -> None:
    headers = [("X-Session-Token", "t"), (b"x-tenant", b"acme"), ("Accept", "*/*")]
    assert redact(headers, extra=["x-session-token", "X-TENANT"]) == (
        ("x-session-token", "[redacted]"),
        ("x-tenant", "[redacted]"),
        ("accept", "*/*"),
    )
    # a single name given as a string is one name, not its letters
    assert redact([("a", "1"), ("x-tenant", "acme")], extra="x-tenant") == (
        ("a", "1"),
        ("x-tenant", "[redacted]"),
    )
    # repeated headers stay repeated, in order
    assert redact([("cookie", "a"), ("Cookie", "b")]) == (
        ("cookie", "[redacted]"),
        ("cookie", "[redacted]"),
    )


# --- the hub ---------------------------------------------------------------


def test_active_toggles_with_open_subscriptions() -> None:
    tap = Tap()
    # the request path reads it on every request: an attribute, not a property
    assert not isinstance(inspect.getattr_static(Tap, "active", None), property)
    assert tap.active is False
    assert tap.body_cap == 0
    first = tap.subscribe(TapFilter(), capture_bodies=10)
    assert tap.active is True
    assert tap.body_cap == 10
    with tap.subscribe(TapFilter(), capture_bodies=100):
        assert tap.body_cap == 100
        first.close()
        assert tap.active is True
        assert tap.body_cap == 100
    assert tap.active is False
    assert tap.body_cap == 0
    first.close()  # idempotent
    assert tap.active is False


def test_publish_without_subscribers_is_a_no_op() -> None:
    tap = Tap()
    tap.publish(event())
    sub = tap.subscribe(TapFilter())
    assert sub.next(timeout=0) is None


def test_a_slow_subscriber_drops_instead_of_blocking_the_publisher() -> None:
    tap = Tap()
    slow = tap.subscribe(TapFilter(), max_queued=5)
    fast = tap.subscribe(TapFilter(), max_queued=1000)
    received: list[TapEvent] = []

    def read_fast() -> None:
        while len(received) < 100 and (got := fast.next(timeout=WAIT)) is not None:
            received.append(got)

    reader = threading.Thread(target=read_fast, daemon=True)
    reader.start()
    publisher = threading.Thread(target=lambda: [tap.publish(event()) for _ in range(100)])
    started = time.monotonic()
    publisher.start()
    publisher.join(timeout=WAIT)
    assert not publisher.is_alive(), "publish blocked on a full subscriber queue"
    assert time.monotonic() - started < 1.0
    reader.join(timeout=WAIT)
    assert len(received) == 100
    assert fast.dropped == 0
    assert slow.queued == 5
    assert slow.dropped == 95
    assert len(drain(slow)) == 5
    assert slow.delivered == 5
    # room again: the next event is queued, not dropped
    tap.publish(event())
    assert slow.next(timeout=0) is not None
    assert slow.dropped == 95
    tap.close()
    assert not tap.active


def test_limit_stops_iteration_and_detaches() -> None:
    tap = Tap()
    with tap.subscribe(TapFilter(), limit=3) as sub:
        for i in range(10):
            tap.publish(event(attempts=i))
        # the limit is reached: the request path stops building events
        assert tap.active is False
        assert [got.attempts for got in sub] == [0, 1, 2]
        assert sub.done
        assert sub.delivered == 3
        assert sub.dropped == 0
        assert sub.next(timeout=0) is None


def test_close_ends_a_blocked_sync_reader() -> None:
    tap = Tap()
    sub = tap.subscribe(TapFilter())
    seen: list[TapEvent] = []
    reader = threading.Thread(target=lambda: seen.extend(sub), daemon=True)
    reader.start()
    time.sleep(0.05)
    sub.close()
    reader.join(timeout=WAIT)
    assert not reader.is_alive()
    assert seen == []
    assert sub.closed and sub.done


def test_next_times_out() -> None:
    tap = Tap()
    with tap.subscribe(TapFilter()) as sub:
        started = time.monotonic()
        assert sub.next(timeout=0.05) is None
        assert 0.04 <= time.monotonic() - started < 1.0


def test_sync_iteration_with_events_from_another_thread() -> None:
    tap = Tap()
    sub = tap.subscribe(TapFilter(status="5xx"), limit=20)

    def publish() -> None:
        for i in range(40):
            tap.publish(event(status=500 + i % 2 * 3, attempts=i))
            tap.publish(event(status=200))
            time.sleep(0.001)

    publisher = threading.Thread(target=publish)
    watchdog = threading.Timer(WAIT, sub.close)  # bounds the loop if the limit never comes
    publisher.start()
    watchdog.start()
    got = list(sub)
    watchdog.cancel()
    publisher.join(timeout=WAIT)
    assert [e.attempts for e in got] == list(range(20))
    assert all(e.status in (500, 503) for e in got)
    assert not tap.active


def test_concurrent_publishers_lose_nothing_below_the_bound() -> None:
    tap = Tap()
    with tap.subscribe(TapFilter(), max_queued=4000) as sub:
        threads = [
            threading.Thread(target=lambda: [tap.publish(event()) for _ in range(1000)])
            for _ in range(4)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=WAIT)
        assert len(drain(sub)) == 4000
        assert sub.dropped == 0


# --- async readers -----------------------------------------------------------


def test_async_iteration_with_events_from_another_thread() -> None:
    tap = Tap()

    async def main() -> list[int]:
        async with tap.subscribe(TapFilter(route="get-user"), limit=10) as sub:

            def publish() -> None:
                for i in range(10):
                    time.sleep(0.002)  # the reader is parked on its future by now
                    tap.publish(event(route="other"))
                    tap.publish(event(attempts=i))

            publisher = threading.Thread(target=publish)
            publisher.start()

            async def read() -> list[int]:
                return [got.attempts async for got in sub]

            try:
                return await asyncio.wait_for(read(), WAIT)
            finally:
                publisher.join(timeout=WAIT)

    assert asyncio.run(main()) == list(range(10))
    assert not tap.active


def test_async_iteration_with_events_from_the_same_loop() -> None:
    tap = Tap()

    async def main() -> list[int]:
        sub = tap.subscribe(TapFilter(), limit=5)

        async def publish() -> None:
            for i in range(5):
                await asyncio.sleep(0.001)
                tap.publish(event(attempts=i))

        async def read() -> list[int]:
            return [got.attempts async for got in sub]

        reader = asyncio.create_task(read())
        await asyncio.wait_for(publish(), WAIT)
        return await asyncio.wait_for(reader, WAIT)

    assert asyncio.run(main()) == list(range(5))


def test_async_close_from_another_thread_ends_iteration() -> None:
    tap = Tap()

    async def main() -> list[TapEvent]:
        sub = tap.subscribe(TapFilter())
        closer = threading.Timer(0.05, sub.close)
        closer.start()
        try:
            return await asyncio.wait_for(_collect(sub), WAIT)
        finally:
            closer.join(timeout=WAIT)

    assert asyncio.run(main()) == []
    assert not tap.active


async def _collect(sub: TapSubscription) -> list[TapEvent]:
    return [got async for got in sub]


def test_next_async_times_out_and_a_cancelled_reader_leaves_no_waiter() -> None:
    tap = Tap()

    async def main() -> None:
        with tap.subscribe(TapFilter()) as sub:
            loop = asyncio.get_running_loop()
            started = loop.time()
            assert await sub.next_async(timeout=0.05) is None
            assert 0.04 <= loop.time() - started < 1.0
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(sub.__anext__(), 0.02)
            assert sub._waiters == []
            tap.publish(event())
            got = await sub.next_async(timeout=WAIT)
            assert got is not None
            assert sub.delivered == 1

    asyncio.run(main())


# --- bodies ----------------------------------------------------------------


def test_bodies_only_for_subscriptions_that_asked_and_cut_to_their_cap() -> None:
    tap = Tap()
    none = tap.subscribe(TapFilter())
    small = tap.subscribe(TapFilter(), capture_bodies=4)
    large = tap.subscribe(TapFilter(), capture_bodies=64)
    assert tap.body_cap == 64
    body = bytes(range(40))
    tap.publish(event(request_body=body, response_body=b"ok"))
    tap.publish(event())

    got_none, got_small, got_large = (sub.next(timeout=0) for sub in (none, small, large))
    assert got_none is not None and got_small is not None and got_large is not None
    assert got_none.request_body is None and got_none.response_body is None
    assert got_small.request_body == body[:4] and got_small.response_body == b"ok"
    assert got_large.request_body == body and got_large.response_body == b"ok"
    # events without bodies pass unchanged
    assert all(sub.next(timeout=0) == event() for sub in (none, small, large))

    large.close()
    assert tap.body_cap == 4
    small.close()
    assert tap.body_cap == 0
    none.close()


def test_to_dict_is_json_serialisable() -> None:
    full = event(
        status=None,
        error="ConnectError: [Errno 111] refused",
        duration_ms=math.inf,
        request_headers=redact([("Authorization", "x"), (b"x-id", b"\xff")]),
        peer="spiffe://mesh.local/ns/default/sa/web",
        flags=("retried", "hedged"),
        request_body=b"\x00\xffbinary",
        response_body=b"",
    )
    data = json.loads(json.dumps(full.to_dict(), allow_nan=False))
    assert data["status"] is None
    assert data["duration_ms"] is None
    assert data["request_headers"] == [["authorization", "[redacted]"], ["x-id", "\xff"]]
    assert data["flags"] == ["retried", "hedged"]
    assert data["request_body"] == "AP9iaW5hcnk="
    assert data["response_body"] == ""
    assert set(data) == {f.name for f in dataclasses.fields(TapEvent)}
    assert json.loads(json.dumps(event().to_dict()))["request_body"] is None


# --- publish never raises --------------------------------------------------


def test_publish_swallows_a_malformed_event() -> None:
    tap = Tap()
    with (
        tap.subscribe(TapFilter(path_prefix="/users")) as broken,
        tap.subscribe(TapFilter()) as fine,
    ):
        tap.publish(event(path=None))  # type: ignore[arg-type]
        # the failing subscription does not starve the others
        assert broken.next(timeout=0) is None
        assert fine.next(timeout=0) is not None


text = st.text(max_size=12)
headers = st.lists(st.tuples(text, text), max_size=3).map(tuple)
bodies = st.none() | st.binary(max_size=40)
events = st.builds(
    TapEvent,
    timestamp=st.floats(allow_nan=True, allow_infinity=True),
    direction=st.sampled_from(["outbound", "inbound", ""]) | text,
    source=text,
    destination=st.sampled_from(["users", "orders"]) | text,
    route=st.sampled_from(["get-user", ""]) | text,
    method=st.sampled_from(["GET", "POST"]),
    path=st.sampled_from(["/", "/users/1", "/orders"]) | text,
    status=st.none() | st.integers(0, 1000),
    error=st.none() | text,
    duration_ms=st.floats(allow_nan=True, allow_infinity=True),
    endpoint=text,
    attempts=st.integers(0, 10),
    request_headers=headers,
    response_headers=headers,
    peer=text,
    flags=st.lists(st.sampled_from(["retried", "hedged", "faulted", "denied"])).map(tuple),
    request_body=bodies,
    response_body=bodies,
)
filters = st.builds(
    TapFilter,
    service=st.none() | st.sampled_from(["users", "orders"]),
    route=st.none() | st.just("get-user"),
    status=st.none()
    | st.integers(100, 599)
    | st.sampled_from(["1xx", "2xx", "3xx", "4xx", "5xx", "error"]),
    path_prefix=st.none() | st.sampled_from(["/", "/users"]),
    direction=st.none() | st.sampled_from(["outbound", "inbound"]),
    sample=st.floats(0.0, 1.0),
    seed=st.none() | st.integers(),
)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(filters, st.integers(1, 5), st.none() | st.integers(1, 5), st.integers(0, 50)),
        min_size=1,
        max_size=3,
    ),
    st.lists(events, max_size=15),
)
def test_publish_never_raises(
    subscriptions: list[tuple[TapFilter, int, int | None, int]], published: list[TapEvent]
) -> None:
    tap = Tap()
    subs = [
        tap.subscribe(f, max_queued=q, limit=limit, capture_bodies=cap)
        for f, q, limit, cap in subscriptions
    ]
    for item in published:
        tap.publish(item)
    for sub, (tap_filter, max_queued, limit, cap) in zip(subs, subscriptions, strict=True):
        got = drain(sub)
        assert len(got) <= max_queued
        assert limit is None or len(got) <= limit
        assert all(tap_filter.matches(e) for e in got)
        for e in got:
            for body in (e.request_body, e.response_body):
                assert body is None or (cap > 0 and len(body) <= cap)
            json.dumps(e.to_dict(), allow_nan=False)
        sub.close()
    assert not tap.active
