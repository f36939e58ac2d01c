"""Translate the wire libraries' exceptions into httpx's, so callers of a mesh
client catch the same exceptions as with a plain httpx client.

aiohttp's table lives in `meshlib.http.aiohttp_errors`, so that processes using
only the sync client never import aiohttp (about 11 MiB).
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType

import httpcore
import httpx

_HTTPCORE: tuple[tuple[type[Exception], type[httpx.HTTPError]], ...] = (
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.ProtocolError, httpx.ProtocolError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
)


class Translate:
    """Context manager mapping wire exceptions to httpx's.

    A class, not ``@contextmanager``: it is entered several times per request
    and a generator-based one costs several µs each time.
    """

    __slots__ = ("_map",)

    def __init__(self, mapping: Callable[[BaseException], httpx.HTTPError | None]) -> None:
        self._map = mapping

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None or not isinstance(exc, Exception):
            return
        mapped = self._map(exc)
        if mapped is not None:
            raise mapped from exc


def _from_httpcore(exc: BaseException) -> httpx.HTTPError | None:
    if isinstance(exc, httpcore.ConnectionNotAvailable):  # pragma: no cover - pool internals
        return httpx.TransportError(str(exc))
    for source, target in _HTTPCORE:
        if isinstance(exc, source):
            return target(str(exc))
    return None


_HTTPCORE_ERRORS = Translate(_from_httpcore)


def httpcore_errors() -> Translate:
    """``with httpcore_errors():`` raises httpx exceptions for httpcore ones."""
    return _HTTPCORE_ERRORS
