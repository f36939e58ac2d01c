"""Fixtures of the integration suite: real uvicorn echo servers on 127.0.0.1
ephemeral ports (``echo``), a closed port (``dead_address``) and one driver per
client flavour (``driver``: ``mesh.http_client()`` or ``mesh.async_http_client()``
under ``asyncio.run``). Helpers live in ``support.py``."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest

from integration.support import Driver, StartEcho, Upstream
from meshlib.demo.services import EchoApp, ServerThread


@pytest.fixture
def echo() -> Iterator[StartEcho]:
    """``echo("a", "b", status=500)`` starts one echo server per name."""
    started: list[Upstream] = []

    def start(*names: str, **options: Any) -> tuple[Upstream, ...]:
        ups = []
        for name in names:
            app = EchoApp(name, **options)
            up = Upstream(app, ServerThread(app).start())
            started.append(up)
            ups.append(up)
        return tuple(ups)

    yield start
    for up in started:
        up.release()
        up.server.server.should_exit = True
    for up in started:
        up.server.stop()


@pytest.fixture
def dead_address() -> str:
    """A loopback address nobody listens on (bound, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"127.0.0.1:{port}"


@pytest.fixture(params=["sync", "async"])
def driver(request: pytest.FixtureRequest) -> Driver:
    """The test runs once with ``mesh.http_client()`` and once with ``async_http_client()``."""
    return Driver(request.param)
