"""OpenTelemetry metrics of the calls through the mesh, written against the API only:
the application installs the SDK (a MeterProvider and its readers or exporters).

Instruments, on the meter ``meshlib``:

- ``http.client.request.duration`` (histogram, s): each call made with a mesh client,
  retries, hedges and backoff included (the latency the application sees);
- ``http.server.request.duration`` (histogram, s): each request served by
  ``mesh.asgi``, the mesh's own refusals included; the request counts are the
  histograms' counts;
- ``http.{client,server}.{request,response}.body.size`` (histograms, By): body sizes
  with the durations' labels (a request's declared Content-Length; the bytes of an
  answer as the client application read it or as ``mesh.asgi`` sent it);
- ``meshlib.requests.inflight`` (observable up-down counter): attempts on the wire
  per destination;
- ``meshlib.retries``, ``meshlib.hedges`` (counters): retries and hedged backups sent;
- ``meshlib.retry_budget.exhausted`` (observable counter): retries and backups the
  budgets refused;
- ``meshlib.breaker.transitions`` (counter, ``mesh.to_state``, and ``mesh.breaker``:
  ``endpoint`` for the per-endpoint breakers, ``cluster`` for the service's);
- ``meshlib.outlier.ejections`` (observable counter): ejections enforced;
- ``meshlib.rate_limited`` (counter, ``mesh.side``: ``client`` for a client-side
  RateLimitedError, ``server`` for a 429 of the inbound rate limit);
- ``meshlib.config.reloads``, ``meshlib.config.errors`` (counters): policies applied
  and rejected after the first.

Labels are bounded: ``mesh.source`` (the calling service), ``mesh.destination``,
``mesh.route``, ``mesh.subset``, ``mesh.status_class`` (``2xx`` ... ``5xx``, or
``error`` without a response); never a path or an endpoint address. The request
path looks up the recorders made once per label set (duration, request and response
body sizes) and calls them.

Recording. With the opentelemetry SDK's MeterProvider, the two duration histograms are
aggregated by the mesh (`meshlib.telemetry.histogram`) and handed to the provider's
readers when they collect (`meshlib.telemetry.sdk_metrics`): the SDK's own
``Histogram.record`` costs about 6 µs a call, the mesh's cell about 0.3 µs. With any
other provider, or an SDK configured to change these instruments (a View, another
histogram aggregation), a recorder is the API's ``record`` bound to the label set.

Off. While the API's global MeterProvider is the default proxy (no SDK), a no-op
provider, or hands out no-op meters, metrics are off: `METRICS` keeps that verdict
like `meshlib.telemetry.tracing.TRACING` does, and the request path reads
``METRICS.check_at`` and ``METRICS.on`` and nothing more. ``telemetry.metrics:
false`` in the policy turns these and the golden-metric windows off.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from time import perf_counter
from typing import TYPE_CHECKING, TypeVar

from opentelemetry import metrics
from opentelemetry.metrics import (
    CallbackOptions,
    Counter,
    Histogram,
    Meter,
    MeterProvider,
    NoOpCounter,
    NoOpHistogram,
    NoOpMeter,
    NoOpMeterProvider,
    Observation,
)

if TYPE_CHECKING:
    from meshlib.config.store import SnapshotStore
    from meshlib.resilience.breaker import Breaker, BreakerBoard
    from meshlib.snapshot import Snapshot
    from meshlib.telemetry.sdk_metrics import Bridge

log = logging.getLogger("meshlib.telemetry")

RECHECK_SECONDS = 1.0
SCHEMA_URL = "https://opentelemetry.io/schemas/1.26.0"

SOURCE = "mesh.source"
DESTINATION = "mesh.destination"
ROUTE = "mesh.route"
SUBSET = "mesh.subset"
STATUS_CLASS = "mesh.status_class"
TO_STATE = "mesh.to_state"
BREAKER = "mesh.breaker"
SIDE = "mesh.side"

# explicit buckets for durations in seconds, as the HTTP semantic conventions advise
DURATION_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
)
SIZE_BUCKETS = (
    0.0,
    64.0,
    256.0,
    1024.0,
    4096.0,
    16384.0,
    65536.0,
    262144.0,
    1048576.0,
    4194304.0,
    16777216.0,
    67108864.0,
)
"""Bucket bounds for body sizes in bytes: powers of four from 64 B to 64 MiB (and 0)."""
_CACHE_LIMIT = 4096
"""Recorders kept per cache; a policy names finitely many label sets, so this only
guards against a caller that keeps changing it (the counts live on in the cells)."""

Extra = tuple[tuple[str, str], ...]
"""Labels asked for with ``telemetry.metric_labels``: (name, value) pairs."""
ClientKey = (
    tuple["str | None", str, str, "str | None", int]
    | tuple["str | None", str, str, "str | None", int, Extra]
)
"""(source, destination, route, subset, status // 100; 0 for no response), and the
labels asked for, if any."""
ServerKey = tuple[str, str, int] | tuple[str, str, int, Extra]
"""(service, route, status // 100; 0 for no response), and the labels asked for."""
ENDPOINT = "mesh.endpoint"
PATH = "url.path"
Attributes = dict[str, str]
Key = TypeVar("Key", ClientKey, ServerKey)
Made = TypeVar("Made")
Recorder = Callable[[float], None]
"""Records one value (a duration in seconds, a size in bytes) for the label set and
histogram it was made for."""
Recorders = tuple[Recorder, Recorder, Recorder]
"""The recorders of one label set: (duration, request body size, response body
size)."""


def status_class(hundreds: int) -> str:
    return f"{hundreds}xx" if hundreds > 0 else "error"


class Metrics:
    """Whether a real MeterProvider is installed, and the instruments made with it.

    The request path reads `check_at` and `on`, then calls the recorders of its label
    set from `client_recorders` or `server_recorders` (made by `client_recorder` or
    `server_recorder` on a miss); the rest runs on slow paths (retries, errors, breaker
    transitions, reloads) or in the observable callbacks when the SDK collects.
    `refresh` replaces both caches whenever the way of recording changes (a provider
    or the SDK bridge comes or goes), so a stale recorder is never looked up again.
    """

    def __init__(self, provider: Callable[[], MeterProvider] = metrics.get_meter_provider) -> None:
        self._provider = provider
        self._lock = threading.Lock()
        self._stores: weakref.WeakKeyDictionary[SnapshotStore, str] = weakref.WeakKeyDictionary()
        # per observable counter key: (ids of the counting objects, last value, carried)
        self._carried: dict[tuple[str, ...], tuple[tuple[int, ...], int, int]] = {}
        self._boards: weakref.WeakSet[BreakerBoard | Breaker] = weakref.WeakSet()
        self._meter: Meter | None = None
        self.on = False
        self.check_at = -math.inf
        self.client_duration: Histogram = NoOpHistogram("none")
        self.server_duration: Histogram = NoOpHistogram("none")
        self.client_request_size: Histogram = NoOpHistogram("none")
        self.client_response_size: Histogram = NoOpHistogram("none")
        self.server_request_size: Histogram = NoOpHistogram("none")
        self.server_response_size: Histogram = NoOpHistogram("none")
        self.client_recorders: dict[ClientKey, Recorders] = {}
        self.server_recorders: dict[ServerKey, Recorders] = {}
        self._bridge: Bridge | None = None
        # what the cached recorders were made for: (bridge, client and server histograms)
        self._recording: tuple[object, ...] = ()
        self._recording_lock = threading.Lock()
        self.retries: Counter = NoOpCounter("none")
        self.hedges: Counter = NoOpCounter("none")
        self.breaker_transitions: Counter = NoOpCounter("none")
        self.rate_limited: Counter = NoOpCounter("none")
        self.config_reloads: Counter = NoOpCounter("none")
        self.config_errors: Counter = NoOpCounter("none")

    def refresh(self, now: float | None = None) -> None:
        """Look up the provider again; instruments are made once per meter."""
        from meshlib import __version__  # at call time: meshlib imports this module

        meter = None
        provider = None
        try:
            provider = self._provider()
            if not isinstance(provider, NoOpMeterProvider) and type(provider).__name__ != (
                "_ProxyMeterProvider"
            ):
                found = provider.get_meter("meshlib", __version__, SCHEMA_URL)
                if not isinstance(found, NoOpMeter) and type(found).__name__ != "_ProxyMeter":
                    meter = found
            if meter is not None and meter is not self._meter:
                self._instruments(meter)
        except Exception:  # a broken provider means no metrics, never a failed request
            log.exception("metrics disabled: the meter provider failed")
            meter = None
        self._meter = meter
        self._choose_recording(provider if meter is not None else None)
        self.on = meter is not None
        self.check_at = (perf_counter() if now is None else now) + RECHECK_SECONDS

    def _choose_recording(self, provider: MeterProvider | None) -> None:
        """Record the durations in the mesh's cells if ``provider`` can take them from
        there (`meshlib.telemetry.sdk_metrics`), else through the API; start new
        recorder caches when that changes."""
        with self._recording_lock:
            bridge = self._bridge_for(provider) if provider is not None else None
            recording = (bridge, *self._histograms())
            if len(recording) != len(self._recording) or any(
                a is not b for a, b in zip(recording, self._recording, strict=True)
            ):
                self._bridge = bridge
                self._recording = recording
                self.client_recorders = {}
                self.server_recorders = {}

    def _histograms(self) -> tuple[Histogram, ...]:
        return (
            self.client_duration,
            self.server_duration,
            self.client_request_size,
            self.client_response_size,
            self.server_request_size,
            self.server_response_size,
        )

    def _bridge_for(self, provider: MeterProvider) -> Bridge | None:
        if "opentelemetry.sdk.metrics" not in sys.modules:
            return None  # the SDK was never imported: the provider cannot be its own
        try:
            from meshlib.telemetry import sdk_metrics  # the SDK is optional

            bridge = self._bridge
            if bridge is not None and bridge.provider is provider:
                return bridge if bridge.sync() else None
            bounds = (DURATION_BUCKETS, DURATION_BUCKETS, *[SIZE_BUCKETS] * 4)
            return sdk_metrics.bridge(provider, list(zip(self._histograms(), bounds, strict=True)))
        except Exception:  # record through the API rather than not at all
            log.exception("meshlib: the SDK bridge for the duration histograms failed")
            return None

    def _instruments(self, meter: Meter) -> None:
        self.client_duration = meter.create_histogram(
            "http.client.request.duration",
            "s",
            "Duration of calls made with mesh clients, retries and hedges included.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.server_duration = meter.create_histogram(
            "http.server.request.duration",
            "s",
            "Duration of requests served through mesh.asgi.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        client, server = "calls made with mesh clients", "requests served through mesh.asgi"
        self.client_request_size = _size_histogram(meter, "client", "request", client)
        self.client_response_size = _size_histogram(meter, "client", "response", client)
        self.server_request_size = _size_histogram(meter, "server", "request", server)
        self.server_response_size = _size_histogram(meter, "server", "response", server)
        self.retries = meter.create_counter(
            "meshlib.retries", "{retry}", "Retries sent by the attempt loop."
        )
        self.hedges = meter.create_counter(
            "meshlib.hedges", "{hedge}", "Hedged backup attempts sent."
        )
        self.breaker_transitions = meter.create_counter(
            "meshlib.breaker.transitions", "{transition}", "Circuit breaker state changes."
        )
        self.rate_limited = meter.create_counter(
            "meshlib.rate_limited", "{request}", "Requests refused by a rate limit."
        )
        self.config_reloads = meter.create_counter(
            "meshlib.config.reloads", "{reload}", "Policies applied after the first."
        )
        self.config_errors = meter.create_counter(
            "meshlib.config.errors", "{error}", "Policy edits rejected."
        )
        meter.create_observable_up_down_counter(
            "meshlib.requests.inflight",
            [self._observe_inflight],
            "{request}",
            "Attempts on the wire, per destination.",
        )
        meter.create_observable_counter(
            "meshlib.retry_budget.exhausted",
            [self._observe_budgets],
            "{retry}",
            "Retries and backups refused by the retry and hedging budgets.",
        )
        meter.create_observable_counter(
            "meshlib.outlier.ejections",
            [self._observe_ejections],
            "{ejection}",
            "Endpoints ejected by outlier detection.",
        )

    # -- recorders (slow path: once per label set) ------------------------------------

    def client_recorder(self, key: ClientKey) -> Recorders:
        """The recorders of ``key``'s label set, now in `client_recorders`."""
        attributes = self._client_attributes(key)
        histograms = (self.client_duration, self.client_request_size, self.client_response_size)
        return self._recorders(self.client_recorders, key, attributes, histograms)

    def server_recorder(self, key: ServerKey) -> Recorders:
        """The recorders of ``key``'s label set, now in `server_recorders`."""
        attributes = self._server_attributes(key)
        histograms = (self.server_duration, self.server_request_size, self.server_response_size)
        return self._recorders(self.server_recorders, key, attributes, histograms)

    @staticmethod
    def _client_attributes(key: ClientKey) -> Attributes:
        source, destination, route, subset, hundreds = key[:5]
        attributes = {
            SOURCE: source or "",
            DESTINATION: destination,
            ROUTE: route,
            SUBSET: subset or "",
            STATUS_CLASS: status_class(hundreds),
        }
        if len(key) == 6:
            attributes.update(key[5])
        return attributes

    @staticmethod
    def _server_attributes(key: ServerKey) -> Attributes:
        service, route, hundreds = key[:3]
        attributes = {DESTINATION: service, ROUTE: route, STATUS_CLASS: status_class(hundreds)}
        if len(key) == 4:
            attributes.update(key[3])
        return attributes

    def _recorders(
        self,
        cache: dict[Key, Recorders],
        key: Key,
        attributes: Attributes,
        histograms: tuple[Histogram, Histogram, Histogram],
    ) -> Recorders:
        with self._recording_lock:  # not made for a mode that `refresh` just replaced
            duration, request, response = (self._made(h, attributes) for h in histograms)
            recorders = (duration, request, response)
            _remember(cache, key, recorders)
        return recorders

    def _made(self, histogram: Histogram, attributes: Attributes) -> Recorder:
        """A recorder for ``histogram`` and ``attributes``: the mesh's cell while the
        bridge is on, the API's ``record`` otherwise (call with the recording lock)."""
        bridge = self._bridge
        if bridge is not None:
            name: str = getattr(histogram, "name", "")  # SDK instruments have one
            return bridge.families[name].cell(attributes).record
        return partial(histogram.record, attributes=attributes)

    # -- slow paths -------------------------------------------------------------------

    def _safely(self, counter: Counter, attributes: Attributes, amount: int = 1) -> None:
        if self.check_at <= perf_counter():
            self.refresh()
        if not self.on:
            return
        try:
            counter.add(amount, attributes)
        except Exception:  # metrics must never break a call
            log.exception("recording a metric failed")

    def resent(
        self,
        source: str | None,
        destination: str,
        route: str,
        subset: str | None,
        retries: int,
        hedges: int,
    ) -> None:
        """The retries and backups one call sent (reported once, when it ends)."""
        attributes = {
            SOURCE: source or "",
            DESTINATION: destination,
            ROUTE: route,
            SUBSET: subset or "",
        }
        if retries:
            self._safely(self.retries, attributes, retries)
        if hedges:
            self._safely(self.hedges, attributes, hedges)

    def client_rate_limited(self, source: str | None, destination: str, route: str) -> None:
        self._safely(
            self.rate_limited,
            {SOURCE: source or "", DESTINATION: destination, ROUTE: route, SIDE: "client"},
        )

    def server_rate_limited(self, service: str, route: str) -> None:
        self._safely(self.rate_limited, {DESTINATION: service, ROUTE: route, SIDE: "server"})

    def config_reload(self, store: SnapshotStore) -> None:
        self._safely(self.config_reloads, {SOURCE: self._stores.get(store, "")})

    def config_error(self, store: SnapshotStore) -> None:
        self._safely(self.config_errors, {SOURCE: self._stores.get(store, "")})

    # -- what the observable instruments read ------------------------------------------

    def watch(self, store: SnapshotStore, source: str | None) -> None:
        """Report the endpoints, budgets and detectors of ``store``'s snapshots (a
        client was made with it), and count its breakers' transitions."""
        with self._lock:
            self._stores[store] = source or ""
        self.follow(store.current)

    def follow(self, snapshot: Snapshot) -> None:
        """Subscribe to the breakers of ``snapshot`` (each board once)."""
        for cluster in snapshot.clusters.values():
            guard = cluster.guard
            if guard is None:
                continue
            destination = cluster.service
            for scope, board in (("endpoint", guard.breakers), ("cluster", guard.cluster_breaker)):
                if board is None or board in self._boards:
                    continue
                with self._lock:
                    if board in self._boards:
                        continue
                    self._boards.add(board)
                board.on_change(self._transition_callback(destination, scope))

    def _transition_callback(self, destination: str, scope: str) -> Callable[[str, str, str], None]:
        def changed(_name: str, _old: str, new: str) -> None:
            attributes = {DESTINATION: destination, BREAKER: scope, TO_STATE: new}
            self._safely(self.breaker_transitions, attributes)

        return changed

    def _snapshots(self) -> list[tuple[str, Snapshot]]:
        with self._lock:
            return [(source, store.current) for store, source in list(self._stores.items())]

    def _observe_inflight(self, _options: CallbackOptions) -> Iterable[Observation]:
        out = []
        for source, snapshot in self._snapshots():
            counted: dict[str, dict[int, int]] = {}
            for cluster in snapshot.clusters.values():
                seen = counted.setdefault(cluster.service, {})
                for endpoint in cluster.endpoints:
                    seen[id(endpoint)] = endpoint.load.inflight
            for destination, loads in counted.items():
                attributes = {SOURCE: source, DESTINATION: destination}
                out.append(Observation(sum(loads.values()), attributes))
        return out

    def _observe_budgets(self, _options: CallbackOptions) -> Iterable[Observation]:
        out = []
        for source, snapshot in self._snapshots():
            for name, service in snapshot.services.items():
                for route in service.routes:
                    policy = route.action.policy
                    if policy is None:
                        continue
                    budgets = [
                        b for b in (policy.budget, policy.hedge and policy.hedge.budget) if b
                    ]
                    if budgets:
                        exhausted = sum(budget.exhausted for budget in budgets)
                        key = ("budget", source, name, route.name)
                        total = self._cumulative(key, budgets, exhausted)
                        attributes = {SOURCE: source, DESTINATION: name, ROUTE: route.name}
                        out.append(Observation(total, attributes))
        return out

    def _observe_ejections(self, _options: CallbackOptions) -> Iterable[Observation]:
        out = []
        for source, snapshot in self._snapshots():
            detectors = {}
            for cluster in snapshot.clusters.values():
                guard = cluster.guard
                if guard is not None and guard.outlier is not None:
                    detectors[cluster.service] = guard.outlier
            for destination, detector in detectors.items():
                enforced = sum(
                    count for kind, count in detector.stats.items() if kind.startswith("enforced_")
                )
                total = self._cumulative(("ejections", source, destination), [detector], enforced)
                attributes = {SOURCE: source, DESTINATION: destination}
                out.append(Observation(total, attributes))
        return out

    def _cumulative(self, key: tuple[str, ...], owners: Sequence[object], value: int) -> int:
        """Keep an observable counter from going down when a policy change replaces the
        objects that count (a new budget or detector starts from zero): the last value
        of the replaced ones is carried over."""
        identity = tuple(id(owner) for owner in owners)
        with self._lock:
            owners_before, last, carried = self._carried.get(key, (identity, 0, 0))
            if owners_before != identity:
                carried += last
            self._carried[key] = (identity, value, carried)
        return carried + value


def _size_histogram(meter: Meter, side: str, part: str, of: str) -> Histogram:
    return meter.create_histogram(
        f"http.{side}.{part}.body.size",
        "By",
        f"Body size of the {part}s of {of}, when known.",
        explicit_bucket_boundaries_advisory=SIZE_BUCKETS,
    )


def _remember(cache: dict[Key, Made], key: Key, recorder: Made) -> None:
    if len(cache) >= _CACHE_LIMIT:
        cache.clear()
    cache[key] = recorder


METRICS = Metrics()
"""The process's metrics state, shared by every mesh (the provider is global)."""
