"""The async httpx transport, sending through aiohttp.

httpx's default async transport costs ~2 ms of CPU per request on this class
of machine; aiohttp's connection pool costs a fraction of that. The transport
keeps httpx's API for the caller and uses aiohttp only on the wire.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import aiohttp
import httpx
from multidict import CIMultiDict
from yarl import URL

from meshlib.endpoint import Endpoint
from meshlib.http.aiohttp_errors import aiohttp_errors
from meshlib.http.counted import CountedBody
from meshlib.http.plan import Plan, mirror_plan, plan_request
from meshlib.http.resilient import run_async, send_once_async
from meshlib.http.sync_transport import mirror_body
from meshlib.routing.decide import pick_endpoint
from meshlib.routing.request import RequestView
from meshlib.telemetry.client_call import ClientTelemetry
from meshlib.telemetry.observe import Observers
from meshlib.telemetry.stats import TrafficStats
from meshlib.tls.aiohttp_connector import MeshTlsConnector

if TYPE_CHECKING:
    from meshlib.config.store import SnapshotStore
    from meshlib.tls.provider import IdentityProvider

log = logging.getLogger("meshlib.http")


class _AiohttpBody(httpx.AsyncByteStream, CountedBody):
    """Response body streamed from aiohttp; releases the connection and the
    endpoint's in-flight slot when closed, and counts the bytes read."""

    def __init__(self, response: aiohttp.ClientResponse, endpoint: Endpoint) -> None:
        self._response = response
        self._endpoint: Endpoint | None = endpoint

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with aiohttp_errors():
            async for chunk in self._response.content.iter_chunked(65536):
                self._read(chunk)
                yield chunk

    async def aclose(self) -> None:
        if self._endpoint is not None:
            self._endpoint.load.inflight -= 1
            self._endpoint = None
        self._response.release()
        self._closed()


class AsyncMeshTransport(httpx.AsyncBaseTransport):
    """Async twin of MeshTransport: same plan, aiohttp on the wire."""

    def __init__(
        self,
        store: SnapshotStore,
        *,
        passthrough: httpx.AsyncBaseTransport | None = None,
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
        self._identity = identity
        self._store = store
        self._rng = rng or random.Random()
        self._limits = limits or httpx.Limits(max_connections=200, max_keepalive_connections=50)
        self._passthrough = passthrough or httpx.AsyncHTTPTransport()
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._mirror_tasks: set[asyncio.Task[None]] = set()
        self.mirror_sent = 0
        self.mirror_dropped = 0
        self.mirror_failed = 0

    def _get_session(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is None or self._loop is not loop or self._session.closed:
            store = self._store
            connector = MeshTlsConnector(
                lambda: store.current.peer_identities,
                limit=self._limits.max_connections or 0,
                limit_per_host=0,
                keepalive_timeout=self._limits.keepalive_expiry or 5.0,
                use_dns_cache=False,
            )
            # httpx decodes content itself and adds its own default headers
            self._session = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
                cookie_jar=aiohttp.DummyCookieJar(),
                timeout=aiohttp.ClientTimeout(total=None),
            )
            self._loop = loop
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        plan = plan_request(
            self._store.current, request, self._rng, self._caller, self._identity is not None
        )
        if plan is None:
            return await self._passthrough.handle_async_request(request)
        decision = plan.decision
        if decision.mirror is not None:
            self._start_mirror(plan, request)
        call = self._telemetry.begin(plan, request)
        trace = call[3]
        try:
            if plan.resilient:
                response = await run_async(self, request, plan, trace)
            elif trace is None:
                response = await self._send(
                    request,
                    decision.endpoint,
                    plan.target,
                    plan.headers,
                    plan.timeout,
                    None,
                    plan.tls,
                )
            else:
                response = await send_once_async(self, request, plan, trace)
        except Exception as exc:
            self._telemetry.failed(call, decision, request, exc)
            raise
        except BaseException as exc:  # cancelled: the span still ends
            if trace is not None:
                trace.finish(None, exc)
            raise
        self._telemetry.succeeded(call, decision, request, response)
        return response

    async def _send(
        self,
        request: httpx.Request,
        endpoint: Endpoint,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        timeout: float | None,
        body: Any = None,
        tls: str | None = None,
    ) -> httpx.Response:
        """Send to one endpoint; ``timeout`` (seconds) replaces the client's timeouts;
        ``tls`` names the service whose identity a mutual-TLS connection must show."""
        if body is None:
            body = _body_of(request)
        session = self._get_session()
        path, _, query = target.decode("ascii").partition("?")
        tls_args: dict[str, Any] = {}
        if tls is not None and self._identity is not None:
            # a new context object after a rotation: aiohttp pools by it, so only new
            # connections use the new certificate
            tls_args = {"ssl": self._identity.client_context(), "server_hostname": tls}
        url = URL.build(
            scheme="http" if not tls_args else "https",
            host=endpoint.host,
            port=endpoint.port,
            path=path,
            query_string=query,
            encoded=True,
        )
        wire_headers = CIMultiDict((n.decode("latin-1"), v.decode("latin-1")) for n, v in headers)
        # aiohttp frames the body itself (chunked when its size is unknown) and
        # refuses a body it must chunk when httpx's Transfer-Encoding is present
        wire_headers.popall("Transfer-Encoding", None)
        load = endpoint.load
        load.inflight += 1
        load.total += 1
        try:
            with aiohttp_errors():
                response = await session.request(
                    request.method,
                    url,
                    headers=wire_headers,
                    data=body,
                    allow_redirects=False,
                    timeout=_client_timeout(request, timeout),
                    compress=None,
                    **tls_args,
                )
        except BaseException:
            load.inflight -= 1
            raise
        return httpx.Response(
            status_code=response.status,
            headers=list(response.raw_headers),
            stream=_AiohttpBody(response, endpoint),
            extensions={
                "http_version": b"HTTP/1.1",
                "reason_phrase": (response.reason or "").encode(),
            },
        )

    def _start_mirror(self, plan: Plan, request: httpx.Request) -> None:
        limits = self._store.config.mirroring
        body = mirror_body(request, limits.max_body_bytes)
        if body is None or len(self._mirror_tasks) >= limits.max_concurrent:
            self.mirror_dropped += 1
            return
        task = asyncio.get_running_loop().create_task(self._mirror(plan, request, body))
        self._mirror_tasks.add(task)
        task.add_done_callback(self._mirror_tasks.discard)

    async def _mirror(self, plan: Plan, request: httpx.Request, body: bytes) -> None:
        try:
            cluster = plan.decision.mirror
            assert cluster is not None
            path, _, query = plan.decision.target.partition("?")
            view = RequestView(request.method, path, query, request.headers)
            endpoint = pick_endpoint(cluster, view, self._rng)
            tls: str | None = cluster.service
            if self._identity is None or tls not in self._store.current.peer_identities:
                tls = None
            copy_plan = mirror_plan(plan, self._store.config.mirroring.timeout, tls)
            response = await self._send(
                request,
                endpoint,
                copy_plan.target,
                copy_plan.headers,
                copy_plan.timeout,
                body,
                copy_plan.tls,
            )
            try:
                await response.aread()
            finally:
                await response.aclose()
            self.mirror_sent += 1
        except Exception as exc:  # the caller never sees mirror failures
            self.mirror_failed += 1
            log.debug("mirror to %s failed: %s", plan.decision.mirror, exc)

    async def aclose(self) -> None:
        for task in list(self._mirror_tasks):
            task.cancel()
        session = self._session
        if session is not None and not session.closed and self._loop is asyncio.get_running_loop():
            await session.close()
        self._session = None
        await self._passthrough.aclose()


def _body_of(request: httpx.Request) -> Any:
    try:
        content = request.content
    except httpx.RequestNotRead:
        return request.stream  # an async iterable: aiohttp streams it with chunked encoding
    return content or None


def _client_timeout(request: httpx.Request, timeout: float | None) -> aiohttp.ClientTimeout:
    """aiohttp's timeouts for one send: ``timeout`` for connect and each read, or the
    httpx client's own. Immutable, so kept for reuse: the values repeat."""
    connect: float | None
    read: float | None
    if timeout is not None:
        connect = read = timeout
    else:
        spec = request.extensions.get("timeout") or {}
        connect, read = spec.get("connect"), spec.get("read")
    found = _CLIENT_TIMEOUTS.get((connect, read))
    if found is None:
        if len(_CLIENT_TIMEOUTS) >= 256:  # deadline-derived values rarely repeat
            _CLIENT_TIMEOUTS.clear()
        found = aiohttp.ClientTimeout(total=None, connect=connect, sock_read=read)
        _CLIENT_TIMEOUTS[connect, read] = found
    return found


_CLIENT_TIMEOUTS: dict[tuple[float | None, float | None], aiohttp.ClientTimeout] = {}
