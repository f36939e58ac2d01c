"""aiohttp connector for mesh mTLS (the async client).

aiohttp opens connections in ``_wrap_create_connection``; this connector checks
the server's SPIFFE ID right after the TLS handshake there, before any request
byte is written, and closes the connection on a mismatch. The expected identity
is looked up by the SNI name, which the mesh sets to the logical service name.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp

from meshlib.tls.contexts import verify_peer


class MeshTlsConnector(aiohttp.TCPConnector):
    def __init__(self, expected: Callable[[], Mapping[str, str]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._expected = expected

    async def _wrap_create_connection(
        self, *args: Any, **kwargs: Any
    ) -> tuple[asyncio.Transport, Any]:
        transport, protocol = await super()._wrap_create_connection(*args, **kwargs)
        if kwargs.get("ssl"):
            try:
                verify_peer(
                    transport.get_extra_info("ssl_object"),
                    kwargs.get("server_hostname") or "",
                    self._expected(),
                )
            except BaseException:
                transport.close()
                raise
        return transport, protocol
