"""Compile the resilience parts of the policy into RoutePolicy and ServiceGuard,
reusing stateful objects from the StateTable when their policy is unchanged."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable

from meshlib.config.durations import parse_duration
from meshlib.config.model import Defaults, RouteConfig, ServiceConfig
from meshlib.config.resilience_model import (
    FaultsConfig,
    HedgingConfig,
    OutlierDetectionConfig,
    RateLimitConfig,
    RetryPolicy,
)
from meshlib.resilience.backoff import Backoff
from meshlib.resilience.breaker import BreakerBoard
from meshlib.resilience.budget import RetryBudget
from meshlib.resilience.faults import FaultPolicy
from meshlib.resilience.guard import ServiceGuard
from meshlib.resilience.inbound import InboundPolicy, InboundRule
from meshlib.resilience.limits import Bulkhead
from meshlib.resilience.outlier import OutlierConfig, OutlierDetector
from meshlib.resilience.policy import (
    HedgePlan,
    LatencyWindow,
    RetryPlan,
    RoutePolicy,
    import_exception,
)
from meshlib.resilience.ratelimit import KeyedLimiter, TokenBucket
from meshlib.resilience.state import StateTable

Clock = Callable[[], float]


def first_set(*values: float | None) -> float | None:
    """The most specific duration that is set; ``0s`` means none."""
    for value in values:
        if value is not None:
            return value or None
    return None


def faults_of(
    route: RouteConfig, service: ServiceConfig, defaults: Defaults
) -> FaultsConfig | None:
    """``faults: off`` anywhere above the route is a kill switch for fault injection."""
    if "off" in (route.faults, service.faults, defaults.faults):
        return None
    for candidate in (route.faults, service.faults, defaults.faults):
        if isinstance(candidate, FaultsConfig):
            return candidate
    return None


def fault_policy(config: FaultsConfig) -> FaultPolicy:
    header = next(iter(config.when_header.items()), None)
    return FaultPolicy(
        delay=config.delay.duration if config.delay else None,
        delay_percent=config.delay.percent if config.delay else 0.0,
        abort_status=config.abort.status if config.abort else None,
        abort_percent=config.abort.percent if config.abort else 0.0,
        header=header,
    )


def retry_plan(config: RetryPolicy) -> RetryPlan:
    return RetryPlan(
        attempts=config.attempts,
        per_try_timeout=config.per_try_timeout or None,
        on=frozenset(config.on),
        statuses=frozenset(config.retriable_status_codes)
        if "retriable-status-codes" in config.on or config.retriable_status_codes
        else frozenset(),
        exceptions=tuple(import_exception(name) for name in config.exceptions),
        backoff=Backoff(config.backoff.base, config.backoff.max),
        non_idempotent=config.non_idempotent,
        max_body_bytes=config.max_body_bytes,
    )


def _bucket(config: RateLimitConfig, clock: Clock) -> TokenBucket:
    burst = config.burst or max(1, int(config.requests_per_second))
    return TokenBucket(config.requests_per_second, burst, clock=clock)


def route_policy(
    service_name: str,
    route_name: str,
    route: RouteConfig,
    service: ServiceConfig,
    defaults: Defaults,
    state: StateTable,
    clock: Clock = time.monotonic,
) -> RoutePolicy | None:
    """The resilience policy of one route, or None when it has none (fast path)."""
    timeout = first_set(route.timeout, service.timeout, defaults.timeout)
    retries = route.retries or service.retries or defaults.retries
    hedging: HedgingConfig | None = route.hedging or service.hedging or defaults.hedging
    faults = faults_of(route, service, defaults)
    rate_limit = route.rate_limit
    rate_key = (service_name, route_name)
    if rate_limit is None:
        rate_limit = service.rate_limit or defaults.rate_limit
        rate_key = (service_name, "*")
    if not any(item is not None for item in (timeout, retries, hedging, faults, rate_limit)):
        return None
    budget = None
    if retries is not None:
        spec = retries.budget
        budget = state.get(
            ("budget", service_name, route_name, spec.model_dump_json()),
            lambda: RetryBudget(spec.ratio, spec.min_per_second, spec.window, clock=clock),
        )
    hedge = None
    if hedging is not None:
        hedge = _hedge_plan(service_name, route_name, hedging, state, clock)
    bucket = None
    if rate_limit is not None:
        limit = rate_limit
        bucket = state.get(
            ("rate", *rate_key, limit.model_dump_json()), lambda: _bucket(limit, clock)
        )
    return RoutePolicy(
        name=route_name,
        timeout=timeout,
        retry=retry_plan(retries) if retries is not None else None,
        budget=budget,
        hedge=hedge,
        faults=fault_policy(faults) if faults is not None else None,
        rate_limit=bucket,
    )


def _hedge_plan(
    service_name: str, route_name: str, config: HedgingConfig, state: StateTable, clock: Clock
) -> HedgePlan:
    key = ("hedge", service_name, route_name, config.model_dump_json())
    budget = state.get(
        (*key, "budget"),
        lambda: RetryBudget(config.max_extra_percent / 100.0, 1.0, 10.0, clock=clock),
    )
    if config.hedge_after.startswith("p"):
        quantile = float(config.hedge_after[1:]) / 100.0
        window = state.get(
            (*key, "latencies"),
            lambda: LatencyWindow(quantile, min_samples=config.min_samples),
        )
        return HedgePlan(None, window, budget)
    return HedgePlan(parse_duration(config.hedge_after), None, budget)


def service_guard(
    service_name: str,
    service: ServiceConfig,
    defaults: Defaults,
    addresses: Iterable[str],
    state: StateTable,
    rng: random.Random,
    clock: Clock = time.monotonic,
) -> ServiceGuard | None:
    """Breakers, outlier detection and limits of one service, or None without any."""
    breaker = service.circuit_breaker or defaults.circuit_breaker
    outlier = service.outlier_detection or defaults.outlier_detection
    limits = service.limits or defaults.limits
    if breaker is None and outlier is None and limits is None:
        return None
    key = (
        "guard",
        service_name,
        breaker.model_dump_json() if breaker else "",
        outlier.model_dump_json() if outlier else "",
        limits.model_dump_json() if limits else "",
    )

    def build() -> ServiceGuard:
        endpoint_breakers = cluster_breaker = None
        if breaker is not None:

            def board() -> BreakerBoard:
                return BreakerBoard(
                    fail_max=breaker.consecutive_failures,
                    reset_timeout=breaker.open_for,
                    success_threshold=breaker.success_threshold,
                    half_open_max=breaker.half_open_probes,
                )

            if breaker.per_endpoint:
                endpoint_breakers = board()
            if breaker.per_cluster:
                cluster_breaker = board().for_key(service_name)
        return ServiceGuard(
            service_name,
            clock=clock,
            breakers=endpoint_breakers,
            cluster_breaker=cluster_breaker,
            outlier=OutlierDetector(outlier_config(outlier), clock, rng) if outlier else None,
            panic_threshold=outlier.panic_threshold if outlier else 0.0,
            bulkhead=Bulkhead(limits.max_requests, limits.max_pending, limits.max_retries)
            if limits
            else None,
            pending_timeout=limits.pending_timeout if limits else 0.0,
        )

    guard = state.get(key, build)
    guard.set_hosts(addresses)
    return guard


def outlier_config(config: OutlierDetectionConfig) -> OutlierConfig:
    """Map the policy block onto Envoy's settings (0 disables a detector)."""
    success = config.success_rate
    failure = config.failure_percentage
    return OutlierConfig(
        interval=config.interval,
        base_ejection_time=config.base_ejection_time,
        max_ejection_time=config.max_ejection_time,
        max_ejection_percent=config.max_ejection_percent,
        always_eject_one_host=config.always_eject_one_host,
        consecutive_5xx=config.consecutive_5xx or 0,
        consecutive_gateway_failure=config.consecutive_gateway_failure or 0,
        consecutive_local_origin_failure=config.consecutive_connect_failure or 0,
        split_external_local_origin_errors=True,
        success_rate_minimum_hosts=success.minimum_hosts if success else 5,
        success_rate_request_volume=success.request_volume if success else 100,
        success_rate_stdev_factor=(success.stdev_factor if success else 1.9) * 1000.0,
        enforcing_success_rate=success.enforcing if success else 0.0,
        enforcing_local_origin_success_rate=success.enforcing if success else 0.0,
        failure_percentage_threshold=failure.threshold if failure else 85.0,
        failure_percentage_minimum_hosts=failure.minimum_hosts if failure else 5,
        failure_percentage_request_volume=failure.request_volume if failure else 50,
        enforcing_failure_percentage=failure.enforcing if failure else 0.0,
        enforcing_failure_percentage_local_origin=failure.enforcing if failure else 0.0,
    )


def inbound_policy(
    service_name: str,
    service: ServiceConfig,
    defaults: Defaults,
    state: StateTable,
    clock: Clock = time.monotonic,
) -> InboundPolicy:
    """The server-side policy that ``mesh.asgi(app, service=...)`` enforces."""
    inbound = service.inbound
    off = "off" in (service.faults, defaults.faults)

    def rule(name: str, prefix: str, limit: RateLimitConfig | None, faults: object) -> InboundRule:
        bucket = keyed = None
        if limit is not None:
            key = ("inbound", service_name, name, limit.model_dump_json())
            burst = limit.burst or max(1, int(limit.requests_per_second))
            if limit.per_caller:
                keyed = state.get(
                    key,
                    lambda: KeyedLimiter(limit.requests_per_second, burst, clock=clock),
                )
            else:
                bucket = state.get(key, lambda: _bucket(limit, clock))
        policy = None
        if faults == "off" or (off and faults is not None):
            policy = FaultPolicy()  # explicitly none here, whatever the service-wide rule says
        elif isinstance(faults, FaultsConfig):
            policy = fault_policy(faults)
        return InboundRule(name, prefix, bucket, keyed, policy)

    if inbound is None:
        return InboundPolicy(service_name, (), InboundRule("service", "/"), "x-mesh-caller")
    default = rule("service", "/", inbound.rate_limit, inbound.faults)
    rules = tuple(
        rule(item.name or f"inbound-{index}", item.path_prefix, item.rate_limit, item.faults)
        for index, item in enumerate(inbound.routes)
    )
    return InboundPolicy(service_name, rules, default, inbound.caller_header.lower())
