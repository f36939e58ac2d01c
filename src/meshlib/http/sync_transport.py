"""The sync httpx transport: mesh names in, endpoint connections out."""

from __future__ import annotations

import logging
import random
import ssl
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import httpcore
import httpx

from meshlib.endpoint import Endpoint
from meshlib.http.counted import CountedBody
from meshlib.http.errors import httpcore_errors
from meshlib.http.plan import Plan, mirror_plan, plan_request
from meshlib.http.resilient import run_sync, send_once_sync
from meshlib.routing.decide import pick_endpoint
from meshlib.routing.request import RequestView
from meshlib.telemetry.client_call import ClientTelemetry
from meshlib.telemetry.observe import Observers
from meshlib.telemetry.stats import TrafficStats

if TYPE_CHECKING:
    from meshlib.config.store import SnapshotStore
    from meshlib.tls.provider import IdentityProvider

log = logging.getLogger("meshlib.http")
_HEDGE_THREADS = 32


class _EndpointStream(httpx.SyncByteStream, CountedBody):
    """Response body that releases the endpoint's in-flight slot when closed, and
    counts the bytes read."""

    def __init__(self, stream: Iterable[bytes], endpoint: Endpoint) -> None:
        self._stream = stream
        self._endpoint: Endpoint | None = endpoint

    def __iter__(self) -> Iterator[bytes]:
        with httpcore_errors():
            for chunk in self._stream:
                self._read(chunk)
                yield chunk

    def close(self) -> None:
        if self._endpoint is not None:
            self._endpoint.load.inflight -= 1
            self._endpoint = None
        close = getattr(self._stream, "close", None)
        if close is not None:
            close()
        self._closed()


class MeshTransport(httpx.BaseTransport):
    """Routes requests for mesh services; everything else goes to ``passthrough``.

    Connections are pooled per endpoint (host:port) by one httpcore pool.
    """

    def __init__(
        self,
        store: SnapshotStore,
        *,
        passthrough: httpx.BaseTransport | None = None,
        limits: httpx.Limits | None = None,
        rng: random.Random | None = None,
        caller: str | None = None,
        identity: IdentityProvider | None = None,
        stats: TrafficStats | None = None,
        observers: Observers | None = None,
    ) -> None:
        self._caller = caller.encode("latin-1") if caller else None
        self._caller_name = caller
        self._telemetry = ClientTelemetry(store, stats, observers, caller)
        limits = limits or httpx.Limits(max_connections=200, max_keepalive_connections=50)
        self._store = store
        self._rng = rng or random.Random()
        self._identity = identity
        backend = None
        placeholder = None
        if identity is not None:
            from meshlib.tls.httpcore_backend import MeshTlsBackend

            backend = MeshTlsBackend(identity, lambda: store.current.peer_identities)
            # the backend swaps in the workload's context; without a context of its own
            # httpcore would build (and load the system CAs into) one per connection
            placeholder = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self._pool = httpcore.ConnectionPool(
            ssl_context=placeholder,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=backend,
        )
        self._passthrough = passthrough or httpx.HTTPTransport()
        self._mirror = _SyncMirror(store.config.mirroring.max_concurrent)
        self._hedge_pool: ThreadPoolExecutor | None = None
        self.hedge_threads_busy = 0
        self._hedge_lock = threading.Lock()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        plan = plan_request(
            self._store.current, request, self._rng, self._caller, self._identity is not None
        )
        if plan is None:
            return self._passthrough.handle_request(request)
        decision = plan.decision
        if decision.mirror is not None:
            self._mirror.submit(self, plan, request)
        call = self._telemetry.begin(plan, request)
        trace = call[3]
        try:
            if plan.resilient:
                response = run_sync(self, request, plan, trace)
            elif trace is None:
                response = self._send(
                    request,
                    decision.endpoint,
                    plan.target,
                    plan.headers,
                    plan.timeout,
                    None,
                    plan.tls,
                )
            else:
                response = send_once_sync(self, request, plan, trace)
        except Exception as exc:
            self._telemetry.failed(call, decision, request, exc)
            raise
        except BaseException as exc:  # cancelled: the span still ends
            if trace is not None:
                trace.finish(None, exc)
            raise
        self._telemetry.succeeded(call, decision, request, response)
        return response

    def _send(
        self,
        request: httpx.Request,
        endpoint: Endpoint,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        timeout: float | None,
        content: bytes | None = None,
        tls: str | None = None,
    ) -> httpx.Response:
        """Send to one endpoint; ``timeout`` (seconds) replaces the client's timeouts;
        ``tls`` names the service whose identity a mutual-TLS connection must show."""
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=b"http" if tls is None else b"https",
                host=endpoint.host,
                port=endpoint.port,
                target=target,
            ),
            headers=headers,
            content=request.stream if content is None else content,
            extensions=request.extensions,
        )
        if timeout is not None:  # the attempt's limit replaces the client's four timeouts
            timeouts = _TIMEOUTS.get(timeout) or _timeouts(timeout)
            core_request.extensions = {**request.extensions, "timeout": timeouts}
        if tls is not None:  # the SNI name carries the service to the identity check
            core_request.extensions = {**core_request.extensions, "sni_hostname": tls}
        load = endpoint.load
        load.inflight += 1
        load.total += 1
        try:
            with httpcore_errors():
                response = self._pool.handle_request(core_request)
        except BaseException:
            load.inflight -= 1
            raise
        assert isinstance(response.stream, Iterable)
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_EndpointStream(response.stream, endpoint),
            extensions=response.extensions,
        )

    def send_mirror(self, plan: Plan, request: httpx.Request, body: bytes) -> None:
        """Send a copy to the mirror cluster and discard the answer."""
        cluster = plan.decision.mirror
        assert cluster is not None
        path, _, query = plan.decision.target.partition("?")
        view = RequestView(request.method, path, query, request.headers)
        endpoint = pick_endpoint(cluster, view, self._rng)
        copy = httpx.Request(request.method, request.url, content=body)
        limit = self._store.config.mirroring.timeout
        copy_plan = mirror_plan(plan, limit, self._mtls_service(cluster.service))
        response = self._send(
            copy,
            endpoint,
            copy_plan.target,
            copy_plan.headers,
            copy_plan.timeout,
            None,
            copy_plan.tls,
        )
        try:
            response.read()
        finally:
            response.close()

    def _mtls_service(self, service: str) -> str | None:
        if self._identity is None or service not in self._store.current.peer_identities:
            return None
        return service

    def hedge_executor(self) -> ThreadPoolExecutor | None:
        """Threads for hedged attempts: a sync send can only be raced from threads.

        None while every thread is taken: the call then goes without a backup
        rather than queue for a thread and add that wait to its latency.
        """
        if self.hedge_threads_busy >= _HEDGE_THREADS - 1:
            return None
        if self._hedge_pool is None:
            with self._hedge_lock:
                if self._hedge_pool is None:
                    self._hedge_pool = ThreadPoolExecutor(_HEDGE_THREADS, "meshlib-hedge")
        return self._hedge_pool

    def close(self) -> None:
        if self._hedge_pool is not None:
            self._hedge_pool.shutdown(wait=False, cancel_futures=True)
        self._mirror.close()
        self._pool.close()
        self._passthrough.close()


def _timeouts(seconds: float) -> dict[str, float]:
    """httpcore's four timeouts (connect, read, write, pool) all set to ``seconds``:
    a route or attempt timeout bounds every wait. Kept for reuse: a per-try timeout
    repeats its value on every request."""
    if len(_TIMEOUTS) >= 256:  # deadline-derived values rarely repeat: keep it small
        _TIMEOUTS.clear()
    timeouts = _TIMEOUTS[seconds] = dict.fromkeys(("connect", "read", "write", "pool"), seconds)
    return timeouts


_TIMEOUTS: dict[float, dict[str, float]] = {}


def mirror_body(request: httpx.Request, limit: int) -> bytes | None:
    """The request body if it is already in memory and small enough to copy."""
    try:
        body = request.content
    except httpx.RequestNotRead:
        return None  # streaming bodies are never mirrored: copying would stall the caller
    return body if len(body) <= limit else None


class _SyncMirror:
    """Fire-and-forget copies on a few worker threads; drops copies when saturated."""

    def __init__(self, max_concurrent: int) -> None:
        self._slots = threading.BoundedSemaphore(max_concurrent)
        self._max = max_concurrent
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self.sent = 0
        self.dropped = 0
        self.failed = 0

    def submit(self, transport: MeshTransport, plan: Plan, request: httpx.Request) -> None:
        body = mirror_body(request, transport._store.config.mirroring.max_body_bytes)
        if body is None or not self._slots.acquire(blocking=False):
            self.dropped += 1
            return
        if self._executor is None:
            with self._lock:
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(self._max, "meshlib-mirror")
        try:
            self._executor.submit(self._run, transport, plan, request, body)
        except RuntimeError:  # executor shut down: the client is closing
            self._slots.release()
            self.dropped += 1

    def _run(
        self, transport: MeshTransport, plan: Plan, request: httpx.Request, body: bytes
    ) -> None:
        try:
            transport.send_mirror(plan, request, body)
            self.sent += 1
        except Exception as exc:  # the caller never sees mirror failures
            self.failed += 1
            log.debug("mirror to %s failed: %s", plan.decision.mirror, exc)
        finally:
            self._slots.release()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
