"""OpenTelemetry metrics on loopback: an SDK MeterProvider with an in-memory reader,
a client mesh calling an echo app served behind ``mesh.asgi``, and known traffic.

The provider is handed to `METRICS` directly (never set as the process's global
provider, which the API allows only once), fresh for each test, and taken away
afterwards, so the other modules run as without a provider.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from integration.support import Driver
from meshlib import Mesh
from meshlib.demo.services import EchoApp, ServerThread
from meshlib.errors import ConfigError
from meshlib.telemetry.histogram import HistogramCell
from meshlib.telemetry.metrics import METRICS

pytestmark = pytest.mark.integration

FAST_BACKOFF = {"base": "1ms", "max": "2ms"}


@pytest.fixture
def reader() -> Iterator[InMemoryMetricReader]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    METRICS._provider = lambda: provider
    METRICS.refresh()
    assert METRICS.on
    yield reader
    METRICS._provider = metrics.get_meter_provider
    METRICS.refresh()
    provider.shutdown()


def points(reader: InMemoryMetricReader, name: str) -> list[Any]:
    """The data points of the instrument ``name`` (empty if it recorded nothing)."""
    data = reader.get_metrics_data()
    found: list[Any] = []
    if data is None:
        return found
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name:
                    found.extend(metric.data.data_points)
    return found


def counts_by(points_: list[Any], label: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for point in points_:
        value = point.count if hasattr(point, "count") else point.value
        key = point.attributes.get(label)
        out[key] = out.get(key, 0) + value
    return out


@pytest.fixture
def served() -> Iterator[tuple[EchoApp, str]]:
    """An echo app behind ``mesh.asgi`` as service ``echo``: 503 twice out of nine."""
    policy = {"services": {"echo": {"endpoints": [{"address": "127.0.0.1:9"}]}}}
    server_mesh = Mesh(policy, service="echo", rng=random.Random(2))
    app = EchoApp("echo", statuses=(503, 200, 200, 200, 503, 200, 200, 200, 200))
    server = ServerThread(server_mesh.asgi(app)).start()
    yield app, server.address
    server.stop()
    server_mesh.close()


def client_policy(address: str) -> dict[str, Any]:
    retries = {"attempts": 3, "on": ["gateway-error"], "backoff": FAST_BACKOFF}
    return {
        "services": {
            "echo": {"endpoints": [{"address": address}], "retries": retries},
        }
    }


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_durations_retries_and_bounded_labels(
    reader: InMemoryMetricReader, served: tuple[EchoApp, str], kind: str
) -> None:
    app, address = served
    with Mesh(client_policy(address), service="checkout", rng=random.Random(1)) as mesh:
        replies = Driver(kind).get(mesh, "http://echo/api/users/42", 7)
    assert [reply.status for reply in replies] == [200] * 7
    assert len(app.seen) == 9

    client = points(reader, "http.client.request.duration")
    assert sum(point.count for point in client) == 7
    assert counts_by(client, "mesh.status_class") == {"2xx": 7}
    (attributes,) = {tuple(sorted(point.attributes.items())) for point in client}
    assert dict(attributes) == {
        "mesh.source": "checkout",
        "mesh.destination": "echo",
        "mesh.route": "default",
        "mesh.subset": "",
        "mesh.status_class": "2xx",
    }

    server = points(reader, "http.server.request.duration")
    assert counts_by(server, "mesh.status_class") == {"2xx": 7, "5xx": 2}
    assert {point.attributes["mesh.destination"] for point in server} == {"echo"}

    retries = points(reader, "meshlib.retries")
    assert sum(point.value for point in retries) == 2
    assert [dict(point.attributes) for point in retries] == [
        {
            "mesh.source": "checkout",
            "mesh.destination": "echo",
            "mesh.route": "default",
            "mesh.subset": "",
        }
    ]
    assert points(reader, "meshlib.hedges") == []

    inflight = points(reader, "meshlib.requests.inflight")
    assert [p.value for p in inflight if p.attributes["mesh.source"] == "checkout"] == [0]

    # bounded: no path, no address, in any label of any instrument
    data = reader.get_metrics_data()
    assert data is not None
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    for value in point.attributes.values():
                        assert "/" not in str(value) and "127.0.0.1" not in str(value)


def test_errors_and_client_rate_limit(reader: InMemoryMetricReader, dead_address: str) -> None:
    policy = {
        "services": {
            "gone": {"endpoints": [{"address": dead_address}]},
            "slow": {
                "endpoints": [{"address": dead_address}],
                "rate_limit": {"requests_per_second": 0.001, "burst": 1},
            },
        }
    }
    with Mesh(policy, service="checkout") as mesh, mesh.http_client() as client:
        for _ in range(2):
            with pytest.raises(Exception):  # noqa: B017 - a connect error
                client.get("http://gone/x")
        with pytest.raises(Exception):  # noqa: B017 - the burst's one call, refused
            client.get("http://slow/x")
        with pytest.raises(Exception, match="rate limit"):
            client.get("http://slow/x")
    durations = points(reader, "http.client.request.duration")
    assert counts_by(durations, "mesh.destination") == {"gone": 2, "slow": 2}
    assert counts_by(durations, "mesh.status_class") == {"error": 4}
    limited = points(reader, "meshlib.rate_limited")
    assert [(p.attributes["mesh.side"], p.value) for p in limited] == [("client", 1)]


def test_server_rate_limit_counts_429(reader: InMemoryMetricReader) -> None:
    inbound = {"rate_limit": {"requests_per_second": 0.001, "burst": 2}}
    policy = {
        "services": {"orders": {"endpoints": [{"address": "127.0.0.1:9"}], "inbound": inbound}}
    }
    with Mesh(policy, service="orders") as server_mesh:
        server = ServerThread(server_mesh.asgi(EchoApp("orders"))).start()
        try:
            client_policy_ = {"services": {"orders": {"endpoints": [{"address": server.address}]}}}
            with Mesh(client_policy_, service="checkout") as mesh:
                replies = Driver("sync").get(mesh, "http://orders/x", 3)
        finally:
            server.stop()
    assert [reply.status for reply in replies] == [200, 200, 429]
    server_points = points(reader, "http.server.request.duration")
    assert counts_by(server_points, "mesh.status_class") == {"2xx": 2, "4xx": 1}
    client_points = points(reader, "http.client.request.duration")
    assert counts_by(client_points, "mesh.status_class") == {"2xx": 2, "4xx": 1}
    limited = points(reader, "meshlib.rate_limited")
    assert [(p.attributes["mesh.side"], p.value) for p in limited] == [("server", 1)]


def test_config_reloads_and_errors(reader: InMemoryMetricReader) -> None:
    with Mesh({"services": {}}, service="checkout") as mesh:
        mesh.http_client().close()  # the mesh's store is now reported as checkout's
        mesh.update({"services": {"users": {"endpoints": [{"address": "127.0.0.1:9"}]}}})
        mesh.update({"services": {}})
        with pytest.raises(ConfigError):
            mesh.update({"services": {"users": {"endpoints": [{"address": "no port"}]}}})
    reloads = points(reader, "meshlib.config.reloads")
    errors = points(reader, "meshlib.config.errors")
    assert [(p.attributes, p.value) for p in reloads] == [({"mesh.source": "checkout"}, 2)]
    assert [(p.attributes, p.value) for p in errors] == [({"mesh.source": "checkout"}, 1)]


def test_breaker_transitions_and_switch_off(
    reader: InMemoryMetricReader, served: tuple[EchoApp, str]
) -> None:
    app, address = served
    app.statuses = ()
    app.status = 503
    policy = {
        "services": {
            "echo": {
                "endpoints": [{"address": address}],
                "circuit_breaker": {"consecutive_failures": 2, "open_for": "60s"},
            }
        }
    }
    with Mesh(policy, service="checkout") as mesh:
        Driver("sync").get(mesh, "http://echo/x", 2)
        transitions = points(reader, "meshlib.breaker.transitions")
        opened = sorted(
            (p.attributes["mesh.breaker"], p.attributes["mesh.to_state"], p.value)
            for p in transitions
        )
        assert opened == [("cluster", "open", 1), ("endpoint", "open", 1)]
        assert {p.attributes["mesh.destination"] for p in transitions} == {"echo"}
        before = counts_by(points(reader, "http.client.request.duration"), "mesh.destination")
        # the switch: no windows, no durations
        plain = {"services": {"echo": {"endpoints": [{"address": address}]}}}
        mesh.update({"telemetry": {"metrics": False}, **plain})
        app.status = 200
        Driver("sync").get(mesh, "http://echo/other", 3)
        after = counts_by(points(reader, "http.client.request.duration"), "mesh.destination")
        assert after == before
        assert mesh.stats()["outbound"]["echo"]["total"]["requests"] == before["echo"]


def test_nothing_without_a_provider(served: tuple[EchoApp, str]) -> None:
    METRICS.refresh()
    assert not METRICS.on  # the API's default provider: off
    _, address = served
    with Mesh(client_policy(address), service="checkout", rng=random.Random(1)) as mesh:
        replies = Driver("sync").get(mesh, "http://echo/x", 7)
        mesh.update({"services": {}})
        with pytest.raises(ConfigError):
            mesh.update({"services": {"users": {"endpoints": [{"address": "no port"}]}}})
        assert mesh.stats()["outbound"]["echo"]["total"]["requests"] == 7
    assert [reply.status for reply in replies] == [200] * 7


def test_a_failing_metrics_sdk_never_costs_a_response(
    reader: InMemoryMetricReader,
    served: tuple[EchoApp, str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, address = served

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("exporter bug")

    monkeypatch.setattr(METRICS.client_duration, "record", broken)
    monkeypatch.setattr(METRICS.server_duration, "record", broken)
    # with the SDK bridge the durations go to the mesh's own cells, not the SDK
    monkeypatch.setattr(HistogramCell, "record", broken)
    with Mesh(client_policy(address), service="checkout", rng=random.Random(1)) as mesh:
        replies = Driver("sync").get(mesh, "http://echo/x", 3)
    assert [reply.status for reply in replies] == [200] * 3
    assert "recording the request's metrics failed" in caplog.text


def sizes(reader: InMemoryMetricReader, name: str) -> tuple[int, float]:
    """(values recorded, their sum) of the body size histogram ``name``."""
    found = points(reader, name)
    return sum(point.count for point in found), sum(point.sum for point in found)


async def _sized(scope: Any, receive: Any, send: Any) -> None:
    """Answers with as many bytes as it received plus 5, with a Content-Length."""
    if scope["type"] != "http":
        return
    received = 0
    while True:
        message = await receive()
        received += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    body = b"y" * (received + 5)
    headers = [(b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_body_sizes_on_both_sides(reader: InMemoryMetricReader, kind: str) -> None:
    server_mesh = Mesh({}, service="echo")
    server = ServerThread(server_mesh.asgi(_sized)).start()
    try:
        policy = {"services": {"echo": {"endpoints": [{"address": server.address}]}}}
        with Mesh(policy, service="checkout") as mesh:
            if kind == "sync":
                with mesh.http_client() as client:
                    lengths = [
                        len(client.post("http://echo/orders", content=b"x" * n).content)
                        for n in (10, 300)
                    ] + [len(client.get("http://echo/orders").content)]
            else:

                async def calls() -> list[int]:
                    async with mesh.async_http_client() as client:
                        posted = [
                            await client.post("http://echo/orders", content=b"x" * n)
                            for n in (10, 300)
                        ]
                        fetched = await client.get("http://echo/orders")
                    return [len(response.content) for response in (*posted, fetched)]

                lengths = asyncio.run(calls())
        assert lengths == [15, 305, 5]
    finally:
        server.stop()
        server_mesh.close()
    # the client: the bodies it sent with a Content-Length (not the GET's), and the
    # bytes of the answers it read
    assert sizes(reader, "http.client.request.body.size") == (2, 310)
    assert sizes(reader, "http.client.response.body.size") == (3, 15 + 305 + 5)
    # the server: the same bytes, the answers counted as mesh.asgi sent them
    assert sizes(reader, "http.server.request.body.size") == (2, 310)
    assert sizes(reader, "http.server.response.body.size") == (3, 325)
    (point,) = points(reader, "http.client.response.body.size")
    assert dict(point.attributes)["mesh.destination"] == "echo"
    assert point.explicit_bounds[:3] == (0.0, 64.0, 256.0)


def test_endpoint_and_path_labels_only_when_asked(reader: InMemoryMetricReader) -> None:
    telemetry = {"metric_labels": ["endpoint", "path"]}
    server_mesh = Mesh({"telemetry": telemetry}, service="echo")
    server = ServerThread(server_mesh.asgi(EchoApp("echo"))).start()
    address = server.address
    try:
        policy = {
            "telemetry": telemetry,
            "services": {"echo": {"endpoints": [{"address": address}]}},
        }
        with Mesh(policy, service="checkout") as mesh, mesh.http_client() as client:
            for path in ("/a", "/b", "/a"):
                assert client.get(f"http://echo{path}?q=1").status_code == 200
    finally:
        server.stop()
        server_mesh.close()
    client_points = points(reader, "http.client.request.duration")
    assert {
        (p.attributes["mesh.endpoint"], p.attributes["url.path"]): p.count for p in client_points
    } == {(address, "/a"): 2, (address, "/b"): 1}
    server_points = points(reader, "http.server.request.duration")
    assert {p.attributes["url.path"]: p.count for p in server_points} == {"/a": 2, "/b": 1}
    assert all("mesh.endpoint" not in p.attributes for p in server_points)
    sized = points(reader, "http.client.response.body.size")
    assert {p.attributes["url.path"] for p in sized} == {"/a", "/b"}


def test_metric_labels_are_checked() -> None:
    with pytest.raises(ConfigError, match="metric_labels"):
        Mesh({"telemetry": {"metric_labels": ["peer_ip"]}})
