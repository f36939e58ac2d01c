"""Small real services on loopback: an echo ASGI app served by uvicorn on an
ephemeral port in a thread. Used by the demo, the tests and the benchmark."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass
class EchoApp:
    """Answers every request with JSON describing it and records what it saw.

    ``status`` and ``delay`` shape every answer; while ``gate`` is set to an
    unset ``threading.Event``, answers wait for it (at most ``gate_timeout``
    seconds), which lets tests hold requests in flight deterministically.
    ``statuses``, when not empty, replaces ``status``: the n-th request (0-based)
    gets ``statuses[n % len(statuses)]``, so ``(503, 200)`` fails every other one.
    """

    name: str
    status: int = 200
    delay: float = 0.0
    gate: threading.Event | None = None
    gate_timeout: float = 30.0
    seen: list[dict[str, Any]] = field(default_factory=list)
    statuses: Sequence[int] = ()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        client = scope.get("client")
        record = {
            "server": self.name,
            "method": scope["method"],
            "path": scope["path"],
            "raw_path": (scope.get("raw_path") or scope["path"].encode()).decode("latin-1"),
            "query": scope["query_string"].decode(),
            "headers": {k.decode(): v.decode() for k, v in scope["headers"]},
            "raw_headers": [[k.decode(), v.decode()] for k, v in scope["headers"]],
            "client": list(client) if client else None,
            "body": body.decode("latin-1"),
        }
        index = len(self.seen)
        self.seen.append(record)
        gate = self.gate
        if gate is not None:
            deadline = time.monotonic() + self.gate_timeout
            while not gate.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
        if self.delay:
            await asyncio.sleep(self.delay)
        payload = json.dumps(record).encode()
        statuses = self.statuses
        status = statuses[index % len(statuses)] if statuses else self.status
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"x-server", self.name.encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})


class ServerThread:
    """One uvicorn server on 127.0.0.1 in a thread, on an ephemeral port unless
    ``port`` is given (to restart a server where a stopped one was)."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    @property
    def address(self) -> str:
        host = self.sock.getsockname()[0]
        return f"{host}:{self.port}"

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


@contextmanager
def echo_servers(*names: str) -> Iterator[list[ServerThread]]:
    servers = [ServerThread(EchoApp(name)).start() for name in names]
    try:
        yield servers
    finally:
        for server in servers:
            server.stop()
