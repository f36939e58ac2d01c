"""The mesh's request histograms (durations and body sizes, client and server),
aggregated by the mesh and handed to an OpenTelemetry SDK MeterProvider's readers
when they collect.

Why: the SDK's ``Histogram.record`` cleans, sorts and hashes the attributes of every
measurement (about 6 µs with five attributes), over the mesh's whole per-request
budget. The mesh knows its label sets in advance, so it counts each one into a
`HistogramCell` (about 0.3 µs) and this module turns the cells into the data points the
SDK would have made, inside the `MetricsData` each reader collects: scope ``meshlib``,
the provider's Resource, each reader's temporality. These histograms carry no exemplars.

How: the SDK wires each reader with ``reader._set_collect_callback(consumer.collect)``,
and ``MetricReader.collect()`` calls ``reader._collect(reader, timeout_millis=...)``;
the bridge replaces each reader's ``_collect`` by a `_Collect` that returns the SDK's
result plus the mesh's metrics. Private SDK attributes are read here only, each behind
a check. When anything is not as expected, or the application configured something
that changes these instruments (a View matching them, a reader's histogram aggregation
other than the default or explicit buckets with the mesh's bounds, a cardinality limit
other than the default), the bridge declines for good for that provider, and the mesh
records through the API per request. Nothing here raises into the request path or out
of a reader's collection.
"""

from __future__ import annotations

import logging
import math
import threading
import weakref
from collections.abc import Callable, Hashable, Mapping, Sequence
from time import time_ns
from typing import Any

from opentelemetry.sdk.metrics import Histogram as SdkHistogram
from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricsData,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.sdk.metrics.view import (
    DefaultAggregation,
    DropAggregation,
    ExplicitBucketHistogramAggregation,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from meshlib.telemetry.histogram import HistogramCell, Snapshot

log = logging.getLogger("meshlib.telemetry")

CARDINALITY_LIMIT = 2000
"""Label sets per instrument before further ones share the overflow point: the SDK's
default limit (a reader configured with another one makes the bridge decline)."""
OVERFLOW: Mapping[str, str | bool] = {"otel.metric.overflow": True}

ExportedAttributes = Mapping[str, str | bool]
_CellKey = tuple[tuple[str, str | bool], ...]

_DECLINED: weakref.WeakSet[SdkMeterProvider] = weakref.WeakSet()
"""Providers the bridge declined: never wired again, since their own storage may hold
these instruments' data by now (both would be exported)."""


class Declined(Exception):
    """The provider is not set up as the bridge needs (the message says why)."""


def _private(owner: object, name: str) -> Any:
    """A private SDK attribute, or Declined if this SDK version has none."""
    try:
        return getattr(owner, name)
    except AttributeError:
        raise Declined(f"{type(owner).__name__} has no {name}") from None


class _Family:
    """One instrument's cells, one per attribute set, and the delta windows to keep."""

    def __init__(self, instrument: Any, bounds: tuple[float, ...]) -> None:
        self.instrument = instrument
        self.name: str = instrument.name
        self.unit: str = instrument.unit
        self.description: str = instrument.description
        self.bounds = bounds
        self._cells: dict[_CellKey, tuple[ExportedAttributes, HistogramCell]] = {}
        self._tokens: set[Hashable] = set()
        self._lock = threading.Lock()

    def cell(self, attributes: Mapping[str, str]) -> HistogramCell:
        """The cell of ``attributes`` (made on first use; past the cardinality limit,
        the overflow cell, as the SDK does)."""
        exported: ExportedAttributes = attributes
        key: _CellKey = tuple(sorted(exported.items()))
        with self._lock:
            found = self._cells.get(key)
            if found is None and len(self._cells) >= CARDINALITY_LIMIT:
                exported = OVERFLOW
                key = tuple(exported.items())
                found = self._cells.get(key)
            if found is None:
                cell = HistogramCell(self.bounds)
                for token in self._tokens:
                    cell.open_window(token)
                found = self._cells[key] = (dict(exported), cell)
        return found[1]

    def cells(self) -> list[tuple[ExportedAttributes, HistogramCell]]:
        with self._lock:
            return list(self._cells.values())

    def open_window(self, token: Hashable) -> None:
        with self._lock:
            self._tokens.add(token)
            for _, cell in self._cells.values():
                cell.open_window(token)

    def close_window(self, token: Hashable) -> None:
        with self._lock:
            self._tokens.discard(token)
            for _, cell in self._cells.values():
                cell.close_window(token)

    def enabled(self) -> bool:
        """False while the SDK's meter configurator disables the ``meshlib`` meter."""
        is_enabled = getattr(self.instrument, "_is_enabled", None)
        return bool(is_enabled()) if callable(is_enabled) else True


class _Reader:
    """What the bridge keeps about one reader it wired."""

    __slots__ = ("attached_ns", "drop", "last_ns", "min_max", "original", "temporality", "wrapper")

    def __init__(
        self, temporality: AggregationTemporality, drop: bool, min_max: bool, original: Any
    ) -> None:
        self.temporality = temporality
        self.drop = drop
        self.min_max = min_max
        self.original = original
        self.wrapper: _Collect | None = None
        self.attached_ns = time_ns()
        self.last_ns: int | None = None  # a delta reader's previous collection


class _Collect:
    """A wired reader's ``_collect``: the SDK's collection plus the mesh's histograms."""

    __slots__ = ("bridge", "original")

    def __init__(self, bridge: Bridge, original: Callable[..., Any]) -> None:
        self.bridge = bridge
        self.original = original

    def __call__(self, reader: Any, *args: Any, **kwargs: Any) -> Any:
        result = self.original(reader, *args, **kwargs)  # the SDK's own errors are its own
        return self.bridge.extend(reader, result)


class Bridge:
    """Wires one SDK MeterProvider's readers to export the mesh's histograms.

    The request path gets ``families[name].cell(attributes).record`` once per label
    set and then calls it; readers collect through `extend`; `sync` re-checks the
    wiring (cheaply when nothing changed) and answers False once the bridge declined.
    """

    def __init__(
        self, provider: SdkMeterProvider, histograms: Sequence[tuple[Any, tuple[float, ...]]]
    ) -> None:
        self.provider = provider
        self._config = _private(provider, "_sdk_config")
        self._consumer = _private(provider, "_measurement_consumer")
        first = histograms[0][0]
        self._histogram_class: type = type(first)
        self.families = {
            instrument.name: _Family(instrument, bounds) for instrument, bounds in histograms
        }
        """The mesh's histograms by instrument name."""
        self._families = tuple(self.families.values())
        self._scope: InstrumentationScope = first.instrumentation_scope
        self._readers: dict[Any, _Reader] = {}
        self._seen_storages: object = None
        self._seen_views: object = None
        self._lock = threading.Lock()  # wiring
        self._collecting = threading.Lock()  # delta state of the readers
        self.active = True

    # -- wiring (slow path: once a second at most) ---------------------------------------

    def sync(self) -> bool:
        """Check the wiring and repair it (readers added or removed, a wrapper
        overwritten); False if the bridge declined, now or before."""
        with self._lock:
            if not self.active:
                return False
            try:
                self._sync()
                return True
            except Declined as why:
                log.info("meshlib: histograms recorded through the SDK API: %s", why)
            except Exception:
                log.exception("meshlib: wiring the histograms to the SDK failed")
            self._decline()
            return False

    def _sync(self) -> None:
        storages = _private(self._consumer, "_reader_storages")
        views = _private(self._config, "views")
        if (
            storages is self._seen_storages
            and views is self._seen_views
            and all(_collect_of(r) is state.wrapper for r, state in self._readers.items())
        ):
            return
        if not isinstance(storages, Mapping) or not isinstance(views, Sequence):
            raise Declined("the SDK's readers or views are not where expected")
        self._check_views(views)
        readers = list(storages)
        wanted = {reader: self._settings(reader) for reader in readers}  # all checked first
        for reader in [r for r in self._readers if r not in wanted]:
            self._unwire(reader)
        for reader, settings in wanted.items():
            self._wire(reader, *settings)
        self._seen_storages = storages
        self._seen_views = views

    def _check_views(self, views: Sequence[Any]) -> None:
        for view in views:
            match = getattr(view, "_match", None)
            if not callable(match):
                raise Declined("a View the bridge cannot inspect")
            for family in self._families:
                if match(family.instrument):
                    raise Declined(f"a View applies to {family.name}")

    def _settings(self, reader: Any) -> tuple[AggregationTemporality, bool, bool]:
        """(temporality, drop, record min and max) of ``reader`` for histograms, or
        Declined if the reader would aggregate them differently from the mesh."""
        if not callable(_collect_of(reader)):
            raise Declined("a reader without a collect callback")
        kind = self._histogram_class
        temporality = _private(reader, "_instrument_class_temporality").get(kind)
        if temporality not in (AggregationTemporality.CUMULATIVE, AggregationTemporality.DELTA):
            raise Declined(f"a reader's histogram temporality is {temporality!r}")
        limits = getattr(reader, "_instrument_class_cardinality_limit", None)
        if limits is not None and limits.get(kind, CARDINALITY_LIMIT) != CARDINALITY_LIMIT:
            raise Declined("a reader's histogram cardinality limit is not the default")
        aggregation = _private(reader, "_instrument_class_aggregation").get(kind)
        if type(aggregation) is DropAggregation:
            return temporality, True, True
        if type(aggregation) is DefaultAggregation:
            return temporality, False, True
        if type(aggregation) is ExplicitBucketHistogramAggregation:
            boundaries = _private(aggregation, "_boundaries")
            min_max = _private(aggregation, "_record_min_max")
            # boundaries set on the reader apply to every histogram: each must match
            fits = boundaries is None or all(
                tuple(boundaries) == family.bounds for family in self._families
            )
            if fits and isinstance(min_max, bool):
                return temporality, False, min_max
        raise Declined(f"a reader aggregates histograms with {aggregation!r}")

    def _wire(
        self, reader: Any, temporality: AggregationTemporality, drop: bool, min_max: bool
    ) -> None:
        state = self._readers.get(reader)
        current = _collect_of(reader)
        if state is not None and current is state.wrapper:
            return
        if isinstance(current, _Collect) and current.bridge is self:
            original = current.original  # ours from an earlier wiring
        else:
            original = current  # new, or re-set by the SDK or someone else
        if state is None:
            state = self._readers[reader] = _Reader(temporality, drop, min_max, original)
            if temporality is AggregationTemporality.DELTA and not drop:
                for family in self._families:
                    family.open_window(state)
        state.original = original
        state.wrapper = _Collect(self, original)
        reader._collect = state.wrapper

    def _unwire(self, reader: Any) -> None:
        state = self._readers.pop(reader)
        for family in self._families:
            family.close_window(state)
        if _collect_of(reader) is state.wrapper:
            reader._collect = state.original

    def _decline(self) -> None:
        """Give the readers back their own collection, for good (see `_DECLINED`)."""
        self.active = False
        _DECLINED.add(self.provider)
        for reader in list(self._readers):
            try:
                self._unwire(reader)
            except Exception:  # the provider is unusable anyway: keep unwiring the rest
                log.exception("meshlib: unwiring a metric reader failed")

    # -- collection (each reader's collect) ---------------------------------------------

    def extend(self, reader: Any, result: MetricsData | None) -> MetricsData | None:
        """``result`` (the SDK's collection for ``reader``) plus the mesh's histograms;
        ``result`` itself if the bridge has nothing to add or fails."""
        try:
            state = self._readers.get(reader)
            if state is None or state.drop or not self.active:
                return result
            with self._collecting:
                metrics = self._metrics(state)
            if not metrics:
                return result
            return _merged(result, self._resource(), self._scope, metrics)
        except Exception:  # the SDK's own metrics must still get through
            log.exception("meshlib: adding the histograms to a collection failed")
            return result

    def _resource(self) -> Resource:
        resource = self._config.resource
        if not isinstance(resource, Resource):
            raise TypeError(f"the provider's resource is {resource!r}")
        return resource

    def _metrics(self, state: _Reader) -> list[Metric]:
        now = time_ns()
        metrics = []
        for family in self._families:
            points = [
                point
                for attributes, cell in family.cells()
                if (point := _point(state, attributes, cell, now)) is not None
            ]
            # taken even when disabled: a delta reader must not get them later
            if points and family.enabled():
                data = Histogram(data_points=points, aggregation_temporality=state.temporality)
                metrics.append(
                    Metric(
                        name=family.name,
                        description=family.description,
                        unit=family.unit,
                        data=data,
                    )
                )
        if state.temporality is AggregationTemporality.DELTA:
            state.last_ns = now
        return metrics


def _collect_of(reader: Any) -> Any:
    return getattr(reader, "_collect", None)


def _point(
    state: _Reader, attributes: ExportedAttributes, cell: HistogramCell, now: int
) -> HistogramDataPoint | None:
    """``cell``'s data point for the reader of ``state``, None if it has none (the SDK
    reports an attribute set once it has a value, and a delta one only when it got
    new values)."""
    snapshot: Snapshot | None
    if state.temporality is AggregationTemporality.DELTA:
        snapshot = cell.take_window(state)
        # the previous collection, or when this reader could first see the cell
        start = state.last_ns or max(cell.created_ns, state.attached_ns)
    else:
        snapshot = cell.snapshot()
        start = cell.created_ns
    if snapshot is None or snapshot.count == 0:
        return None
    return HistogramDataPoint(
        attributes=attributes,
        start_time_unix_nano=start,
        time_unix_nano=now,
        count=snapshot.count,
        sum=snapshot.sum,
        bucket_counts=snapshot.bucket_counts,
        explicit_bounds=cell.bounds,
        min=snapshot.min if state.min_max else math.inf,
        max=snapshot.max if state.min_max else -math.inf,
    )


def _merged(
    result: MetricsData | None,
    resource: Resource,
    scope: InstrumentationScope,
    metrics: list[Metric],
) -> MetricsData:
    """``result`` with ``metrics`` added to ``scope`` of ``resource`` (both added if
    absent). A metric ``result`` already has under that scope wins: a second wrapper
    around the same reader must not report it twice."""
    resources = list(result.resource_metrics) if result is not None else []
    for i, resource_metrics in enumerate(resources):
        if resource_metrics.resource == resource:
            scopes = list(resource_metrics.scope_metrics)
            for j, scope_metrics in enumerate(scopes):
                if scope_metrics.scope == scope:
                    have = {metric.name for metric in scope_metrics.metrics}
                    added = [metric for metric in metrics if metric.name not in have]
                    scopes[j] = ScopeMetrics(
                        scope=scope_metrics.scope,
                        metrics=[*scope_metrics.metrics, *added],
                        schema_url=scope_metrics.schema_url,
                    )
                    break
            else:
                scopes.append(_scope_metrics(scope, metrics))
            resources[i] = ResourceMetrics(
                resource=resource_metrics.resource,
                scope_metrics=scopes,
                schema_url=resource_metrics.schema_url,
            )
            break
    else:
        resources.append(
            ResourceMetrics(
                resource=resource,
                scope_metrics=[_scope_metrics(scope, metrics)],
                schema_url=resource.schema_url,
            )
        )
    return MetricsData(resource_metrics=resources)


def _scope_metrics(scope: InstrumentationScope, metrics: list[Metric]) -> ScopeMetrics:
    return ScopeMetrics(scope=scope, metrics=metrics, schema_url=scope.schema_url or "")


def bridge(
    provider: object, histograms: Sequence[tuple[object, tuple[float, ...]]]
) -> Bridge | None:
    """The bridge that exports ``histograms`` (the mesh's SDK histogram instruments,
    each with its bucket bounds) through ``provider``'s readers, wired and checked;
    None when the mesh must record through the API (not the SDK's provider, or the
    bridge declined)."""
    if not isinstance(provider, SdkMeterProvider) or provider in _DECLINED:
        return None
    if not histograms or not all(isinstance(h, SdkHistogram) for h, _ in histograms):
        return None  # instruments of another provider: the mesh is switching
    try:
        found = _wired(provider) or Bridge(provider, histograms)
    except Exception as error:  # once: not again at every refresh
        if isinstance(error, Declined):
            log.info("meshlib: histograms recorded through the SDK API: %s", error)
        else:
            log.exception("meshlib: wiring the histograms to the SDK failed")
        _DECLINED.add(provider)
        return None
    return found if found.sync() else None


def _wired(provider: SdkMeterProvider) -> Bridge | None:
    """The bridge already wired to ``provider``'s readers (the mesh used this provider
    before, then another): its cells go on, a second bridge would report twice."""
    storages = _private(_private(provider, "_measurement_consumer"), "_reader_storages")
    for reader in storages if isinstance(storages, Mapping) else ():
        current = _collect_of(reader)
        if isinstance(current, _Collect) and current.bridge.provider is provider:
            return current.bridge
    return None
