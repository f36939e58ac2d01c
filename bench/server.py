"""The benchmark's server: a minimal ASGI app answering 200 ``ok``.

Run by ``bench/run.py`` in a subprocess, so that the server's CPU is not
counted in the client's process::

    python bench/server.py --fd N

``N`` is a listening TCP socket inherited from the parent (bound to an
ephemeral port on 127.0.0.1). uvicorn runs with one worker, uvloop and
httptools, as ``uvicorn --loop uvloop --http httptools --log-level warning``
would; the CLI's own ``--fd`` opens the socket as AF_UNIX, which would skip
TCP_NODELAY, hence this small launcher.
"""

from __future__ import annotations

import argparse
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import uvicorn

Scope = dict[str, Any]
Message = dict[str, Any]

BODY = b"ok"
HEADERS = [(b"content-type", b"text/plain"), (b"content-length", b"2")]


async def app(
    scope: Scope,
    receive: Callable[[], Awaitable[Message]],
    send: Callable[[Message], Awaitable[None]],
) -> None:
    """Read the request body (if any) and answer 200 ``ok``."""
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = bool(message.get("more_body"))
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fd", type=int, required=True, help="inherited listening socket")
    args = parser.parse_args()
    sock = socket.socket(fileno=args.fd)  # family and type detected: AF_INET, stream
    config = uvicorn.Config(
        app,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
        lifespan="off",
    )
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
