"""httpcore network backend for mesh mTLS (the sync client).

httpcore hands every new HTTPS connection to ``stream.start_tls``. This backend
replaces the context it is given with the workload's current client context, so
a rotated certificate applies to the next connection, and checks the server's
SPIFFE ID right after the handshake, before a single request byte is sent. The
service whose identity is expected travels as the SNI name (the mesh sets the
``sni_hostname`` extension to the logical service name).
"""

from __future__ import annotations

import ssl
import typing
from collections.abc import Callable, Iterable, Mapping

import httpcore

from meshlib.tls.contexts import verify_peer
from meshlib.tls.provider import IdentityProvider


class MeshTlsBackend(httpcore.NetworkBackend):
    def __init__(
        self, identity: IdentityProvider, expected: Callable[[], Mapping[str, str]]
    ) -> None:
        self._inner = httpcore.SyncBackend()
        self._identity = identity
        self._expected = expected

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        stream = self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        return _MeshStream(stream, self)

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        return self._inner.connect_unix_socket(path, timeout, socket_options)

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)

    def handshake(
        self, stream: httpcore.NetworkStream, service: str | None, timeout: float | None
    ) -> httpcore.NetworkStream:
        tls = stream.start_tls(self._identity.client_context(), service, timeout)
        try:
            verify_peer(tls.get_extra_info("ssl_object"), service or "", self._expected())
        except BaseException:
            tls.close()
            raise
        return tls


class _MeshStream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream, backend: MeshTlsBackend) -> None:
        self._inner = inner
        self._backend = backend

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, timeout)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, timeout)

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        del ssl_context  # the workload's current context, not httpcore's default
        return self._backend.handshake(self._inner, server_hostname, timeout)

    def get_extra_info(self, info: str) -> typing.Any:
        return self._inner.get_extra_info(info)
