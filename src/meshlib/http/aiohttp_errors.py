"""aiohttp's exceptions translated into httpx's (imported only by the async transport)."""

from __future__ import annotations

import aiohttp
import httpx

from meshlib.http.errors import Translate


def _from_aiohttp(exc: BaseException) -> httpx.HTTPError | None:
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(str(exc) or "connect timed out")
    if isinstance(exc, aiohttp.ServerTimeoutError | TimeoutError):
        return httpx.ReadTimeout(str(exc) or "read timed out")
    for source, target in _AIOHTTP:
        if isinstance(exc, source):
            return target(str(exc) or source.__name__)
    return None


_AIOHTTP: tuple[tuple[type[Exception], type[httpx.HTTPError]], ...] = (
    (aiohttp.ClientConnectorError, httpx.ConnectError),
    (aiohttp.ServerDisconnectedError, httpx.RemoteProtocolError),
    (aiohttp.ClientPayloadError, httpx.ReadError),
    (aiohttp.ClientOSError, httpx.NetworkError),
    (aiohttp.ClientError, httpx.TransportError),
)


_AIOHTTP_ERRORS = Translate(_from_aiohttp)


def aiohttp_errors() -> Translate:
    """``with aiohttp_errors():`` raises httpx exceptions for aiohttp ones."""
    return _AIOHTTP_ERRORS
