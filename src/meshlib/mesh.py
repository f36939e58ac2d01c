"""The Mesh: the one object an application holds."""

from __future__ import annotations

import copy
import logging
import random
import signal
import ssl
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, ParamSpec, TypedDict, TypeVar

import httpx

from meshlib.config.load import load_policy_file, parse_policy, policy_from_mapping
from meshlib.config.model import MeshConfig
from meshlib.config.store import SnapshotStore
from meshlib.discovery.base import Registry
from meshlib.errors import ConfigError, MeshError
from meshlib.explain import explain_request
from meshlib.filewatch import FileWatcher
from meshlib.http.asgi import ASGIApp, MeshASGIMiddleware
from meshlib.http.sync_transport import MeshTransport
from meshlib.resilience.decorator import resilient
from meshlib.snapshot import Snapshot
from meshlib.telemetry.observe import Observers
from meshlib.telemetry.stats import TrafficStats, to_dot
from meshlib.telemetry.svg import to_svg
from meshlib.telemetry.tap import Tap, TapFilter, TapSubscription

if TYPE_CHECKING:
    # imported when first used: aiohttp costs ~11 MiB that sync-only users don't need
    from meshlib.http.async_transport import AsyncMeshTransport
    from meshlib.telemetry.admin import AdminServer
    from meshlib.tls.provider import IdentityProvider
    from meshlib.tls.server import RunningServer

log = logging.getLogger("meshlib")
P = ParamSpec("P")
R = TypeVar("R")

# httpx.Client arguments that configure its transport rather than the client
_TRANSPORT_SETTINGS = ("verify", "cert", "http1", "http2", "limits")


@contextmanager
def _sigterm_exits() -> Iterator[None]:
    """While serving, SIGTERM raises SystemExit (after uvicorn's graceful shutdown,
    which re-raises the signal) instead of killing the process, so that cleanup runs:
    the identity's private files are removed and the mesh closes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is not signal.SIG_DFL:
        yield
        return

    def exit_on_sigterm(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, exit_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _TransportParts(TypedDict):
    rng: random.Random
    caller: str | None
    identity: IdentityProvider | None
    stats: TrafficStats
    observers: Observers


class Mesh:
    """Policy, discovery and the clients that obey them.

    ``Mesh(config)`` takes a MeshConfig or a plain mapping; ``Mesh.from_file``
    loads a policy file and keeps it hot-reloaded.
    """

    def __init__(
        self,
        config: MeshConfig | Mapping[str, Any] | None = None,
        *,
        service: str | None = None,
        source: str = "<dict>",
        rng: random.Random | None = None,
        registries: Mapping[str, Registry] | None = None,
        identity: IdentityProvider | None = None,
    ) -> None:
        validated = policy_from_mapping(config if config is not None else {}, source)
        self.service = service
        self._rng = rng or random.Random()
        self._owns_identity = identity is None
        base_dir = Path(source).parent if Path(source).is_file() else Path.cwd()
        if identity is None and validated.identity is not None:
            from meshlib.tls.setup import identity_from_policy  # cryptography only when used

            identity = identity_from_policy(validated, service, base_dir)
        self.identity = identity
        """This process's workload identity (certificates, rotation), or None."""
        self._store = SnapshotStore(validated, source, registries, self._rng)
        self._traffic = TrafficStats()
        store = self._store
        self._tap = Tap()
        self._admins: list[AdminServer] = []
        self._observers = Observers(self._tap, lambda: store.config.telemetry)
        self._watcher: FileWatcher | None = None
        self._closed = False

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        *,
        service: str | None = None,
        watch: bool = True,
        poll_interval: float = 0.5,
        rng: random.Random | None = None,
        registries: Mapping[str, Registry] | None = None,
    ) -> Mesh:
        """Load a policy file; with ``watch`` a changed file is validated and swapped in.

        ``registries`` adds discovery backends that services name with
        ``discovery: {registry: NAME}``; ``static`` and ``file`` are built in.
        """
        file = str(path)
        mesh = cls(
            load_policy_file(file), service=service, source=file, rng=rng, registries=registries
        )
        watcher = FileWatcher(file, mesh._reload_text, interval=poll_interval, name="policy")
        watcher.prime(Path(file).read_text(encoding="utf-8"))
        mesh._watcher = watcher.start() if watch else watcher
        return mesh

    # -- policy ---------------------------------------------------------------

    @property
    def snapshot(self) -> Snapshot:
        """The snapshot in force now (immutable)."""
        return self._store.current

    @property
    def last_error(self) -> ConfigError | None:
        """The error of the last rejected policy edit, if it is still unresolved."""
        return self._store.last_error

    def update(self, config: MeshConfig | Mapping[str, Any], source: str = "<dict>") -> Snapshot:
        """Validate and apply a new policy; raises ConfigError and keeps the old one."""
        try:
            return self._store.apply(policy_from_mapping(config, source), source)
        except ConfigError as exc:
            self._store.reject(exc)
            raise

    def reload(self) -> bool:
        """Check the watched policy file now; True when a change was applied or rejected."""
        return self._watcher.check() if self._watcher is not None else False

    def _reload_text(self, text: str) -> None:
        file = self._store.source
        try:
            self._store.apply(parse_policy(text, file), file)
        except ConfigError as exc:
            self._store.reject(exc)

    # -- clients --------------------------------------------------------------

    def transport(
        self,
        passthrough: httpx.BaseTransport | None = None,
        *,
        limits: httpx.Limits | None = None,
    ) -> MeshTransport:
        """An httpx transport to mount into your own ``httpx.Client``.

        ``passthrough`` handles hosts that are not mesh services (default: a
        plain ``httpx.HTTPTransport``); ``limits`` bounds the endpoint pool.
        """
        return MeshTransport(
            self._store, passthrough=passthrough, limits=limits, **self._transport_parts()
        )

    def async_transport(
        self,
        passthrough: httpx.AsyncBaseTransport | None = None,
        *,
        limits: httpx.Limits | None = None,
    ) -> AsyncMeshTransport:
        """An httpx async transport to mount into your own ``httpx.AsyncClient``."""
        from meshlib.http.async_transport import AsyncMeshTransport

        return AsyncMeshTransport(
            self._store, passthrough=passthrough, limits=limits, **self._transport_parts()
        )

    def _transport_parts(self) -> _TransportParts:
        """What every transport of this mesh shares: its random source, its service
        name and identity, and where its telemetry goes."""
        return {
            "rng": self._rng,
            "caller": self.service,
            "identity": self.identity,
            "stats": self._traffic,
            "observers": self._observers,
        }

    def http_client(self, **kwargs: Any) -> httpx.Client:
        """An ``httpx.Client`` that resolves mesh names; other hosts pass through.

        Transport settings (``verify``, ``cert``, ``http1``, ``http2``,
        ``limits``) apply to the pass-through transport, and ``limits`` to the
        mesh's endpoint pool too. Proxy settings from the environment are not
        applied (``trust_env`` is False unless you pass it): a proxy mount
        would bypass the mesh.
        """
        kwargs.setdefault("trust_env", False)
        settings = {key: kwargs.pop(key) for key in _TRANSPORT_SETTINGS if key in kwargs}
        passthrough = httpx.HTTPTransport(**settings)
        transport = self.transport(passthrough, limits=settings.get("limits"))
        return httpx.Client(transport=transport, **kwargs)

    def async_http_client(self, **kwargs: Any) -> httpx.AsyncClient:
        """An ``httpx.AsyncClient`` that resolves mesh names (aiohttp on the wire)."""
        kwargs.setdefault("trust_env", False)
        settings = {key: kwargs.pop(key) for key in _TRANSPORT_SETTINGS if key in kwargs}
        passthrough = httpx.AsyncHTTPTransport(**settings)
        transport = self.async_transport(passthrough, limits=settings.get("limits"))
        return httpx.AsyncClient(transport=transport, **kwargs)

    def resilient(self, service: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
        """Decorator: ``service``'s timeout, retry, budget and breaker around any callable.

        Works on sync and async functions; the policy in force at each call
        applies. Async calls are cut off at their timeout; a sync call cannot be
        interrupted, so its deadline only stops further attempts.
        """
        return resilient(lambda: self._store.current, service, self._rng)

    # -- server side ----------------------------------------------------------

    def asgi(self, app: ASGIApp, service: str | None = None) -> MeshASGIMiddleware:
        """Wrap an ASGI app with the inbound policy of ``service`` (default: this mesh's).

        Enforces propagated deadlines (504), rate limits per route and per caller
        (429 with Retry-After) and server-side faults; follows policy reloads.
        """
        name = service or self.service
        if name is None:
            raise MeshError("mesh.asgi() needs service=...: which service's inbound policy")
        return MeshASGIMiddleware(
            app, self._store, name, rng=self._rng, stats=self._traffic, observers=self._observers
        )

    def serve(
        self,
        app: ASGIApp,
        service: str | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        mode: str | None = None,
        log_level: str = "warning",
        background: bool = False,
    ) -> RunningServer | None:
        """Serve ``app`` as ``service`` under uvicorn, behind ``mesh.asgi``, with mesh TLS.

        ``mode`` (default: the service's ``inbound.mtls``, else ``permissive`` when
        the mesh has an identity and ``disabled`` when it has none): ``strict``
        requires a client certificate, ``permissive`` also accepts plaintext on the
        same port, ``disabled`` serves plaintext. The app sees the verified peer in
        ``scope["extensions"]["tls"]`` and ``scope["extensions"]["mesh"]["peer"]``.
        Each new connection uses the newest workload certificate. Blocks until
        stopped, or with ``background=True`` returns the running server (``.port``,
        ``.stop()``).
        """
        from meshlib.tls.server import MeshServer

        name = service or self.service
        if name is None:
            raise MeshError("mesh.serve() needs service=...: which service this app is")
        if mode is None:
            security = self.snapshot.inbound_security.get(name)
            mode = security.mtls if security is not None and security.mtls else None
        if mode is None:
            mode = "permissive" if self.identity is not None else "disabled"
        identity = self.identity
        context = None
        if mode != "disabled":
            if identity is None:
                raise MeshError(
                    f"mesh.serve(mode={mode!r}) needs a workload identity: add an `identity` "
                    "block to the policy or pass Mesh(..., identity=...)"
                )
            strict = mode == "strict"

            def context() -> ssl.SSLContext:
                return identity.server_context(require_client_cert=strict)

        server = MeshServer(
            self.asgi(app, name),
            host=host,
            port=port,
            mode=mode,
            server_context=context,
            log_level=log_level,
        )
        if background:
            return server.start_in_thread()
        with _sigterm_exits():
            server.run()
        return None

    # -- introspection --------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Golden metrics over the last minute, in process: per destination service and
        route (``outbound``) and per served service and inbound rule (``inbound``), the
        request count, rate (``rps``), success rate (5xx and transport errors fail) and
        ``p50_ms``/``p95_ms``/``p99_ms``, with a ``total`` per service."""
        return {"service": self.service, **self._traffic.snapshot()}

    def tap(
        self,
        service: str | None = None,
        *,
        route: str | None = None,
        status: int | str | None = None,
        path_prefix: str | None = None,
        direction: str | None = None,
        sample: float = 1.0,
        limit: int | None = None,
        max_queued: int = 1000,
        capture_bodies: int = 0,
    ) -> TapSubscription:
        """A live stream of the requests this process makes and serves that match the
        filter (``service``: the destination or served service; ``status``: a code,
        ``"5xx"``-style class or ``"error"``; ``sample``: the share kept).

        Iterate it (``for event in tap`` or ``async for``) and close it (it is a
        context manager); while no tap is open, requests build no events. Headers
        such as authorization and cookies are redacted; bodies appear only with
        ``capture_bodies`` (a byte cap; a client event then waits until the
        application closes the response). A slow reader loses events (counted in
        ``dropped``) instead of slowing requests down.
        """
        filter = TapFilter(
            service=service,
            route=route,
            status=status,
            path_prefix=path_prefix,
            direction=direction,
            sample=sample,
        )
        return self._tap.subscribe(
            filter, limit=limit, max_queued=max_queued, capture_bodies=capture_bodies
        )

    def start_admin(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        token: str | None = None,
        allow_remote: bool = False,
    ) -> AdminServer:
        """Start the admin endpoint (``/healthz``, ``/config_dump``, ``/stats``,
        ``/metrics``, ``/tap``, ``/graph``) on a daemon thread; it stops with the mesh.

        Loopback only unless ``allow_remote``; with ``token`` every request must
        send ``Authorization: Bearer <token>``. ``meshlib top --admin URL`` reads it.
        """
        from meshlib.telemetry.admin import AdminServer

        admin = AdminServer(self, host=host, port=port, token=token, allow_remote=allow_remote)
        self._admins.append(admin.start())
        return admin

    def graph(self, format: str = "json") -> dict[str, Any] | str:
        """The service graph this process observed: edges from this service to each
        destination with rate, success rate and latency; ``format="dot"`` for Graphviz,
        ``"svg"`` for a picture."""
        graph = self._traffic.graph(self.service)
        if format == "dot":
            return to_dot(graph)
        if format == "svg":
            return to_svg(graph)
        if format != "json":
            raise MeshError(f"graph format {format!r}: use 'json', 'dot' or 'svg'")
        return graph

    def explain(
        self, method: str, url: str, headers: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        """Why this request would go where it goes (route, cluster, endpoint, policies).

        Uses its own random source, so explaining never shifts the draws of a
        seeded mesh's real traffic.
        """
        return explain_request(self.snapshot, method, url, headers, random.Random())

    def config_dump(self) -> dict[str, Any]:
        """Everything in force, with version, source and the last error."""
        snapshot = self.snapshot
        error = self._store.last_error
        return {
            "version": snapshot.version,
            "source": snapshot.source,
            "created_at": snapshot.created_at,
            "service": self.service,
            "identity": self.identity.describe() if self.identity is not None else None,
            "policy": copy.deepcopy(dict(snapshot.policy)),
            "not_enforced": list(snapshot.not_enforced),
            "clusters": {
                name: {
                    "service": cluster.service,
                    "subset": cluster.subset,
                    "load_balancer": cluster.lb_policy,
                    "endpoints": [ep.describe() for ep in cluster.endpoints],
                    "protection": cluster.guard.describe() if cluster.guard else None,
                }
                for name, cluster in snapshot.clusters.items()
            },
            "routes": {
                name: [
                    {
                        "name": route.name,
                        "match": route.matcher.describe(),
                        "resilience": route.action.policy.describe()
                        if route.action.policy
                        else None,
                        "to": {
                            c.name: w
                            for c, w in zip(
                                route.action.split.clusters, route.action.split.weights, strict=True
                            )
                        },
                    }
                    for route in service.routes
                ]
                for name, service in snapshot.services.items()
            },
            "discovery": dict(snapshot.discovery),
            "registries": {
                key: {
                    "ok": health.ok,
                    "stale": health.stale,
                    "last_error": health.last_error,
                    "last_update": health.last_update,
                }
                for key, registry in self._store.registries().items()
                for health in [registry.health()]
            },
            "last_error": None
            if error is None
            else {
                "message": str(error),
                "issues": [issue.to_dict() for issue in error.issues],
                "at": self._store.last_error_at,
            },
        }

    # -- lifecycle ------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._watcher is not None:
            self._watcher.stop()
        for admin in self._admins:
            admin.stop()
        self._store.close()
        self._tap.close()
        if self.identity is not None and self._owns_identity:
            self.identity.close()

    def __enter__(self) -> Mesh:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    async def __aenter__(self) -> Mesh:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
