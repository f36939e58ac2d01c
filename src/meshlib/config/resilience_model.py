"""Policy schema for resilience: retries, budgets, hedging, breakers, outlier
detection, concurrency limits, rate limits and fault injection.

Precedence is route > service > defaults, and a more specific block replaces
a less specific one whole (no field-by-field merge), so what applies is always
one block that `explain` can show.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from meshlib.config.authz_model import AuthzPolicies
from meshlib.config.durations import parse_duration
from meshlib.config.jwt_model import JwtProviders
from meshlib.config.security_model import InboundMtls
from meshlib.config.types import Duration, Strict

_EXCEPTION_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")


RetryOn = Literal[
    "connect-failure", "reset", "5xx", "gateway-error", "retriable-status-codes", "timeout"
]
_DEFAULT_RETRY_ON: tuple[RetryOn, ...] = ("connect-failure", "gateway-error")
_D25MS: Any = "25ms"
_D250MS: Any = "250ms"
_D10S: Any = "10s"
_D30S: Any = "30s"
_D300S: Any = "300s"


class BackoffConfig(Strict):
    """Exponential backoff with full jitter: retry n waits uniform(0, min(max, base*2^(n-1)))."""

    base: Duration = Field(default=_D25MS, gt=0)
    max: Duration = Field(default=_D250MS, ge=0)


class BudgetConfig(Strict):
    """Retries may add at most ``ratio`` of requests plus ``min_per_second`` per second."""

    ratio: float = Field(default=0.2, ge=0.0, le=10.0)
    min_per_second: float = Field(default=10.0, ge=0.0)
    window: Duration = Field(default=_D10S, gt=0)


class RetryPolicy(Strict):
    attempts: int = Field(default=2, ge=1, le=10)
    per_try_timeout: Duration | None = None
    on: list[RetryOn] = Field(default_factory=lambda: list(_DEFAULT_RETRY_ON))
    retriable_status_codes: list[Annotated[int, Field(ge=100, le=599)]] = Field(
        default_factory=list
    )
    exceptions: list[str] = Field(default_factory=list)
    backoff: BackoffConfig = Field(default_factory=BackoffConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    non_idempotent: bool = False
    max_body_bytes: int = Field(default=65536, ge=0)

    @field_validator("exceptions")
    @classmethod
    def _dotted(cls, value: list[str]) -> list[str]:
        for name in value:
            if not _EXCEPTION_NAME.match(name):
                raise ValueError(f"{name!r}: name exception classes as module.Class")
        return value


class HedgingConfig(Strict):
    """Backup requests: after ``hedge_after`` send one more attempt elsewhere."""

    hedge_after: str
    max_extra_percent: float = Field(default=10.0, gt=0.0, le=100.0)
    min_samples: int = Field(default=20, ge=1)

    @field_validator("hedge_after")
    @classmethod
    def _delay(cls, value: str) -> str:
        if re.fullmatch(r"p(50|75|90|95|99|99\.9)", value):
            return value
        if value.startswith("p"):
            raise ValueError(f"bad percentile {value!r}: use one of p50, p75, p90, p95, p99, p99.9")
        parse_duration(value)
        return value


class CircuitBreakerConfig(Strict):
    consecutive_failures: int = Field(default=5, ge=1)
    open_for: Duration = Field(default=_D10S, gt=0)
    half_open_probes: int = Field(default=1, ge=1)
    success_threshold: int = Field(default=1, ge=1)
    per_endpoint: bool = True
    per_cluster: bool = True


class SuccessRateConfig(Strict):
    minimum_hosts: int = Field(default=5, ge=1)
    request_volume: int = Field(default=100, ge=1)
    stdev_factor: float = Field(default=1.9, gt=0)
    enforcing: float = Field(default=100.0, ge=0, le=100)


class FailurePercentageConfig(Strict):
    threshold: float = Field(default=85.0, ge=0, le=100)
    minimum_hosts: int = Field(default=5, ge=1)
    request_volume: int = Field(default=50, ge=1)
    enforcing: float = Field(default=100.0, ge=0, le=100)


class OutlierDetectionConfig(Strict):
    consecutive_5xx: int | None = Field(default=5, ge=1)
    consecutive_gateway_failure: int | None = Field(default=5, ge=1)
    consecutive_connect_failure: int | None = Field(default=5, ge=1)
    interval: Duration = Field(default=_D10S, gt=0)
    base_ejection_time: Duration = Field(default=_D30S, gt=0)
    max_ejection_time: Duration = Field(default=_D300S, gt=0)
    max_ejection_percent: float = Field(default=10.0, ge=0, le=100)
    # Envoy ejects nobody from fewer than 10 hosts at 10%; small fleets are the
    # common case in-process, so one host may always be ejected unless this is off
    always_eject_one_host: bool = True
    success_rate: SuccessRateConfig | None = None
    failure_percentage: FailurePercentageConfig | None = None
    panic_threshold: float = Field(default=50.0, ge=0, le=100)

    @model_validator(mode="after")
    def _ejection_times(self) -> OutlierDetectionConfig:
        if self.max_ejection_time < self.base_ejection_time:
            raise ValueError("max_ejection_time must be at least base_ejection_time")
        return self


class LimitsConfig(Strict):
    """Per-cluster concurrency limits (a bulkhead): over them the call fails fast."""

    max_requests: int = Field(default=1024, ge=1)
    max_pending: int = Field(default=0, ge=0)
    pending_timeout: Duration = Field(default=_D10S, gt=0)
    max_retries: int = Field(default=3, ge=0)


class RateLimitConfig(Strict):
    """Token bucket: ``requests_per_second`` sustained, ``burst`` at once."""

    requests_per_second: float = Field(gt=0)
    burst: int | None = Field(default=None, ge=1)
    per_caller: bool = False  # server side: one bucket per calling identity


class FaultDelay(Strict):
    duration: Duration = Field(ge=0)
    percent: float = Field(default=100.0, ge=0, le=100)


class FaultAbort(Strict):
    status: int = Field(ge=200, le=599)
    percent: float = Field(default=100.0, ge=0, le=100)


class FaultsConfig(Strict):
    delay: FaultDelay | None = None
    abort: FaultAbort | None = None
    when_header: dict[str, str] = Field(default_factory=dict)

    @field_validator("when_header")
    @classmethod
    def _one_header(cls, value: dict[str, str]) -> dict[str, str]:
        if len(value) > 1:
            raise ValueError("faults can be gated on one header")
        return {name.lower(): item for name, item in value.items()}


Faults = FaultsConfig | Literal["off"]


class InboundConfig(Strict):
    """Server-side policy applied by ``mesh.asgi(app, service=...)``."""

    rate_limit: RateLimitConfig | None = None
    faults: Faults | None = None
    routes: list[InboundRoute] = Field(default_factory=list)
    caller_header: str = "x-mesh-caller"
    mtls: InboundMtls | None = None
    jwt: JwtProviders | None = None
    authz: AuthzPolicies | None = None


class InboundRoute(Strict):
    """A server-side rate limit or fault for a path prefix."""

    name: str | None = None
    path_prefix: str = "/"
    rate_limit: RateLimitConfig | None = None
    faults: Faults | None = None


InboundConfig.model_rebuild()
