"""Server half of mesh mTLS: an ASGI app under uvicorn with the workload certificate.

Three modes, on one port:

- ``strict``: TLS only. A connection whose first byte is not a TLS handshake record
  is closed without calling the app; the caller's context requires a client
  certificate.
- ``permissive``: TLS and plaintext. The first byte of each connection decides: a
  TLS handshake record (0x16) starts TLS, anything else goes to uvicorn's HTTP
  protocol as plaintext, with the bytes already read.
- ``disabled``: plain uvicorn.

TLS is terminated here, not by uvicorn: each connection gets a fresh
``server_context()`` (so a rotated certificate applies to new connections without
a restart) and runs on ``ssl.MemoryBIO`` s, which lets permissive mode hand the
sniffed bytes to either side. Once the handshake is done, uvicorn's own HTTP
protocol runs on top of the TLS transport, so it reports ``scheme == "https"``.

Apps get the verified peer through the ASGI TLS extension
(https://asgi.readthedocs.io/en/latest/specs/tls.html) in
``scope["extensions"]["tls"]``, on TLS connections only. Python's ``ssl`` exposes
neither the peer's intermediates nor our own certificate, so ``client_cert_chain``
holds the peer's leaf only and ``server_cert`` is ``None``. A peer whose
certificate fails verification never completes the handshake, so
``client_cert_error`` is always ``None``.

Proxy headers are off: the extension is found by the connection's addresses as
uvicorn reports them in ``scope["client"]`` and ``scope["server"]``, and nothing
a client sends may change those.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar, Final, Literal, cast

import uvicorn
from cryptography import x509
from uvicorn.protocols.http.auto import AutoHTTPProtocol

__all__ = [
    "MODES",
    "MeshServer",
    "Mode",
    "RunningServer",
]

Mode = Literal["strict", "permissive", "disabled"]
MODES: Final[tuple[Mode, ...]] = ("strict", "permissive", "disabled")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
ServerContext = Callable[[], ssl.SSLContext]

logger = logging.getLogger("meshlib.tls")

_TLS_HANDSHAKE_RECORD = 0x16
_READ_SIZE = 256 * 1024
_TLS_VERSIONS: Final[dict[str, int]] = {
    "TLSv1": 0x0301,
    "TLSv1.1": 0x0302,
    "TLSv1.2": 0x0303,
    "TLSv1.3": 0x0304,
}
# OpenSSL cipher names to IANA suite numbers; the mapping is the same for every context
_cipher_ids: dict[str, int] = {}

_ConnectionKey = tuple[str, int, str, int]
# uvicorn's default HTTP protocol (httptools if installed, else h11), built with the
# keyword arguments uvicorn passes to any protocol class given as Config(http=...)
_HTTP_PROTOCOL: Callable[..., asyncio.Protocol] = AutoHTTPProtocol


# -- the ASGI TLS extension --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _TLSInfo:
    """What the handshake established, captured once per connection."""

    client_cert_pem: str | None
    client_cert_name: str | None
    tls_version: int | None
    cipher_suite: int | None

    @classmethod
    def from_ssl_object(cls, ssl_object: ssl.SSLObject) -> _TLSInfo:
        der = ssl_object.getpeercert(binary_form=True)
        pem = name = None
        if der:
            pem = ssl.DER_cert_to_PEM_cert(der)
            try:
                name = x509.load_der_x509_certificate(der).subject.rfc4514_string()
            except ValueError:
                # OpenSSL verified it, cryptography is stricter about some encodings:
                # the identity stays available as PEM
                name = None
        cipher = ssl_object.cipher()
        return cls(
            client_cert_pem=pem,
            client_cert_name=name,
            tls_version=_TLS_VERSIONS.get(ssl_object.version() or ""),
            cipher_suite=_cipher_suite(ssl_object.context, cipher[0]) if cipher else None,
        )

    def extension(self) -> dict[str, Any]:
        """A fresh ``scope["extensions"]["tls"]`` value (apps may mutate theirs)."""
        return {
            "server_cert": None,
            "client_cert_chain": [self.client_cert_pem] if self.client_cert_pem else [],
            "client_cert_name": self.client_cert_name,
            "client_cert_error": None,
            "tls_version": self.tls_version,
            "cipher_suite": self.cipher_suite,
        }


def _cipher_suite(context: ssl.SSLContext, name: str) -> int | None:
    if name not in _cipher_ids:
        for cipher in context.get_ciphers():
            # OpenSSL's id is 0x0300 followed by the IANA number, which is the low 16 bits
            _cipher_ids[cipher["name"]] = cipher["id"] & 0xFFFF
    return _cipher_ids.get(name)


def _address(raw: Any) -> tuple[str, int] | None:
    # normalised exactly as uvicorn does for scope["client"] / scope["server"]
    if isinstance(raw, tuple | list) and len(raw) >= 2:
        return str(raw[0]), int(raw[1])
    return None


def _transport_key(transport: asyncio.BaseTransport) -> _ConnectionKey | None:
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    try:
        client, server = _address(sock.getpeername()), _address(sock.getsockname())
    except OSError:
        return None
    if client is None or server is None:
        return None
    return (*client, *server)


def _scope_key(scope: Scope) -> _ConnectionKey | None:
    client, server = _address(scope.get("client")), _address(scope.get("server"))
    if client is None or server is None:
        return None
    return (*client, *server)


class _Connections:
    """One server's connections: TLS info by connection, and those not yet handed to HTTP."""

    def __init__(self) -> None:
        self.tls: dict[_ConnectionKey, _TLSInfo] = {}
        self.pending: set[_MeshProtocol] = set()
        self.closing = False

    def close_pending(self) -> None:
        """Refuse new connections and drop those still sniffing or handshaking."""
        self.closing = True
        for connection in list(self.pending):
            connection.abort()


class _TLSExtensionApp:
    """ASGI wrapper that adds ``scope["extensions"]["tls"]`` on TLS connections."""

    def __init__(self, app: ASGIApp, connections: _Connections) -> None:
        self._app = app
        self._connections = connections

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            key = _scope_key(scope)
            info = self._connections.tls.get(key) if key is not None else None
            if info is not None:
                extensions = dict(scope.get("extensions") or {})
                extensions["tls"] = info.extension()
                scope = {**scope, "extensions": extensions}
        await self._app(scope, receive, send)


# -- TLS on memory BIOs ------------------------------------------------------------------


class _TLSTransport(asyncio.Transport):
    """The transport uvicorn's protocol sees on a TLS connection: plaintext in and out,
    TLS records on the raw transport underneath."""

    def __init__(self, raw: asyncio.Transport, context: ssl.SSLContext) -> None:
        super().__init__()
        self._raw = raw
        self._context = context
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.ssl_object = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._protocol: asyncio.BaseProtocol | None = None
        self._reading_paused = False
        self._closing = False
        self._loop = asyncio.get_running_loop()

    # fed by _MeshProtocol

    def feed_handshake(self, data: bytes) -> bool:
        """Feed handshake bytes; True once done. Raises ``ssl.SSLError`` on a rejected peer."""
        self._incoming.write(data)
        try:
            self.ssl_object.do_handshake()
        except ssl.SSLWantReadError:
            return False
        finally:
            # the server's flight, or the alert that tells the peer why it was rejected
            self._flush()
        return True

    def feed(self, data: bytes) -> None:
        self._incoming.write(data)
        self._deliver()

    def feed_eof(self) -> None:
        # TLS has no half-close: the app protocol hears EOF and the connection ends
        self._incoming.write_eof()
        self._deliver()
        protocol = self._protocol
        if not self._closing and isinstance(protocol, asyncio.Protocol):
            protocol.eof_received()
        self.close()

    def connection_lost(self) -> None:
        self._closing = True

    def _deliver(self) -> None:
        protocol = self._protocol
        if not isinstance(protocol, asyncio.Protocol):
            return
        while not self._reading_paused and not self._closing:
            try:
                chunk = self.ssl_object.read(_READ_SIZE)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                chunk = b""
            except ssl.SSLError as exc:
                logger.debug("TLS error from %s: %s", self._peer(), exc)
                # close, not abort: the alert we just queued still goes out
                self._closing = True
                self._flush()
                self._raw.close()
                return
            if not chunk:
                # the peer's close_notify (or end of stream); our side closes too
                if not self._closing:
                    protocol.eof_received()
                    self.close()
                return
            protocol.data_received(chunk)
            protocol = self._protocol  # a WebSocket upgrade swaps it mid-stream
            if not isinstance(protocol, asyncio.Protocol):
                return
        # TLS 1.3 post-handshake messages (session tickets, key updates)
        self._flush()

    def _flush(self) -> None:
        data = self._outgoing.read()
        if data and not self._raw.is_closing():
            self._raw.write(data)

    def _peer(self) -> Any:
        return self._raw.get_extra_info("peername")

    # asyncio.Transport

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "sslcontext":
            return self._context
        if name == "ssl_object":
            return self.ssl_object
        if name == "peercert":
            return self.ssl_object.getpeercert()
        if name == "cipher":
            return self.ssl_object.cipher()
        if name == "compression":
            return self.ssl_object.compression()
        return self._raw.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._protocol is not None
        return self._protocol

    @property
    def app_protocol(self) -> asyncio.BaseProtocol | None:
        return self._protocol

    def is_closing(self) -> bool:
        return self._closing or self._raw.is_closing()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        # we send close_notify and don't wait for the peer's, which unwrap() reports
        with contextlib.suppress(ssl.SSLError, ValueError):
            self.ssl_object.unwrap()
        self._flush()
        self._raw.close()

    def abort(self) -> None:
        self._closing = True
        self._raw.abort()

    def is_reading(self) -> bool:
        return not self._reading_paused and not self.is_closing()

    def pause_reading(self) -> None:
        if not self._reading_paused:
            self._reading_paused = True
            self._raw.pause_reading()

    def resume_reading(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            self._raw.resume_reading()
            # records that arrived while paused wait in the incoming BIO
            self._loop.call_soon(self._deliver)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or not data:
            return
        view = memoryview(data)
        try:
            while view:
                view = view[self.ssl_object.write(view) :]
        except ssl.SSLError as exc:
            logger.debug("TLS write to %s failed: %s", self._peer(), exc)
            self.abort()
            return
        self._flush()

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        # asyncio's Transport contract: can_write_eof() is False, so this refuses
        raise NotImplementedError("TLS has no half-close")

    def get_write_buffer_size(self) -> int:
        return self._raw.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._raw.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._raw.set_write_buffer_limits(high, low)


# -- the per-connection protocol uvicorn instantiates ------------------------------------


@dataclass(frozen=True)
class _Settings:
    mode: Mode
    server_context: ServerContext
    handshake_timeout: float
    connections: _Connections


class _MeshProtocol(asyncio.Protocol):
    """Sniffs the first byte, terminates TLS, then runs uvicorn's HTTP protocol on top.

    uvicorn builds one per connection (``Config(http=...)``) with the arguments its
    own HTTP protocols take; they are passed through untouched.
    """

    settings: ClassVar[_Settings]

    def __init__(self, **uvicorn_args: Any) -> None:
        self._uvicorn_args = uvicorn_args
        self._raw: asyncio.Transport | None = None
        self._tls: _TLSTransport | None = None
        self._handshake_done = False
        self._timer: asyncio.TimerHandle | None = None
        self._key: _ConnectionKey | None = None
        self._info: _TLSInfo | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one
        self._raw = cast(asyncio.Transport, transport)
        connections = self.settings.connections
        if connections.closing:
            self._raw.abort()
            return
        connections.pending.add(self)
        self._timer = asyncio.get_running_loop().call_later(
            self.settings.handshake_timeout, self._on_timeout
        )

    def data_received(self, data: bytes) -> None:
        if self._tls is not None:
            if self._handshake_done:
                self._tls.feed(data)
            else:
                self._handshake(data)
        elif data and data[0] == _TLS_HANDSHAKE_RECORD:
            self._start_tls(data)
        elif data and self.settings.mode == "permissive":
            self._serve_plaintext(data)
        elif data:
            logger.debug("closing non-TLS connection from %s (strict mode)", self._peer())
            self._close_raw()

    def eof_received(self) -> bool:
        if self._tls is not None and self._handshake_done:
            self._tls.feed_eof()
        # False: the raw transport closes itself
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._not_pending()
        connections = self.settings.connections
        if self._key is not None and connections.tls.get(self._key) is self._info:
            del connections.tls[self._key]
        tls = self._tls
        if tls is not None and self._handshake_done:
            tls.connection_lost()
            protocol = tls.app_protocol
            if protocol is not None:
                protocol.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._tls is not None and self._tls.app_protocol is not None:
            self._tls.app_protocol.pause_writing()

    def resume_writing(self) -> None:
        if self._tls is not None and self._tls.app_protocol is not None:
            self._tls.app_protocol.resume_writing()

    def abort(self) -> None:
        """Drop a connection that has not reached HTTP yet (server shutdown)."""
        self._not_pending()
        if self._raw is not None:
            self._raw.abort()

    # steps

    def _start_tls(self, data: bytes) -> None:
        assert self._raw is not None
        try:
            context = self.settings.server_context()
        except Exception:
            logger.exception("server_context() failed; dropping the connection")
            self.abort()
            return
        if self.settings.mode == "strict" and context.verify_mode != ssl.CERT_REQUIRED:
            # fail closed: strict must never admit a peer without a certificate
            logger.error("strict mode needs a context with verify_mode CERT_REQUIRED; dropping")
            self.abort()
            return
        try:
            self._tls = _TLSTransport(self._raw, context)
        except (ssl.SSLError, ValueError):
            logger.exception("server_context() returned no usable server-side context")
            self.abort()
            return
        self._handshake(data)

    def _handshake(self, data: bytes) -> None:
        assert self._tls is not None and self._raw is not None
        try:
            done = self._tls.feed_handshake(data)
        except OSError as exc:  # ssl.SSLError and its subclasses
            logger.debug("TLS handshake with %s failed: %s", self._peer(), exc)
            self._close_raw()
            return
        if not done:
            return
        self._handshake_done = True
        self._not_pending()
        self._info = _TLSInfo.from_ssl_object(self._tls.ssl_object)
        self._key = _transport_key(self._raw)
        if self._key is not None:
            self.settings.connections.tls[self._key] = self._info
        protocol = self._http_protocol()
        self._tls.set_protocol(protocol)
        protocol.connection_made(self._tls)
        # application data that came with the peer's last handshake flight
        self._tls.feed(b"")

    def _serve_plaintext(self, data: bytes) -> None:
        assert self._raw is not None
        self._not_pending()
        protocol = self._http_protocol()
        # step aside: the raw transport talks to uvicorn's protocol directly from now on
        self._raw.set_protocol(protocol)
        protocol.connection_made(self._raw)
        protocol.data_received(data)

    def _http_protocol(self) -> asyncio.Protocol:
        return _HTTP_PROTOCOL(**self._uvicorn_args)

    def _on_timeout(self) -> None:
        self._timer = None
        logger.debug(
            "closing connection from %s: no TLS handshake within %.3g s",
            self._peer(),
            self.settings.handshake_timeout,
        )
        self.abort()

    def _not_pending(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.settings.connections.pending.discard(self)

    def _close_raw(self) -> None:
        self._not_pending()
        if self._raw is not None:
            self._raw.close()

    def _peer(self) -> Any:
        return self._raw.get_extra_info("peername") if self._raw is not None else None


def _protocol_class(settings: _Settings) -> type[asyncio.Protocol]:
    # uvicorn takes a protocol class, not a factory: bind this server's settings to one
    class _BoundMeshProtocol(_MeshProtocol):
        pass

    _BoundMeshProtocol.settings = settings
    return _BoundMeshProtocol


# -- uvicorn -----------------------------------------------------------------------------


class _UvicornServer(uvicorn.Server):
    """uvicorn's server, which also drops connections still sniffing or handshaking
    when it stops (uvicorn only knows those that reached its HTTP protocol)."""

    def __init__(
        self,
        config: uvicorn.Config,
        mode: Mode,
        connections: _Connections,
        started: threading.Event,
    ) -> None:
        super().__init__(config)
        self._mode = mode
        self._connections = connections
        self._started_event = started

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().startup(sockets=sockets)
        finally:
            # also on failure, so that whoever waits for startup wakes up
            self._started_event.set()
        if self.started and sockets:
            host, port = sockets[0].getsockname()[:2]
            logger.info("serving on %s:%d (mode %s)", host, port, self._mode)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # synchronous up to uvicorn closing its listeners: no connection slips in between
        self._connections.close_pending()
        await super().shutdown(sockets=sockets)


def _check_mode(mode: str) -> Mode:
    for known in MODES:
        if mode == known:
            return known
    raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")


def _bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        # listening now, so connections made before uvicorn starts wait in the backlog
        sock.listen(2048)
    except BaseException:
        sock.close()
        raise
    return sock


class MeshServer:
    """One ASGI app under uvicorn in one mTLS mode. Single use: serve it once.

    ``server_context`` is called for every new TLS connection and must return a
    server-side context that requires (strict) or requests (permissive) a client
    certificate; it runs on the event loop, so it should return a prepared context. With
    ``sock``, the server serves on that socket and closes it when it stops; otherwise it
    binds ``host:port`` itself (port 0 picks a free port). ``handshake_timeout`` bounds
    the wait for a connection's first byte plus its TLS handshake; ``graceful_timeout``
    bounds the wait for requests in flight when stopping (uvicorn's
    ``timeout_graceful_shutdown``).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        mode: str,
        server_context: ServerContext | None,
        log_level: str = "warning",
        sock: socket.socket | None = None,
        handshake_timeout: float = 10.0,
        graceful_timeout: int | None = 10,
    ) -> None:
        self.mode = _check_mode(mode)
        if self.mode != "disabled" and server_context is None:
            raise ValueError(f"mode {mode!r} needs a server_context")
        self.host = host
        self._requested_port = port
        self._sock = sock
        self._port: int | None = None
        self._started = threading.Event()
        connections = _Connections()
        http: type[asyncio.Protocol] | str = "auto"
        if self.mode != "disabled":
            assert server_context is not None
            settings = _Settings(self.mode, server_context, handshake_timeout, connections)
            http = _protocol_class(settings)
            app = _TLSExtensionApp(app, connections)
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            http=http,
            log_level=log_level,
            # scope["client"] keys the TLS identity: no header may rewrite it
            proxy_headers=False,
            timeout_graceful_shutdown=graceful_timeout,
        )
        self._connections = connections
        self._server = _UvicornServer(config, self.mode, connections, self._started)

    @property
    def should_exit(self) -> bool:
        return self._server.should_exit

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        self._server.should_exit = value

    @property
    def started(self) -> bool:
        return self._server.started

    @property
    def port(self) -> int:
        """The bound port (binds the socket if that has not happened yet)."""
        if self._port is None:
            self._port = int(self._socket().getsockname()[1])
        return self._port

    def _socket(self) -> socket.socket:
        if self._sock is None:
            self._sock = _bind(self.host, self._requested_port)
        return self._sock

    async def serve(self) -> None:
        """Serve until SIGINT/SIGTERM (main thread only) or ``should_exit``."""
        sock = self._socket()
        try:
            await self._server.serve(sockets=[sock])
        finally:
            sock.close()

    def run(self) -> None:
        """Blocking :meth:`serve` on a new event loop (uvicorn's choice of loop)."""
        sock = self._socket()
        try:
            self._server.run(sockets=[sock])
        finally:
            sock.close()

    def start_in_thread(self, startup_timeout: float = 10.0) -> RunningServer:
        """Run in a background thread; returns once the app's startup is done."""
        port = self.port
        failures: list[BaseException] = []

        def target() -> None:
            try:
                self.run()
            except BaseException as exc:  # SystemExit included: uvicorn exits on startup failure
                failures.append(exc)
            finally:
                self._started.set()

        thread = threading.Thread(target=target, name=f"meshlib-server:{port}", daemon=True)
        thread.start()
        running = RunningServer(self, thread)
        if not self._started.wait(startup_timeout):
            running.stop()
            raise RuntimeError(f"server on port {port} did not start in {startup_timeout} s")
        if not self.started:
            thread.join(startup_timeout)
            raise RuntimeError(f"server on port {port} failed to start") from (
                failures[0] if failures else None
            )
        return running

    def force_exit(self) -> None:
        """Stop without waiting for requests in flight or the app's shutdown."""
        self._server.force_exit = True
        self._server.should_exit = True


class RunningServer:
    """A :class:`MeshServer` running in a background thread."""

    def __init__(self, server: MeshServer, thread: threading.Thread) -> None:
        self.server = server
        self.port = server.port
        self.host = server.host
        self._thread = thread

    def stop(self, timeout: float = 15.0) -> None:
        """Stop accepting, let uvicorn close connections, and join the thread."""
        self.server.should_exit = True
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.server.force_exit()
            self._thread.join(5.0)
        if self._thread.is_alive():
            raise RuntimeError(f"server on port {self.port} did not stop")

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
