"""``/tap`` on the admin endpoint over real HTTP: the live tap as server-sent events
read by a thread while real traffic flows, its filters, redaction, bad parameters,
the bearer token, a client that goes away, ``stop()`` ending open streams and
``meshlib tap``."""

from __future__ import annotations

import contextlib
import http.client
import json
import queue
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from integration.support import wait_until
from meshlib import Mesh
from meshlib.cli import main
from meshlib.demo.services import EchoApp, ServerThread
from meshlib.telemetry.admin import AdminServer

pytestmark = pytest.mark.integration

WAIT = 5.0
"""Upper bound of every wait; the happy paths take milliseconds."""
TOKEN = "s3cret"


@dataclass
class World:
    """``checkout``'s mesh, calling ``users`` served through the same mesh's ``asgi``
    (so each request is seen twice: outbound and inbound)."""

    mesh: Mesh
    app: EchoApp
    address: str

    def send(self, count: int, path: str = "/api/x", headers: dict[str, str] | None = None) -> None:
        """``count`` requests to ``users``, returning once both sides of every one have
        reached the tap (the server side records after its answer, maybe after the
        client has it)."""
        with self.mesh.tap(service="users") as probe, self.mesh.http_client(timeout=30) as client:
            for _ in range(count):
                client.get(f"http://users{path}", headers=headers or {})
            deadline = time.monotonic() + WAIT
            for _ in range(2 * count):
                assert probe.next(timeout=max(0.0, deadline - time.monotonic())) is not None

    def streams(self, marker: str) -> int:
        """Open tap subscriptions filtering on route ``marker``: a test's own streams,
        whatever streams of earlier tests are still winding down."""
        return sum(s.filter.route == marker for s in self.mesh._tap._subscriptions)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    app = EchoApp("users")
    with Mesh({}, service="checkout") as mesh:
        server = ServerThread(mesh.asgi(app, "users")).start()
        try:
            users = {
                "endpoints": [{"address": server.address}],
                "routes": [
                    {"name": "api", "match": {"path": {"prefix": "/api/"}}},
                    {"name": "default"},
                ],
            }
            mesh.update({"services": {"users": users}})
            yield World(mesh, app, server.address)
        finally:
            server.stop()


@pytest.fixture(scope="module")
def admin(world: World) -> Iterator[AdminServer]:
    with AdminServer(world.mesh) as server:
        yield server


@pytest.fixture(scope="module")
def guarded(world: World) -> Iterator[AdminServer]:
    with AdminServer(world.mesh, token=TOKEN) as server:
        yield server


class Stream:
    """One ``GET /tap`` whose body a thread reads line by line: the raw lines, and
    each ``request`` event's data parsed into ``events``."""

    def __init__(self, port: int, query: str = "", headers: dict[str, str] | None = None) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
        connection.request("GET", "/tap" + query, headers=headers or {})
        assert connection.sock is not None
        self._sock: socket.socket = connection.sock
        self.response = connection.getresponse()
        self.lines: list[bytes] = []
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.ended = threading.Event()
        self._thread = threading.Thread(target=self._read, name="tap-reader", daemon=True)
        if self.response.status == 200:
            self._thread.start()
        else:
            self.body = self.response.read()
            self.ended.set()

    def _read(self) -> None:
        kind, data = "", []
        try:
            while line := self.response.readline():
                self.lines.append(line)
                text = line.decode("utf-8").rstrip("\n")
                if text.startswith("event: "):
                    kind = text.removeprefix("event: ")
                elif text.startswith("data: "):
                    data.append(text.removeprefix("data: "))
                elif not text:
                    if kind == "request":
                        self.events.put(json.loads("\n".join(data)))
                    kind, data = "", []
        except OSError:
            pass  # closed under us
        finally:
            self.ended.set()

    def take(self, count: int) -> list[dict[str, Any]]:
        deadline = time.monotonic() + WAIT
        taken = []
        for _ in range(count):
            try:
                taken.append(self.events.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                raise AssertionError(f"{len(taken)} of {count} events came") from None
        return taken

    def close(self) -> None:
        """Go away as a client would: shut the socket down (which also wakes the reader)."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        if self._thread.ident is not None:  # started: the reader ends at once now
            self._thread.join(WAIT)
        self.response.close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def request(
    server: AdminServer, path: str, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=WAIT)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def headers_of(event: dict[str, Any], side: str) -> dict[str, str]:
    return {name: value for name, value in event[f"{side}_headers"]}


# -- the stream -----------------------------------------------------------------------


def test_events_arrive_as_server_sent_events(admin: AdminServer, world: World) -> None:
    with Stream(admin.port, "?service=users&path_prefix=/api/") as stream:
        assert stream.response.status == 200
        assert stream.response.headers["Content-Type"] == "text/event-stream"
        assert stream.response.headers["Cache-Control"] == "no-cache"
        assert stream.response.headers["Connection"] == "close"
        assert stream.response.headers["Content-Length"] is None
        world.send(1, "/other")  # filtered out
        world.send(1, "/api/x?q=1")
        events = {event["direction"]: event for event in stream.take(2)}
        lines = list(stream.lines)
    out, into = events["outbound"], events["inbound"]
    assert {k: out[k] for k in ("source", "destination", "route", "method", "path")} == {
        "source": "checkout",
        "destination": "users",
        "route": "api",
        "method": "GET",
        "path": "/api/x",
    }
    assert (out["status"], out["error"], out["attempts"]) == (200, None, 1)
    assert out["endpoint"] == world.address and out["flags"] == []
    assert out["duration_ms"] > 0 and out["timestamp"] == pytest.approx(time.time(), abs=60)
    assert out["request_body"] is None and out["response_body"] is None
    assert (into["destination"], into["method"], into["path"], into["status"]) == (
        "users",
        "GET",
        "/api/x",
        200,
    )
    assert into["request_body"] is None
    # the wire format: an event line, one data line of compact JSON, a blank line
    first = lines.index(b"event: request\n")
    assert lines[first + 1].startswith(b"data: {") and lines[first + 1].endswith(b"}\n")
    assert lines[first + 2] == b"\n"


def test_a_route_filter_and_a_limit(admin: AdminServer, world: World) -> None:
    # the inbound side has no route "api" (it has no inbound routes): outbound only
    with Stream(admin.port, "?route=api&limit=2") as stream:
        world.send(1, "/other")
        world.send(3)
        assert [event["direction"] for event in stream.take(2)] == ["outbound", "outbound"]
        assert stream.ended.wait(WAIT), "the stream did not end at its limit"
        assert stream.events.empty()


def test_a_status_filter_passes_only_5xx(admin: AdminServer, world: World) -> None:
    with Stream(admin.port, "?status=5xx") as stream:
        world.send(3)
        world.app.status = 503
        try:
            world.send(2)
        finally:
            world.app.status = 200
        # send() waited for the 200s to reach the tap before the 503s went out: any 200
        # that got through would come before these
        events = stream.take(4)
    assert [event["status"] for event in events] == [503] * 4
    assert sorted(event["direction"] for event in events) == ["inbound"] * 2 + ["outbound"] * 2


def test_secret_headers_are_redacted(admin: AdminServer, world: World) -> None:
    secrets = {"Authorization": "Bearer tok-do-not-leak", "Cookie": "session=do-not-leak"}
    with Stream(admin.port, "?path_prefix=/api/") as stream:
        world.send(1, headers=secrets)
        events = {event["direction"]: event for event in stream.take(2)}
        raw = b"".join(stream.lines)
    assert b"do-not-leak" not in raw
    sent = headers_of(events["outbound"], "request")
    assert sent["authorization"] == sent["cookie"] == "[redacted]"
    received = headers_of(events["inbound"], "request")
    assert all(
        received.get(name, "[redacted]") == "[redacted]" for name in ("authorization", "cookie")
    )


# -- refusals -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "name"),
    [
        ("sample=2", "sample"),
        ("sample=lots", "sample"),
        ("limit=0", "limit"),
        ("limit=ten", "limit"),
        ("status=7xx", "status"),
        ("direction=sideways", "direction"),
        ("path_prefix=api", "path_prefix"),
        ("service=", "service"),
        ("capture_bodies=100", "capture_bodies"),
    ],
)
def test_bad_parameters_are_400(admin: AdminServer, query: str, name: str) -> None:
    status, body = request(admin, f"/tap?{query}")
    assert status == 400, body
    assert name in json.loads(body)["error"]


def test_the_token_is_required(guarded: AdminServer) -> None:
    with Stream(guarded.port) as stream:
        assert stream.response.status == 401
        assert json.loads(stream.body) == {"error": "unauthorized"}
    with Stream(guarded.port, headers={"Authorization": "Bearer nope"}) as stream:
        assert stream.response.status == 401
    with Stream(guarded.port, headers={"Authorization": f"Bearer {TOKEN}"}) as stream:
        assert stream.response.status == 200
        assert stream.response.headers["Content-Type"] == "text/event-stream"


# -- lifecycle ------------------------------------------------------------------------


def test_a_client_that_goes_away_ends_its_subscription(admin: AdminServer, world: World) -> None:
    stream = Stream(admin.port, "?route=gone")
    assert world.streams("gone") == 1  # open before the response's headers
    stream.close()
    # the next keep-alive writes fail: the handler notices and closes the subscription
    wait_until(lambda: world.streams("gone") == 0, "the subscription to close", 500)


def test_stop_ends_open_streams(world: World) -> None:
    server = AdminServer(world.mesh).start()
    with Stream(server.port, "?route=stop") as stream, Stream(server.port, "?route=stop") as other:
        assert world.streams("stop") == 2
        wait_until(lambda: b": keep-alive\n" in stream.lines, "a keep-alive", 300)
        started = time.monotonic()
        server.stop()
        assert stream.ended.wait(2.0) and other.ended.wait(2.0), "a stream outlived stop()"
        assert time.monotonic() - started < 2.0
        assert world.streams("stop") == 0


# -- meshlib tap ----------------------------------------------------------------------


@contextlib.contextmanager
def steady_traffic(world: World) -> Iterator[None]:
    """Requests every few milliseconds until the block ends (at most ~10 s of them)."""
    done = threading.Event()

    def run() -> None:
        with world.mesh.http_client(timeout=30) as client:
            for _ in range(500):
                if done.wait(0.02):
                    return
                client.get("http://users/api/x")

    thread = threading.Thread(target=run, name="traffic", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(WAIT)


def test_tap_command_prints_a_line_per_request(
    admin: AdminServer, world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["tap", "--admin", admin.url, "--direction", "outbound", "--count", "3"]
    with steady_traffic(world):
        assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    for line in lines:
        fields = line.split(" ")
        assert fields[1:7] == ["outbound", "checkout→users", "api", "GET", "/api/x", "200"], line
        assert fields[7].endswith("ms") and float(fields[7].removesuffix("ms")) >= 0
        assert fields[8:] == [world.address, "-"]
        assert time.strptime(fields[0].partition(".")[0], "%H:%M:%S")
    with steady_traffic(world):
        assert main([*argv[:-1], "1", "--json", "--status", "200"]) == 0
    event = json.loads(capsys.readouterr().out)
    assert (event["direction"], event["status"], event["path"]) == ("outbound", 200, "/api/x")


def test_tap_command_reports_errors(
    guarded: AdminServer, admin: AdminServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["tap", "--admin", guarded.url, "--count", "1"]) == 1
    assert "401" in capsys.readouterr().err
    assert main(["tap", "--admin", admin.url, "--status", "7xx"]) == 1
    err = capsys.readouterr().err
    assert "400" in err and "status" in err
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{sock.getsockname()[1]}"
    assert main(["tap", "--admin", dead]) == 1
    assert "cannot reach" in capsys.readouterr().err
