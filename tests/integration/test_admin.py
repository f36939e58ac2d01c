"""The admin endpoint over real HTTP: every endpoint against a mesh that carried real
traffic, the Prometheus exposition line by line, the bearer token, loopback-only
binding, 404/405/500, ``meshlib top`` and ``meshlib graph``, and ``stop()``."""

from __future__ import annotations

import http.client
import json
import logging
import re
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from integration.support import wait_until
from meshlib import Mesh
from meshlib.cli import main
from meshlib.demo.services import EchoApp, ServerThread
from meshlib.telemetry import prometheus
from meshlib.telemetry.admin import AdminServer

pytestmark = pytest.mark.integration

API_OK, API_FAILED, OTHER = 6, 2, 4
SENT = API_OK + API_FAILED + OTHER

# the text format 0.0.4: name, optional labels with escaped values, value, optional timestamp
_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
_VALUE = r"[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|Inf)|NaN"
SAMPLE = re.compile(
    rf"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)"
    rf"(?P<labels>\{{(?:{_LABEL}(?:,{_LABEL})*,?)?\}})?"
    rf" (?P<value>{_VALUE})(?: -?\d+)?$"
)
HELP = re.compile(r"^# HELP (?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*) .*$")
TYPE = re.compile(
    r"^# TYPE (?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*) (?P<kind>counter|gauge|histogram|summary|untyped)$"
)


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    """``checkout`` called ``users`` (served through the same mesh's ``asgi``, so both
    directions have traffic): 8 requests on route ``api`` (2 of them 503) and 4 on
    ``default``."""
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
            with mesh.http_client(timeout=30) as client:
                for _ in range(API_OK):
                    assert client.get("http://users/api/x").status_code == 200
                for _ in range(OTHER):
                    assert client.get("http://users/other").status_code == 200
                app.status = 503
                for _ in range(API_FAILED):
                    assert client.get("http://users/api/y").status_code == 503
            # the server side records at the end of its response, maybe after the client
            wait_until(
                lambda: (
                    mesh.stats()["inbound"].get("users", {}).get("total", {}).get("requests")
                    == SENT
                ),
                "the inbound count",
            )
            yield mesh
        finally:
            server.stop()


@pytest.fixture(scope="module")
def admin(mesh: Mesh) -> Iterator[AdminServer]:
    with AdminServer(mesh) as server:
        yield server


@pytest.fixture(scope="module")
def guarded(mesh: Mesh) -> Iterator[AdminServer]:
    with AdminServer(mesh, token="s3cret") as server:
        yield server


def request(
    server: AdminServer,
    path: str,
    method: str = "GET",
    headers: dict[str, str] | None = None,
) -> tuple[int, http.client.HTTPMessage, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


def get_json(server: AdminServer, path: str) -> Any:
    status, headers, body = request(server, path)
    assert status == 200, body
    assert headers["Content-Type"] == "application/json"
    return json.loads(body)


# -- endpoints ------------------------------------------------------------------------


def test_healthz_and_config_dump(admin: AdminServer, mesh: Mesh) -> None:
    version = mesh.snapshot.version
    health = get_json(admin, "/healthz")
    assert health == {"status": "ok", "service": "checkout", "version": version}
    dump = get_json(admin, "/config_dump")
    assert dump["version"] == version and dump["service"] == "checkout"
    assert "users" in dump["clusters"] and [r["name"] for r in dump["routes"]["users"]] == [
        "api",
        "default",
    ]


def test_stats_count_the_traffic(admin: AdminServer) -> None:
    stats = get_json(admin, "/stats")
    users = stats["outbound"]["users"]
    assert users["routes"]["api"]["requests"] == API_OK + API_FAILED
    assert users["routes"]["api"]["success_rate"] == API_OK / (API_OK + API_FAILED)
    assert users["routes"]["default"]["requests"] == OTHER
    assert users["total"]["requests"] == SENT
    assert stats["inbound"]["users"]["total"]["requests"] == SENT


def test_graph_json_and_dot(admin: AdminServer) -> None:
    graph = get_json(admin, "/graph")
    assert [(e["source"], e["destination"], e["requests"]) for e in graph["edges"]] == [
        ("checkout", "users", SENT)
    ]
    status, headers, body = request(admin, "/graph?format=dot")
    assert status == 200 and headers["Content-Type"].startswith("text/vnd.graphviz")
    assert '"checkout" -> "users"' in body.decode()
    status, headers, body = request(admin, "/graph?format=svg")
    assert status == 200 and headers["Content-Type"] == "image/svg+xml"
    assert body.startswith(b"<svg") and b">users</text>" in body
    status, headers, body = request(admin, "/graph?format=png")
    assert status == 400 and json.loads(body)["error"].startswith("graph format")


def test_metrics_follow_the_text_format(admin: AdminServer) -> None:
    status, headers, body = request(admin, "/metrics")
    assert status == 200
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    text = body.decode()
    assert text.endswith("\n")
    helped: set[str] = set()
    typed: dict[str, str] = {}
    samples: dict[str, list[str]] = {}
    for line in text.splitlines():
        if match := HELP.match(line):
            helped.add(match["name"])
        elif match := TYPE.match(line):
            typed[match["name"]] = match["kind"]
        else:
            match = SAMPLE.match(line)
            assert match is not None, f"not a sample line: {line!r}"
            assert match["name"] in typed, f"sample before its TYPE: {line!r}"
            samples.setdefault(match["name"], []).append(line)
    assert typed == {
        "meshlib_requests_per_second": "gauge",
        "meshlib_success_rate": "gauge",
        "meshlib_latency_ms": "gauge",
        "meshlib_requests_total": "counter",
    }
    assert helped == set(typed)
    outbound = 'direction="outbound",source="checkout",service="users"'
    inbound = 'direction="inbound",source="checkout",service="users"'
    totals = samples["meshlib_requests_total"]
    assert f'meshlib_requests_total{{{outbound},route="default"}} {OTHER}' in totals
    assert f'meshlib_requests_total{{{outbound},route="api"}} {API_OK + API_FAILED}' in totals
    assert any(line.startswith(f"meshlib_requests_total{{{inbound},") for line in totals)
    assert f'meshlib_success_rate{{{outbound},route="api"}} 0.75' in samples["meshlib_success_rate"]
    quantiles = {
        re.search(r'quantile="([^"]+)"', line)[1]  # type: ignore[index]
        for line in samples["meshlib_latency_ms"]
        if line.startswith(f'meshlib_latency_ms{{{outbound},route="api"')
    }
    assert quantiles == {"0.5", "0.95", "0.99"}
    assert len(samples["meshlib_requests_per_second"]) == 2 + 1  # two routes out, one in


def test_metrics_escape_label_values_and_keep_empty_families() -> None:
    with Mesh({}) as mesh:
        assert prometheus.render(mesh).count("# TYPE") == 4  # families without samples
        mesh._traffic.outbound('we"ird\\svc\nx', "r").record(True, 0.001)
        text = prometheus.render(mesh)
    line = next(x for x in text.splitlines() if x.startswith("meshlib_requests_total{"))
    assert line == (
        'meshlib_requests_total{direction="outbound",source="",'
        'service="we\\"ird\\\\svc\\nx",route="r"} 1'
    )
    assert all(SAMPLE.match(x) for x in text.splitlines() if not x.startswith("#"))


# -- refusals -------------------------------------------------------------------------


def test_token_is_required_and_checked(guarded: AdminServer) -> None:
    status, headers, body = request(guarded, "/stats")
    assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
    assert json.loads(body) == {"error": "unauthorized"}
    wrong = {"Authorization": "Bearer s3cret-not"}
    assert request(guarded, "/stats", headers=wrong)[0] == 401
    assert request(guarded, "/stats", headers={"Authorization": "Basic s3cret"})[0] == 401
    right = {"Authorization": "Bearer s3cret"}
    status, _, body = request(guarded, "/stats", headers=right)
    assert status == 200 and json.loads(body)["service"] == "checkout"
    # the token guards every answer, even 404 and 405
    assert request(guarded, "/nope")[0] == 401
    assert request(guarded, "/stats", method="POST")[0] == 401
    assert request(guarded, "/nope", headers=right)[0] == 404


def test_unknown_paths_and_methods(admin: AdminServer) -> None:
    status, headers, body = request(admin, "/nope")
    assert status == 404 and headers["Content-Type"] == "application/json"
    assert "error" in json.loads(body)
    for method in ("POST", "DELETE", "PUT", "BREW"):
        status, headers, body = request(admin, "/stats", method=method)
        assert (status, headers["Allow"]) == (405, "GET"), method
        assert "error" in json.loads(body)


def test_a_failing_endpoint_answers_500_without_details(
    admin: AdminServer,
    mesh: Mesh,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("secret detail")

    monkeypatch.setattr(mesh, "stats", broken)
    with caplog.at_level(logging.ERROR, logger="meshlib.admin"):
        status, _, body = request(admin, "/stats")
    assert status == 500 and json.loads(body) == {"error": "internal error"}
    assert b"secret" not in body
    assert any("secret detail" in (r.exc_text or "") for r in caplog.records)


def test_non_loopback_hosts_are_refused(mesh: Mesh) -> None:
    for host in ("0.0.0.0", "10.1.2.3", "::", "example.org"):
        with pytest.raises(ValueError, match="not loopback"):
            AdminServer(mesh, host=host)
    for host in ("127.0.0.1", "127.9.9.9", "::1", "localhost"):
        AdminServer(mesh, host=host)  # accepted; not started
    AdminServer(mesh, host="0.0.0.0", allow_remote=True)
    with pytest.raises(ValueError, match="empty"):
        AdminServer(mesh, token="")


# -- the CLI --------------------------------------------------------------------------


def test_top_prints_a_table_per_direction(
    admin: AdminServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["top", "--admin", admin.url, "--count", "1"]) == 0
    out = capsys.readouterr().out
    assert "\x1b[" not in out  # not a terminal: no screen clearing
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("SERVICE"))
    assert lines[header - 1] == "outbound"
    assert re.split(r"\s{2,}", lines[header]) == [
        "SERVICE", "ROUTE", "RPS", "SUCCESS", "P50 MS", "P95 MS", "P99 MS"
    ]  # fmt: skip
    api, default = lines[header + 1].split(), lines[header + 2].split()
    assert (api[:2], api[3]) == (["users", "api"], "75.0%")
    assert (default[:2], default[3]) == (["users", "default"], "100.0%")
    # aligned: every row of the table is as long as its header
    assert len(lines[header + 1]) == len(lines[header + 2]) == len(lines[header])
    assert "inbound" in lines


def test_top_and_graph_report_errors(
    guarded: AdminServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["top", "--admin", guarded.url, "--count", "1"]) == 1
    assert "401" in capsys.readouterr().err
    argv = ["top", "--admin", guarded.url, "--count", "1", "--token", "s3cret"]
    assert main(argv) == 0
    assert "users" in capsys.readouterr().out
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{sock.getsockname()[1]}"
    assert main(["graph", "--admin", dead]) == 1
    assert "cannot reach" in capsys.readouterr().err


def test_graph_command(admin: AdminServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["graph", "--admin", admin.url, "--format", "dot"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("digraph mesh {") and '"checkout" -> "users"' in out
    assert main(["graph", "--admin", admin.url.removeprefix("http://")]) == 0
    assert json.loads(capsys.readouterr().out)["nodes"] == ["checkout", "users"]


# -- lifecycle ------------------------------------------------------------------------


def test_stop_closes_connections_and_frees_the_port(mesh: Mesh) -> None:
    server = AdminServer(mesh).start()
    port = server.port
    assert server.url == f"http://127.0.0.1:{port}"
    kept = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        kept.request("GET", "/healthz")
        assert kept.getresponse().read()  # HTTP/1.1: the connection stays open
        server.stop()
        server.stop()  # idempotent
        with pytest.raises(OSError):
            kept.request("GET", "/healthz")
            kept.getresponse()
    finally:
        kept.close()
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port)):
        pass
    again = AdminServer(mesh, port=port).start()
    try:
        assert again.port == port and request(again, "/healthz")[0] == 200
    finally:
        again.stop()
