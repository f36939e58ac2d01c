"""The admin endpoint: a mesh's configuration, golden metrics and service graph over
HTTP, from a daemon thread, with the standard library only. Off unless started.

``/healthz``, ``/config_dump``, ``/stats``, ``/graph`` (``?format=dot``),
``/metrics`` (Prometheus text format) and ``/tap`` (the live tap as server-sent
events), GET only; loopback unless ``allow_remote``, and with ``token`` every
request needs ``Authorization: Bearer <token>``.

``/tap`` takes the filter of `Mesh.tap` as query parameters (``service``, ``route``,
``status``, ``path_prefix``, ``direction``, ``sample``, ``limit``) and streams one
``event: request`` per matching request, its ``data`` the JSON of `TapEvent.to_dict`
(headers redacted, never bodies), with a ``: keep-alive`` comment after each idle
second. The response has no length: it ends when the connection closes, which
happens at ``limit``, when the client goes away, or on `AdminServer.stop`.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import logging
import math
import socket
import socketserver
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import parse_qs, urlsplit

from meshlib.telemetry import prometheus

if TYPE_CHECKING:
    from meshlib.mesh import Mesh
    from meshlib.telemetry.tap import TapSubscription

log = logging.getLogger("meshlib.admin")

JSON = "application/json"
DOT = "text/vnd.graphviz; charset=utf-8"
EVENT_STREAM = "text/event-stream"
# how long a /tap stream waits for an event before writing a keep-alive comment (the
# write is what notices a client that has gone away)
TAP_KEEPALIVE_SECONDS = 1.0
_TAP_PARAMETERS = ("service", "route", "status", "path_prefix", "direction", "sample", "limit")
# an idle keep-alive connection holds a handler thread; let it go after this long
_IDLE_SECONDS = 30.0


def is_loopback(host: str) -> bool:
    """True for ``localhost``, 127.0.0.0/8 and ::1."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class AdminServer:
    """Serves ``mesh`` on ``host:port`` (0: an ephemeral port) once started.

    A host that is not loopback is refused unless ``allow_remote``: the endpoint
    shows the whole policy. ``start()`` returns the server; ``stop()`` is idempotent.
    """

    def __init__(
        self,
        mesh: Mesh,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        allow_remote: bool = False,
    ) -> None:
        if not allow_remote and not is_loopback(host):
            raise ValueError(
                f"admin host {host!r} is not loopback: pass allow_remote=True "
                "(and a token) to expose the admin endpoint"
            )
        if token is not None and not token:
            raise ValueError("admin token must not be empty (use None for no token)")
        self.mesh = mesh
        self.host = host.strip("[]")
        self._requested_port = port
        self._token = token
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._port: int | None = None
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        """The bound port (known once started)."""
        if self._port is None:
            raise RuntimeError("admin server not started")
        return self._port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> AdminServer:
        """Bind and serve from a daemon thread; a running server is returned as is."""
        with self._lock:
            if self._server is not None:
                return self
            server = _Server(self.host, self._requested_port, self.mesh, self._token)
            self._port = server.server_address[1]
            thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": 0.1},
                name=f"meshlib-admin-{self._port}",
                daemon=True,
            )
            thread.start()
            self._server, self._thread = server, thread
        if not is_loopback(self.host) and self._token is None:
            log.warning("admin endpoint %s is reachable off this host without a token", self.url)
        log.info("admin endpoint on %s", self.url)
        return self

    def stop(self) -> None:
        """Stop serving, end open connections (``/tap`` streams included), join the
        thread and free the port."""
        with self._lock:
            server, thread = self._server, self._thread
            self._server = self._thread = None
        if server is None:
            return
        # first, so that a stream's handler thread sees its end at once
        server.close_streams()
        server.shutdown()
        if thread is not None:
            thread.join(timeout=10)
        server.server_close()
        # keep-alive connections would otherwise go on being answered after stop()
        server.close_connections()

    def __enter__(self) -> AdminServer:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str, port: int, mesh: Mesh, token: str | None) -> None:
        if ":" in host:
            self.address_family = socket.AF_INET6
        self.mesh = mesh
        self.token = token
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        self._streams: set[TapSubscription] = set()
        self._stopping = False
        super().__init__((host, port), _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, a DNS lookup nothing here uses
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):  # already closed by its peer
                connection.shutdown(socket.SHUT_RDWR)

    def add_stream(self, subscription: TapSubscription) -> bool:
        """Track an open ``/tap`` subscription; False (and nothing tracked) once
        stopping, when the stream must not start."""
        with self._connections_lock:
            if self._stopping:
                return False
            self._streams.add(subscription)
            return True

    def discard_stream(self, subscription: TapSubscription) -> None:
        with self._connections_lock:
            self._streams.discard(subscription)

    def close_streams(self) -> None:
        """End every open ``/tap`` stream, and refuse new ones from now on."""
        with self._connections_lock:
            self._stopping = True
            streams = list(self._streams)
        for subscription in streams:
            subscription.close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "meshlib-admin"
    timeout = _IDLE_SECONDS

    def version_string(self) -> str:
        # not the Python version: nothing a client needs
        return self.server_version

    def do_GET(self) -> None:
        if not self._authorized():
            return
        parts = urlsplit(self.path)
        if parts.path == "/tap":
            self._tap(parse_qs(parts.query, keep_blank_values=True))
            return
        endpoint = _ENDPOINTS.get(parts.path)
        if endpoint is None:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint: {parts.path}"})
            return
        mesh = cast(_Server, self.server).mesh
        try:
            status, content_type, body = endpoint(mesh, parse_qs(parts.query))
        except Exception:
            log.exception("admin %s failed", parts.path)
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error"})
            return
        self._send(status, content_type, body)

    def _tap(self, query: Query) -> None:
        """Stream the tap as server-sent events until the subscription ends, the
        client goes away or the server stops."""
        server = cast(_Server, self.server)
        try:
            options = _tap_options(query)
            # never bodies: they would leave the process over the network
            subscription = server.mesh.tap(**options, capture_bodies=0)
        except ValueError as exc:
            self._json(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
            return
        except Exception:
            log.exception("admin /tap failed")
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error"})
            return
        try:
            if not server.add_stream(subscription):
                self.close_connection = True
                self._json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": "admin endpoint stopping"})
                return
            try:
                self._stream(subscription)
            finally:
                server.discard_stream(subscription)
        finally:
            subscription.close()

    def _stream(self, subscription: TapSubscription) -> None:
        # no length and no chunking: the body ends when the connection closes
        self.close_connection = True
        try:
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", EVENT_STREAM)
            self.send_header("Cache-Control", "no-cache")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Connection", "close")
            self.end_headers()
            while not subscription.done:
                event = subscription.next(timeout=TAP_KEEPALIVE_SECONDS)
                if event is not None:
                    chunk = b"event: request\ndata: " + _dumps(event.to_dict()) + b"\n\n"
                elif subscription.done:
                    break
                else:
                    chunk = b": keep-alive\n\n"
                self.wfile.write(chunk)
                self.wfile.flush()
        except OSError as exc:
            # BrokenPipeError, ConnectionResetError, a timed-out write, or stop()
            # shutting the socket down: the stream is over either way
            log.debug("admin /tap: client %s gone: %s", self.address_string(), exc)

    def _not_allowed(self) -> None:
        # the request may carry a body we will not read: don't reuse the connection
        self.close_connection = True
        if self._authorized():
            self._json(
                HTTPStatus.METHOD_NOT_ALLOWED,
                {"error": f"method {self.command} not allowed: use GET"},
                {"Allow": "GET"},
            )

    def parse_request(self) -> bool:
        # every method but GET is a 405, including those http.server would answer 501;
        # False tells it the request has been answered
        if not super().parse_request():
            return False
        if self.command == "GET":
            return True
        self._not_allowed()
        return False

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # http.server's own refusals (bad request line, oversized headers) in JSON too
        self.close_connection = True
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        self._json(code, {"error": message or phrase})

    def _authorized(self) -> bool:
        token = cast(_Server, self.server).token
        if token is None:
            return True
        scheme, _, credentials = (self.headers.get("Authorization") or "").partition(" ")
        given = credentials.strip().encode("utf-8", "surrogateescape")
        if scheme.lower() == "bearer" and hmac.compare_digest(given, token.encode("utf-8")):
            return True
        self._json(
            HTTPStatus.UNAUTHORIZED, {"error": "unauthorized"}, {"WWW-Authenticate": "Bearer"}
        )
        return False

    def _json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, JSON, _dumps(payload), headers)

    def _send(
        self,
        status: int,
        content_type: str,
        body: bytes,
        headers: dict[str, str] | None = None,
    ) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except OSError as exc:
            # the client went away mid-answer: nothing to tell it
            log.debug("admin: client %s gone: %s", self.address_string(), exc)
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        # request lines are noise at INFO; they stay available at DEBUG
        log.debug("admin %s: %s", self.address_string(), format % args)


Query = dict[str, list[str]]
Answer = tuple[HTTPStatus, str, bytes]


def _healthz(mesh: Mesh, query: Query) -> Answer:
    payload = {"status": "ok", "service": mesh.service, "version": mesh.snapshot.version}
    return HTTPStatus.OK, JSON, _dumps(payload)


def _config_dump(mesh: Mesh, query: Query) -> Answer:
    return HTTPStatus.OK, JSON, _dumps(mesh.config_dump())


def _stats(mesh: Mesh, query: Query) -> Answer:
    return HTTPStatus.OK, JSON, _dumps(mesh.stats())


def _graph(mesh: Mesh, query: Query) -> Answer:
    fmt = query.get("format", ["json"])[-1]
    if fmt == "dot":
        return HTTPStatus.OK, DOT, str(mesh.graph("dot")).encode("utf-8")
    if fmt == "svg":
        return HTTPStatus.OK, "image/svg+xml", str(mesh.graph("svg")).encode("utf-8")
    if fmt != "json":
        error = {"error": f"graph format {fmt!r}: use 'json', 'dot' or 'svg'"}
        return HTTPStatus.BAD_REQUEST, JSON, _dumps(error)
    return HTTPStatus.OK, JSON, _dumps(mesh.graph())


def _metrics(mesh: Mesh, query: Query) -> Answer:
    return HTTPStatus.OK, prometheus.CONTENT_TYPE, prometheus.render(mesh).encode("utf-8")


def _tap_options(query: Query) -> dict[str, Any]:
    """The keyword arguments of `Mesh.tap` from ``/tap``'s query (the last value of a
    repeated parameter wins); ValueError naming the parameter when one is wrong."""
    unknown = sorted(set(query) - set(_TAP_PARAMETERS))
    if unknown:
        raise ValueError(f"tap: unknown parameter {unknown[0]!r}: use {', '.join(_TAP_PARAMETERS)}")
    options: dict[str, Any] = {}
    for name in ("service", "route", "status", "path_prefix", "direction"):
        if name in query:
            options[name] = query[name][-1]
    for name, kind, what in (
        ("sample", float, "a number in [0, 1]"),
        ("limit", int, "an integer >= 1"),
    ):
        if name in query:
            text = query[name][-1]
            try:
                options[name] = kind(text)
            except ValueError:
                raise ValueError(f"tap: {name} must be {what}, got {text!r}") from None
    return options


_ENDPOINTS: dict[str, Callable[[Mesh, Query], Answer]] = {
    "/healthz": _healthz,
    "/config_dump": _config_dump,
    "/stats": _stats,
    "/graph": _graph,
    "/metrics": _metrics,
}


def _dumps(payload: Any) -> bytes:
    """Compact JSON; values JSON cannot hold (NaN, infinities) become strings."""
    try:
        text = json.dumps(payload, separators=(",", ":"), default=str, allow_nan=False)
    except ValueError:
        text = json.dumps(_finite(payload), separators=(",", ":"), default=str)
    return text.encode("utf-8")


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value
