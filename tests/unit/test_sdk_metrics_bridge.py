"""The SDK bridge: the mesh's own duration histograms reach an SDK MeterProvider's readers
as exactly the data points the SDK makes from ``Histogram.record`` of the same values,
and the mesh falls back to recording through the API whenever it cannot promise that.

Each test uses its own `Metrics` (never the process's `METRICS`) and its own providers.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.metrics import CallbackOptions, Meter, MeterProvider, Observation
from opentelemetry.sdk.metrics import Histogram as SdkHistogram
from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    HistogramDataPoint,
    InMemoryMetricReader,
    Metric,
    MetricReader,
    MetricsData,
)
from opentelemetry.sdk.metrics.view import (
    DropAggregation,
    ExplicitBucketHistogramAggregation,
    ExponentialBucketHistogramAggregation,
    View,
)
from opentelemetry.sdk.resources import Resource

from meshlib import __version__
from meshlib.telemetry import sdk_metrics
from meshlib.telemetry.metrics import DURATION_BUCKETS, SCHEMA_URL, ClientKey, Metrics, ServerKey

CLIENT = "http.client.request.duration"
SERVER = "http.server.request.duration"
DELTA = {SdkHistogram: AggregationTemporality.DELTA}
RESOURCE = Resource.create({"service.name": "bridge-test"})

CLIENT_KEYS: list[ClientKey] = [
    ("checkout", "users", "default", None, 2),
    ("checkout", "users", "default", None, 5),
    ("checkout", "orders", "write", "canary", 2),
    (None, "orders", "write", None, 0),
]
SERVER_KEYS: list[ServerKey] = [("users", "default", 2), ("users", "admin", 4)]


def client_attributes(key: ClientKey) -> dict[str, str]:
    source, destination, route, subset, hundreds = key
    return {
        "mesh.source": source or "",
        "mesh.destination": destination,
        "mesh.route": route,
        "mesh.subset": subset or "",
        "mesh.status_class": f"{hundreds}xx" if hundreds else "error",
    }


def server_attributes(key: ServerKey) -> dict[str, str]:
    service, route, hundreds = key
    return {
        "mesh.destination": service,
        "mesh.route": route,
        "mesh.status_class": f"{hundreds}xx" if hundreds else "error",
    }


def provider_with(*readers: MetricReader, views: Sequence[View] = ()) -> SdkMeterProvider:
    return SdkMeterProvider(
        metric_readers=readers, resource=RESOURCE, views=views, shutdown_on_exit=False
    )


def mesh_metrics(provider: MeterProvider) -> Metrics:
    metrics = Metrics(provider=lambda: provider)
    metrics.refresh()
    assert metrics.on
    return metrics


class Reference:
    """The SDK on its own: the same instruments fed through ``Histogram.record``."""

    def __init__(self, metrics: Metrics, *readers: MetricReader) -> None:
        self.provider = provider_with(*readers)
        meter = self.provider.get_meter("meshlib", __version__, SCHEMA_URL)
        self.client = self._like(meter, metrics.client_duration)
        self.server = self._like(meter, metrics.server_duration)

    @staticmethod
    def _like(meter: Meter, instrument: Any) -> Any:
        return meter.create_histogram(
            instrument.name,
            instrument.unit,
            instrument.description,
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )


Recorded = list[tuple[int, float]]
"""(index into CLIENT_KEYS + SERVER_KEYS, seconds)."""


def record(metrics: Metrics, reference: Reference | None, values: Recorded) -> None:
    """Record ``values`` the mesh's way in ``metrics`` and the SDK's way in ``reference``."""
    for index, seconds in values:
        if index < len(CLIENT_KEYS):
            client_key = CLIENT_KEYS[index]
            mesh = metrics.client_recorders.get(client_key) or metrics.client_recorder(client_key)
            mesh[0](seconds)
            if reference is not None:
                reference.client.record(seconds, client_attributes(client_key))
        else:
            server_key = SERVER_KEYS[index - len(CLIENT_KEYS)]
            mesh = metrics.server_recorders.get(server_key) or metrics.server_recorder(server_key)
            mesh[0](seconds)
            if reference is not None:
                reference.server.record(seconds, server_attributes(server_key))


def metrics_of(data: MetricsData | None) -> dict[str, tuple[Any, Metric]]:
    """Each metric by name, with the scope it came in."""
    found: dict[str, tuple[Any, Metric]] = {}
    for resource_metrics in data.resource_metrics if data is not None else []:
        assert resource_metrics.resource == RESOURCE
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                assert metric.name not in found, f"{metric.name} reported twice"
                found[metric.name] = (scope_metrics, metric)
    return found


def histogram(data: MetricsData | None, name: str) -> dict[Any, HistogramDataPoint]:
    """The data points of ``name`` by attribute set (empty if not reported)."""
    found = metrics_of(data).get(name)
    if found is None:
        return {}
    return {frozenset(point.attributes.items()): point for point in found[1].data.data_points}


def figures(point: HistogramDataPoint, exact_sum: bool = True) -> tuple[Any, ...]:
    total = point.sum if exact_sum else pytest.approx(point.sum, rel=1e-12, abs=1e-15)
    return (
        point.count,
        total,
        tuple(point.bucket_counts),
        tuple(point.explicit_bounds),
        point.min,
        point.max,
        list(point.exemplars),
    )


def assert_same(mesh: MetricsData | None, sdk: MetricsData | None, exact_sum: bool = True) -> None:
    """The duration histograms in ``mesh`` are the SDK's in ``sdk``: metric identity,
    scope, temporality and every data point's figures."""
    mesh_metrics_, sdk_metrics_ = metrics_of(mesh), metrics_of(sdk)
    for name in (CLIENT, SERVER):
        assert (name in mesh_metrics_) == (name in sdk_metrics_), name
        if name not in sdk_metrics_:
            continue
        (mesh_scope, mesh_metric), (sdk_scope, sdk_metric) = mesh_metrics_[name], sdk_metrics_[name]
        assert mesh_scope.scope == sdk_scope.scope
        assert mesh_scope.schema_url == sdk_scope.schema_url == SCHEMA_URL
        assert (mesh_metric.name, mesh_metric.unit, mesh_metric.description) == (
            sdk_metric.name,
            sdk_metric.unit,
            sdk_metric.description,
        )
        assert mesh_metric.data.aggregation_temporality == sdk_metric.data.aggregation_temporality
        mesh_points, sdk_points = histogram(mesh, name), histogram(sdk, name)
        assert mesh_points.keys() == sdk_points.keys()
        for attributes, point in sdk_points.items():
            assert figures(mesh_points[attributes]) == figures(point, exact_sum), attributes


seconds_st = st.one_of(
    st.floats(min_value=0, max_value=15, allow_subnormal=False),
    st.sampled_from(DURATION_BUCKETS),  # right on a bound
)
recorded_st = st.lists(
    st.tuples(st.integers(0, len(CLIENT_KEYS) + len(SERVER_KEYS) - 1), seconds_st), max_size=40
)


@settings(max_examples=40, deadline=None)
@given(first=recorded_st, second=recorded_st)
def test_cumulative_points_are_the_sdks(first: Recorded, second: Recorded) -> None:
    reader, expected = InMemoryMetricReader(), InMemoryMetricReader()
    metrics = mesh_metrics(provider_with(reader))
    reference = Reference(metrics, expected)
    assert metrics._bridge is not None
    record(metrics, reference, first)
    assert_same(reader.get_metrics_data(), expected.get_metrics_data())
    record(metrics, reference, second)
    # the SDK adds each interval's sum to the previous total, the cell keeps one
    # running sum: the same values, summed in another order
    assert_same(reader.get_metrics_data(), expected.get_metrics_data(), exact_sum=False)


@settings(max_examples=40, deadline=None)
@given(first=recorded_st, second=recorded_st)
def test_delta_points_are_the_sdks_and_restart_at_each_collection(
    first: Recorded, second: Recorded
) -> None:
    reader = InMemoryMetricReader(preferred_temporality=DELTA)
    expected = InMemoryMetricReader(preferred_temporality=DELTA)
    metrics = mesh_metrics(provider_with(reader))
    reference = Reference(metrics, expected)
    record(metrics, reference, first)
    before = reader.get_metrics_data()
    assert_same(before, expected.get_metrics_data())
    record(metrics, reference, second)
    after = reader.get_metrics_data()
    assert_same(after, expected.get_metrics_data())
    # each interval starts where the previous collection ended
    ended = {
        p.time_unix_nano for name in (CLIENT, SERVER) for p in histogram(before, name).values()
    }
    started = {
        p.start_time_unix_nano for name in (CLIENT, SERVER) for p in histogram(after, name).values()
    }
    if ended and started:
        assert started == ended
    assert histogram(reader.get_metrics_data(), CLIENT) == {}  # nothing new: nothing


def test_two_readers_on_one_provider_each_get_their_own() -> None:
    cumulative, delta = InMemoryMetricReader(), InMemoryMetricReader(preferred_temporality=DELTA)
    expected_cumulative = InMemoryMetricReader()
    expected_delta = InMemoryMetricReader(preferred_temporality=DELTA)
    metrics = mesh_metrics(provider_with(cumulative, delta))
    reference = Reference(metrics, expected_cumulative, expected_delta)
    record(metrics, reference, [(0, 0.003), (0, 0.2), (4, 0.01), (1, 7.0)])
    assert_same(delta.get_metrics_data(), expected_delta.get_metrics_data())
    record(metrics, reference, [(0, 0.001), (5, 0.0005)])
    assert_same(cumulative.get_metrics_data(), expected_cumulative.get_metrics_data())
    record(metrics, reference, [(2, 11.0)])
    assert_same(delta.get_metrics_data(), expected_delta.get_metrics_data())
    assert_same(
        cumulative.get_metrics_data(), expected_cumulative.get_metrics_data(), exact_sum=False
    )
    assert_same(delta.get_metrics_data(), expected_delta.get_metrics_data())


def test_the_histograms_join_the_meshlib_scope_of_the_providers_resource() -> None:
    reader = InMemoryMetricReader()
    metrics = mesh_metrics(provider_with(reader))
    record(metrics, None, [(0, 0.01)])
    alone = metrics_of(reader.get_metrics_data())
    assert alone[CLIENT][0].scope.name == "meshlib"
    assert alone[CLIENT][0].scope.version == __version__
    metrics.retries.add(1, {"mesh.source": "checkout"})
    together = metrics_of(reader.get_metrics_data())
    assert together[CLIENT][0] is together["meshlib.retries"][0]  # one ScopeMetrics


def test_record_min_max_off_is_honoured() -> None:
    # no boundaries: each histogram keeps its own advisory buckets
    aggregation = {SdkHistogram: ExplicitBucketHistogramAggregation(None, False)}
    reader = InMemoryMetricReader(preferred_aggregation=aggregation)
    expected = InMemoryMetricReader(preferred_aggregation=aggregation)
    metrics = mesh_metrics(provider_with(reader))
    reference = Reference(metrics, expected)
    assert metrics._bridge is not None
    record(metrics, reference, [(0, 0.02), (0, 3.0)])
    assert_same(reader.get_metrics_data(), expected.get_metrics_data())
    (point,) = histogram(reader.get_metrics_data(), CLIENT).values()
    assert (point.min, point.max) == (math.inf, -math.inf)


def test_reader_boundaries_for_every_histogram_make_the_mesh_record_through_the_api() -> None:
    # the durations' bounds would apply to the body sizes too: only the SDK does that
    aggregation = {SdkHistogram: ExplicitBucketHistogramAggregation(DURATION_BUCKETS, True)}
    metrics = mesh_metrics(provider_with(InMemoryMetricReader(preferred_aggregation=aggregation)))
    assert metrics._bridge is None


def test_a_reader_that_drops_histograms_gets_none() -> None:
    dropping = InMemoryMetricReader(preferred_aggregation={SdkHistogram: DropAggregation()})
    other = InMemoryMetricReader()
    metrics = mesh_metrics(provider_with(dropping, other))
    assert metrics._bridge is not None
    record(metrics, None, [(0, 0.02), (4, 0.1)])
    metrics.retries.add(1, {"mesh.source": "checkout"})
    assert set(metrics_of(dropping.get_metrics_data())) == {"meshlib.retries"}
    assert {CLIENT, SERVER} <= set(metrics_of(other.get_metrics_data()))


@pytest.mark.parametrize(
    "view",
    [
        View(instrument_name=CLIENT, aggregation=ExplicitBucketHistogramAggregation((0.1, 1.0))),
        View(instrument_name="http.*", aggregation=ExplicitBucketHistogramAggregation((0.1, 1.0))),
        View(meter_name="meshlib", aggregation=ExplicitBucketHistogramAggregation((0.1, 1.0))),
    ],
)
def test_a_view_on_the_instruments_makes_the_mesh_record_through_the_api(view: View) -> None:
    reader = InMemoryMetricReader()
    metrics = mesh_metrics(provider_with(reader, views=[view]))
    assert metrics._bridge is None
    record(metrics, None, [(0, 0.05), (0, 0.5), (4, 2.0)])
    (point,) = histogram(reader.get_metrics_data(), CLIENT).values()
    assert (point.count, tuple(point.explicit_bounds)) == (2, (0.1, 1.0))  # the view applied
    assert tuple(point.bucket_counts) == (1, 1, 0)
    assert not isinstance(reader._collect, sdk_metrics._Collect)


def test_a_view_on_other_instruments_keeps_the_bridge() -> None:
    view = View(instrument_name=CLIENT, meter_name="someone.else", name="renamed")
    reader = InMemoryMetricReader()
    metrics = mesh_metrics(provider_with(reader, views=[view]))
    assert metrics._bridge is not None


@pytest.mark.parametrize(
    "aggregation",
    [ExponentialBucketHistogramAggregation(), ExplicitBucketHistogramAggregation((1.0,))],
)
def test_another_histogram_aggregation_makes_the_mesh_record_through_the_api(
    aggregation: Any,
) -> None:
    reader = InMemoryMetricReader(preferred_aggregation={SdkHistogram: aggregation})
    expected = InMemoryMetricReader(preferred_aggregation={SdkHistogram: aggregation})
    metrics = mesh_metrics(provider_with(reader))
    assert metrics._bridge is None
    reference = Reference(metrics, expected)
    record(metrics, reference, [(0, 0.05), (4, 2.0)])
    got, want = reader.get_metrics_data(), expected.get_metrics_data()
    for name in (CLIENT, SERVER):
        assert type(metrics_of(got)[name][1].data) is type(metrics_of(want)[name][1].data)


def test_another_cardinality_limit_makes_the_mesh_record_through_the_api() -> None:
    reader = InMemoryMetricReader(cardinality_limits={SdkHistogram: 3})
    metrics = mesh_metrics(provider_with(reader))
    assert metrics._bridge is None


class DelegatingProvider(MeterProvider):
    """Somebody else's MeterProvider (here it hands out the SDK's meters)."""

    def __init__(self, inner: SdkMeterProvider) -> None:
        self._inner = inner

    def get_meter(self, *args: Any, **kwargs: Any) -> Meter:
        return self._inner.get_meter(*args, **kwargs)


def test_a_provider_other_than_the_sdks_gets_api_records() -> None:
    reader = InMemoryMetricReader()
    metrics = mesh_metrics(DelegatingProvider(provider_with(reader)))
    assert metrics._bridge is None
    record(metrics, None, [(0, 0.05), (0, 0.07), (4, 2.0)])
    assert not isinstance(reader._collect, sdk_metrics._Collect)
    points = histogram(reader.get_metrics_data(), CLIENT)
    assert [point.count for point in points.values()] == [2]


def test_a_failing_bridge_keeps_the_sdks_own_metrics(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    reader = InMemoryMetricReader()
    metrics = mesh_metrics(provider_with(reader))
    record(metrics, None, [(0, 0.05)])
    metrics.retries.add(2, {"mesh.source": "checkout"})

    def broken(*args: Any) -> list[Metric]:
        raise RuntimeError("bridge bug")

    monkeypatch.setattr(sdk_metrics.Bridge, "_metrics", broken)
    with caplog.at_level(logging.ERROR, logger="meshlib.telemetry"):
        data = reader.get_metrics_data()
    assert set(metrics_of(data)) == {"meshlib.retries"}
    assert "adding the histograms to a collection failed" in caplog.text


def test_a_reader_added_later_is_wired_at_the_next_refresh() -> None:
    first = InMemoryMetricReader()
    provider = provider_with(first)
    metrics = mesh_metrics(provider)
    record(metrics, None, [(0, 0.05)])
    later = InMemoryMetricReader(preferred_temporality=DELTA)
    provider.add_metric_reader(later)
    metrics.refresh()
    record(metrics, None, [(0, 0.5), (0, 0.6)])
    # delta: what was recorded since the reader came; cumulative: since the cell was made
    assert [p.count for p in histogram(later.get_metrics_data(), CLIENT).values()] == [2]
    assert [p.count for p in histogram(first.get_metrics_data(), CLIENT).values()] == [3]


def test_an_overwritten_collect_is_wired_again_and_never_reports_twice() -> None:
    reader = InMemoryMetricReader()
    provider = provider_with(reader)
    metrics = mesh_metrics(provider)
    record(metrics, None, [(0, 0.05)])
    reader._set_collect_callback(provider._measurement_consumer.collect)  # unwired
    assert CLIENT not in metrics_of(reader.get_metrics_data())
    metrics.refresh()
    assert [p.count for p in histogram(reader.get_metrics_data(), CLIENT).values()] == [1]
    ours = reader._collect

    def foreign(*args: Any, **kwargs: Any) -> Any:  # someone else's wrapper around ours
        return ours(*args, **kwargs)

    reader._collect = foreign
    metrics.refresh()  # wires around the foreign wrapper: the metric would come twice
    assert [p.count for p in histogram(reader.get_metrics_data(), CLIENT).values()] == [1]


def test_a_reader_the_bridge_cannot_serve_turns_it_off_for_that_provider(
    caplog: pytest.LogCaptureFixture,
) -> None:
    reader = InMemoryMetricReader()
    provider = provider_with(reader)
    metrics = mesh_metrics(provider)
    record(metrics, None, [(0, 0.05)])
    stale = metrics.client_recorders
    exponential = {SdkHistogram: ExponentialBucketHistogramAggregation()}
    provider.add_metric_reader(InMemoryMetricReader(preferred_aggregation=exponential))
    with caplog.at_level(logging.INFO, logger="meshlib.telemetry"):
        metrics.refresh()
    assert metrics._bridge is None
    assert "recorded through the SDK API" in caplog.text
    assert metrics.client_recorders is not stale and not metrics.client_recorders
    assert not isinstance(reader._collect, sdk_metrics._Collect)
    record(metrics, None, [(0, 0.5), (0, 0.6)])
    assert [p.count for p in histogram(reader.get_metrics_data(), CLIENT).values()] == [2]
    # for good: this provider's storage now holds the instruments' data
    assert sdk_metrics.bridge(provider, [(metrics.client_duration, DURATION_BUCKETS)]) is None


def test_a_new_provider_gets_new_recorders_and_an_old_one_its_cells_back() -> None:
    first_reader, second_reader = InMemoryMetricReader(), InMemoryMetricReader()
    first, second = provider_with(first_reader), provider_with(second_reader)
    current = [first]
    metrics = Metrics(provider=lambda: current[0])
    metrics.refresh()
    record(metrics, None, [(0, 0.05)])
    first_bridge = metrics._bridge
    current[0] = second
    metrics.refresh()
    assert metrics._bridge is not first_bridge and not metrics.client_recorders
    record(metrics, None, [(0, 0.5), (0, 0.6)])
    assert [p.count for p in histogram(second_reader.get_metrics_data(), CLIENT).values()] == [2]
    # the first provider keeps reporting what it got, like the SDK's own storage
    assert [p.count for p in histogram(first_reader.get_metrics_data(), CLIENT).values()] == [1]
    current[0] = first
    metrics.refresh()
    assert metrics._bridge is first_bridge
    record(metrics, None, [(0, 0.7)])
    assert [p.count for p in histogram(first_reader.get_metrics_data(), CLIENT).values()] == [2]


def test_label_sets_past_the_limit_share_the_overflow_point_as_in_the_sdk() -> None:
    reader, expected = InMemoryMetricReader(), InMemoryMetricReader()
    metrics = mesh_metrics(provider_with(reader))
    reference = Reference(metrics, expected)
    for n in range(sdk_metrics.CARDINALITY_LIMIT + 3):
        key = ("checkout", f"service-{n}", "default", None, 2)
        (metrics.client_recorders.get(key) or metrics.client_recorder(key))[0](0.01 * (n % 7))
        reference.client.record(0.01 * (n % 7), client_attributes(key))
    got, want = reader.get_metrics_data(), expected.get_metrics_data()
    assert len(histogram(got, CLIENT)) == sdk_metrics.CARDINALITY_LIMIT + 1
    assert_same(got, want)


def test_observable_callbacks_still_work_alongside(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def one(_options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(1, {"mesh.source": "checkout", "mesh.destination": "users"})]

    reader = InMemoryMetricReader()
    provider = provider_with(reader)
    metrics = Metrics(provider=lambda: provider)
    monkeypatch.setattr(metrics, "_observe_inflight", one)
    metrics.refresh()
    record(metrics, None, [(0, 0.05)])
    found = metrics_of(reader.get_metrics_data())
    assert {"meshlib.requests.inflight", CLIENT} <= set(found)


def test_an_sdk_without_the_expected_internals_gets_api_records(
    caplog: pytest.LogCaptureFixture,
) -> None:
    reader = InMemoryMetricReader()
    provider = provider_with(reader)
    provider.get_meter("meshlib", __version__, SCHEMA_URL)  # made while it still could be
    del provider._measurement_consumer  # as if another SDK version kept it elsewhere
    with caplog.at_level(logging.INFO, logger="meshlib.telemetry"):
        metrics = mesh_metrics(provider)
        metrics.refresh()
    assert metrics._bridge is None
    assert caplog.text.count("has no _measurement_consumer") == 1  # said once, not each second
    record(metrics, None, [(0, 0.05), (4, 2.0)])
    assert {CLIENT, SERVER} <= set(metrics_of(reader.get_metrics_data()))
