"""Scaffolding shared by the examples; nothing here is meshlib API.

It starts one demo echo server (``meshlib.demo.services.EchoApp``) per
placeholder address of ``mesh.yaml`` and ``endpoints.yaml``, and writes copies
of both files into a temporary directory with the real loopback addresses
substituted. Every echo server answers with JSON naming itself (``server``)
and describing the request it received (``path``, ``headers``, ...).
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from meshlib.demo.services import EchoApp, ServerThread

EXAMPLES = Path(__file__).resolve().parent

# Placeholder address in mesh.yaml / endpoints.yaml → name of the server started for it.
PLACEHOLDERS = {
    "127.0.0.1:8001": "users-v1-a",
    "127.0.0.1:8002": "users-v1-b",
    "127.0.0.1:8003": "users-v2",
    "127.0.0.1:8004": "users-next",
    "127.0.0.1:8101": "orders",
    "127.0.0.1:8301": "sessions-a",
    "127.0.0.1:8302": "sessions-b",
    "127.0.0.1:8303": "sessions-c",
    "127.0.0.1:8201": "payments-a",
    "127.0.0.1:8202": "payments-b",
    "127.0.0.1:8203": "payments-standby",
}


@dataclass
class Loopback:
    policy: Path  # mesh.yaml with real addresses
    endpoints: Path  # endpoints.yaml with real addresses, watched by the file registry
    apps: dict[str, EchoApp]  # server name → app (``app.seen`` lists the requests it got)
    addresses: dict[str, str]  # placeholder → real address

    def substitute(self, text: str) -> str:
        for placeholder, address in self.addresses.items():
            text = text.replace(placeholder, address)
        return text

    def write_endpoints(self, text: str) -> None:
        """Rewrite the watched endpoints file, as a deploy script would."""
        self.endpoints.write_text(self.substitute(text), encoding="utf-8")


@contextmanager
def loopback() -> Iterator[Loopback]:
    """Start the servers and write the substituted files; stop everything at the end."""
    apps = {name: EchoApp(name) for name in PLACEHOLDERS.values()}
    servers = [ServerThread(app).start() for app in apps.values()]
    addresses = {
        placeholder: server.address
        for placeholder, server in zip(PLACEHOLDERS, servers, strict=True)
    }
    try:
        with tempfile.TemporaryDirectory(prefix="meshlib-example-") as tmp:
            setup = Loopback(Path(tmp, "mesh.yaml"), Path(tmp, "endpoints.yaml"), apps, addresses)
            setup.write_endpoints((EXAMPLES / "endpoints.yaml").read_text(encoding="utf-8"))
            policy = setup.substitute((EXAMPLES / "mesh.yaml").read_text(encoding="utf-8"))
            policy = policy.replace(
                "path: endpoints.yaml", f"path: {json.dumps(str(setup.endpoints))}"
            )
            setup.policy.write_text(policy, encoding="utf-8")
            yield setup
    finally:
        for server in servers:
            server.stop()


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll until ``condition()`` holds (file changes are picked up by polling)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the change was not picked up in time")
        time.sleep(0.05)


async def async_wait_until(condition: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    """``wait_until`` for async code: ``condition`` is a coroutine function."""
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the change was not picked up in time")
        await asyncio.sleep(0.05)


def server_of(reply: httpx.Response) -> str:
    """Which echo server answered (each one puts its name in the JSON body)."""
    reply.raise_for_status()
    return str(reply.json()["server"])


def shares(counts: Counter[str], total: int) -> str:
    return ", ".join(f"{name} {100 * n / total:.0f}%" for name, n in sorted(counts.items()))
