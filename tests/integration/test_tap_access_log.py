"""The tap and the access log on real traffic: events for both directions, filters,
redaction, attempts and flags from the resilience layer, and nothing built while
nobody listens."""

from __future__ import annotations

import asyncio
import json
import logging
import random
from typing import Any

import pytest

from meshlib import Mesh
from meshlib.demo.services import EchoApp, ServerThread
from meshlib.telemetry import observe


def served(app: EchoApp, policy: dict[str, Any] | None = None) -> tuple[Mesh, ServerThread]:
    server_mesh = Mesh(policy or {}, service="users")
    return server_mesh, ServerThread(server_mesh.asgi(app)).start()


def client_policy(*addresses: str, **service: Any) -> dict[str, Any]:
    endpoints = [{"address": a} for a in addresses]
    return {"services": {"users": {"endpoints": endpoints, **service}}}


def test_tap_sees_both_directions_filters_and_redacts() -> None:
    app = EchoApp("users")
    server_mesh, server = served(app, {"telemetry": {"redact_headers": ["X-Secret"]}})
    address = server.address
    try:
        mesh = Mesh(client_policy(server.address), service="checkout")
        with (
            mesh,
            mesh.tap("users") as everything,
            mesh.tap(status="5xx") as failures,
            server_mesh.tap(direction="inbound") as inbound,
            mesh.http_client() as client,
        ):
            headers = {"authorization": "Bearer s3cret", "x-secret": "hide", "x-ok": "show"}
            client.get("http://users/a", headers=headers)
            app.status = 503
            client.get("http://users/b")
            first = everything.next(timeout=2)
            second = everything.next(timeout=2)
            failed = failures.next(timeout=2)
            served_event = inbound.next(timeout=2)
            assert failures.next(timeout=0.2) is None  # only the 503 passed the filter
    finally:
        server.stop()
        server_mesh.close()
    assert first is not None and second is not None and failed is not None
    assert (first.direction, first.source, first.destination) == ("outbound", "checkout", "users")
    assert (first.method, first.path, first.status, first.route) == ("GET", "/a", 200, "default")
    assert first.endpoint == address and first.attempts == 1
    sent = dict(first.request_headers)
    assert sent["authorization"] == "[redacted]" and sent["x-ok"] == "show"
    assert sent["x-secret"] == "hide"  # the client's policy does not list it
    assert failed.status == 503 and failed.path == "/b"
    assert served_event is not None
    assert (served_event.direction, served_event.destination) == ("inbound", "users")
    assert served_event.source == "checkout"  # from x-mesh-caller
    received = dict(served_event.request_headers)
    assert received["authorization"] == "[redacted]" and received["x-secret"] == "[redacted]"


def test_access_log_lines_with_attempts_and_flags(caplog: pytest.LogCaptureFixture) -> None:
    good, bad = EchoApp("good"), EchoApp("bad", status=503)
    up, down = ServerThread(good).start(), ServerThread(bad).start()
    up_address = up.address
    try:
        policy = client_policy(
            down.address,
            up.address,
            retries={"attempts": 2, "on": ["5xx"], "backoff": {"base": "1ms", "max": "1ms"}},
        )
        policy["telemetry"] = {"access_log": True}
        with (
            Mesh(policy, service="checkout", rng=random.Random(1)) as mesh,
            caplog.at_level(logging.INFO, logger="meshlib.access"),
            mesh.http_client() as client,
        ):
            replies = [client.get("http://users/x") for _ in range(2)]

            async def one() -> None:
                async with mesh.async_http_client() as async_client:
                    await async_client.get("http://users/y")

            asyncio.run(one())
    finally:
        up.stop()
        down.stop()
    assert [r.status_code for r in replies] == [200, 200]
    # round robin: one of the two sync calls went to the failing endpoint first
    reports = [r.extensions.get("mesh") for r in replies]
    retried = [r for r in reports if r is not None]
    assert retried == [{"attempts": 2, "endpoint": up_address, "flags": ["retried"]}]
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "meshlib.access"]
    assert len(lines) == 3
    assert {line["path"] for line in lines} == {"/x", "/y"}
    for line in lines:
        assert line["direction"] == "outbound" and line["destination"] == "users"
        assert line["status"] == 200 and line["duration_ms"] > 0
        assert line["timestamp"].endswith("Z") and "authorization" not in json.dumps(line)
    assert sorted(line["attempts"] for line in lines if line["path"] == "/x") == [1, 2]


def test_nothing_is_built_while_nobody_listens(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[Any] = []
    monkeypatch.setattr(observe.Observers, "outbound", lambda *a: built.append(a))
    monkeypatch.setattr(observe.Observers, "inbound", lambda *a: built.append(a))
    app = EchoApp("users")
    server_mesh, server = served(app)
    try:
        with Mesh(client_policy(server.address), service="checkout") as mesh:
            with mesh.http_client() as client:
                client.get("http://users/")
            assert built == []
            with mesh.tap() as tap, mesh.http_client() as client:
                client.get("http://users/")
                assert tap is not None
            assert len(built) == 1  # the client's tap saw it; the server's has no tap
    finally:
        server.stop()
        server_mesh.close()


def test_a_call_whose_failure_ejects_an_endpoint_is_flagged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    good, bad = EchoApp("good"), EchoApp("bad", status=503)
    up, down = ServerThread(good).start(), ServerThread(bad).start()
    ejecting = {"consecutive_5xx": 1, "max_ejection_percent": 100}
    try:
        # one attempt (the fast lane): the 503 comes back, flagged
        alone = client_policy(down.address, outlier_detection=ejecting)
        alone["telemetry"] = {"access_log": True}
        with (
            Mesh(alone, service="checkout") as mesh,
            caplog.at_level(logging.INFO, logger="meshlib.access"),
            mesh.http_client() as client,
        ):
            failed = client.get("http://users/x")
        # retried (the attempt loop): the retry answers, the call is flagged too
        retrying = client_policy(
            down.address,
            up.address,
            outlier_detection=ejecting,
            retries={"attempts": 2, "on": ["5xx"], "backoff": {"base": "1ms", "max": "1ms"}},
        )
        with (
            Mesh(retrying, service="checkout", rng=random.Random(1)) as mesh,
            mesh.http_client() as client,
        ):
            replies = [client.get("http://users/y") for _ in range(2)]
    finally:
        up.stop()
        down.stop()
    assert failed.status_code == 503
    assert failed.extensions["mesh"]["flags"] == ["ejected"]
    [line] = [json.loads(r.getMessage()) for r in caplog.records if r.name == "meshlib.access"]
    assert line["flags"] == ["ejected"] and line["trace_id"] == ""
    flagged = [r.extensions["mesh"]["flags"] for r in replies if "mesh" in r.extensions]
    assert flagged == [["retried", "ejected"]]


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_bodies_only_for_a_tap_that_asks_and_cut_to_its_cap(kind: str) -> None:
    app = EchoApp("users")  # answers JSON describing the request, body included
    server_mesh, server = served(app)
    try:
        mesh = Mesh(client_policy(server.address), service="checkout")
        with (
            mesh,
            mesh.tap("users", capture_bodies=12) as client_side,
            mesh.tap("users") as without,
            server_mesh.tap(direction="inbound", capture_bodies=12) as server_side,
        ):
            body = b"order=42&item=teapot"
            if kind == "sync":
                with mesh.http_client() as client:
                    answer = client.post("http://users/orders", content=body).content
            else:

                async def post() -> bytes:
                    async with mesh.async_http_client() as client:
                        return (await client.post("http://users/orders", content=body)).content

                answer = asyncio.run(post())
            outbound = client_side.next(timeout=2)
            plain = without.next(timeout=2)
            inbound = server_side.next(timeout=2)
    finally:
        server.stop()
        server_mesh.close()
    assert outbound is not None and plain is not None and inbound is not None
    # the client: what it sent, and the answer once the application had read it
    assert (outbound.request_body, outbound.response_body) == (body[:12], answer[:12])
    # the server: what it received and what it answered
    assert (inbound.request_body, inbound.response_body) == (body[:12], answer[:12])
    # a tap that did not ask gets no bodies, from the same requests
    assert (plain.request_body, plain.response_body) == (None, None)
    assert json.loads(answer)["body"] == body.decode()
