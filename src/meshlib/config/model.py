"""The policy document (``mesh.yaml``) as pydantic models.

The shape mirrors xDS: a service is a virtual host with ordered routes; a
route sends to weighted clusters (a service, optionally narrowed to a subset);
a cluster has endpoints with localities and priorities and a load balancer.
Unknown keys are errors everywhere. Durations are seconds after validation.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    Field,
    field_validator,
    model_validator,
)

from meshlib.config.resilience_model import (
    CircuitBreakerConfig,
    Faults,
    HedgingConfig,
    InboundConfig,
    LimitsConfig,
    OutlierDetectionConfig,
    RateLimitConfig,
    RetryPolicy,
)
from meshlib.config.security_model import (
    IdentityConfig,
    ServiceTls,
)
from meshlib.config.types import Duration, Strict
from meshlib.endpoint import parse_address
from meshlib.tls.identity import validate_trust_domain

# Lowercase only: URL hosts are case-insensitive and httpx lowercases them.
NAME_PATTERN = r"^[a-z0-9]([a-z0-9._-]*[a-z0-9])?$"
ServiceName = Annotated[str, Field(pattern=NAME_PATTERN)]
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


def _check_regex(value: str | None) -> str | None:
    if value is not None:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"invalid regex {value!r}: {exc}") from None
    return value


def _only_one(model: BaseModel, fields: tuple[str, ...], what: str) -> None:
    given = [name for name in fields if getattr(model, name) is not None]
    if len(given) != 1:
        raise ValueError(f"{what} needs exactly one of {', '.join(fields)} (got {given or 'none'})")


class Locality(Strict):
    region: str = ""
    zone: str = ""


class EndpointConfig(Strict):
    address: str
    weight: int = Field(default=1, ge=1, le=1_000_000)
    labels: dict[str, str] = Field(default_factory=dict)
    locality: Locality = Field(default_factory=Locality)
    priority: int = Field(default=0, ge=0, le=128)

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        parse_address(value)
        return value


class DiscoveryConfig(Strict):
    """Where a service's endpoints come from when not listed inline."""

    registry: Annotated[
        str, Field(pattern=NAME_PATTERN)
    ]  # static, file, or a Mesh(registries=...) name
    path: str | None = None
    name: str | None = None  # the name in the registry, when it differs

    @model_validator(mode="after")
    def _path_for_file(self) -> DiscoveryConfig:
        if self.registry == "file" and not self.path:
            raise ValueError("the file registry needs `path`: the endpoints file to watch")
        return self


class PathMatch(Strict):
    exact: str | None = None
    prefix: str | None = None
    regex: Annotated[str | None, BeforeValidator(_check_regex)] = None

    @model_validator(mode="after")
    def _one(self) -> PathMatch:
        _only_one(self, ("exact", "prefix", "regex"), "a path match")
        return self


class ValueMatch(Strict):
    """Header or query parameter match. A bare string means ``exact``."""

    exact: str | None = None
    prefix: str | None = None
    suffix: str | None = None
    regex: Annotated[str | None, BeforeValidator(_check_regex)] = None
    present: bool | None = None
    absent: bool | None = None
    invert: bool = False

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"exact": value}
        return value

    @model_validator(mode="after")
    def _one(self) -> ValueMatch:
        _only_one(self, ("exact", "prefix", "suffix", "regex", "present", "absent"), "a match")
        if self.absent is False:
            raise ValueError("write `present: true` instead of `absent: false`")
        return self


class RouteMatch(Strict):
    path: PathMatch | None = None
    method: list[str] | None = None
    headers: dict[str, ValueMatch] = Field(default_factory=dict)
    query: dict[str, ValueMatch] = Field(default_factory=dict)

    @field_validator("method", mode="before")
    @classmethod
    def _methods(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            return [item.upper() if isinstance(item, str) else item for item in value]
        return value

    @field_validator("headers")
    @classmethod
    def _lower(cls, value: dict[str, ValueMatch]) -> dict[str, ValueMatch]:
        return {name.lower(): match for name, match in value.items()}


class Destination(Strict):
    """One weighted target: this service (or another) optionally narrowed to a subset."""

    service: ServiceName | None = None
    subset: str | None = None
    weight: int = Field(default=1, ge=0, le=1_000_000)


class Mirror(Strict):
    service: ServiceName | None = None
    subset: str | None = None
    percent: float = Field(default=100.0, ge=0.0, le=100.0)


class Rewrite(Strict):
    prefix: str | None = None
    host: str | None = None


def _header_name(name: str) -> str:
    if not _TOKEN.match(name):
        raise ValueError(f"{name!r} is not a valid HTTP header name")
    return name


def _header_value(value: str) -> str:
    if "\r" in value or "\n" in value:
        raise ValueError(f"header value {value!r} contains a line break")
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError(f"header value {value!r} is not Latin-1 text") from None
    return value


class HeaderActions(Strict):
    set: dict[str, str] = Field(default_factory=dict)
    add: dict[str, str] = Field(default_factory=dict)
    remove: list[str] = Field(default_factory=list)

    @field_validator("set", "add")
    @classmethod
    def _pairs(cls, value: dict[str, str]) -> dict[str, str]:
        return {_header_name(name): _header_value(item) for name, item in value.items()}

    @field_validator("remove")
    @classmethod
    def _names(cls, value: list[str]) -> list[str]:
        return [_header_name(name) for name in value]


class LoadBalancerConfig(Strict):
    policy: Literal["round_robin", "random", "least_request", "ring_hash"] = "round_robin"
    choice_count: int = Field(default=2, ge=2, le=16)
    hash_on: HashOn | None = None
    min_ring_size: int = Field(default=1024, ge=1, le=8_388_608)

    @model_validator(mode="after")
    def _hash_needs_key(self) -> LoadBalancerConfig:
        if self.hash_on is not None and self.policy != "ring_hash":
            raise ValueError("`hash_on` only applies to policy ring_hash")
        return self


class HashOn(Strict):
    header: str | None = None
    cookie: str | None = None

    @model_validator(mode="after")
    def _one(self) -> HashOn:
        _only_one(self, ("header", "cookie"), "hash_on")
        return self


class RouteConfig(Strict):
    name: str | None = None
    match: RouteMatch = Field(default_factory=RouteMatch)
    to: list[Destination] = Field(default_factory=lambda: [Destination()])
    rewrite: Rewrite | None = None
    request_headers: HeaderActions | None = None
    mirror: Mirror | None = None
    timeout: Duration | None = None
    retries: RetryPolicy | None = None
    hedging: HedgingConfig | None = None
    faults: Faults | None = None
    rate_limit: RateLimitConfig | None = None

    @field_validator("to")
    @classmethod
    def _weights(cls, value: list[Destination]) -> list[Destination]:
        if not value:
            raise ValueError("a route needs at least one destination in `to`")
        if sum(item.weight for item in value) <= 0:
            raise ValueError("destination weights sum to 0: at least one must be positive")
        return value


class ServiceConfig(Strict):
    endpoints: list[EndpointConfig] = Field(default_factory=list)
    discovery: DiscoveryConfig | None = None
    subsets: dict[str, dict[str, str]] = Field(default_factory=dict)
    load_balancer: LoadBalancerConfig | None = None
    routes: list[RouteConfig] = Field(default_factory=list)
    timeout: Duration | None = None
    retries: RetryPolicy | None = None
    hedging: HedgingConfig | None = None
    circuit_breaker: CircuitBreakerConfig | None = None
    outlier_detection: OutlierDetectionConfig | None = None
    limits: LimitsConfig | None = None
    inbound: InboundConfig | None = None
    rate_limit: RateLimitConfig | None = None
    faults: Faults | None = None
    tls: ServiceTls | None = None
    # add the Authorization of the request being served to calls to this service,
    # when a JWT provider with `forward: true` verified it
    forward_jwt: bool = False

    @model_validator(mode="after")
    def _endpoints_or_discovery(self) -> ServiceConfig:
        if self.endpoints and self.discovery is not None and self.discovery.registry != "static":
            raise ValueError("list `endpoints` or use a `discovery` registry, not both")
        return self


class Defaults(Strict):
    timeout: Duration | None = None
    retries: RetryPolicy | None = None
    load_balancer: LoadBalancerConfig | None = None
    hedging: HedgingConfig | None = None
    circuit_breaker: CircuitBreakerConfig | None = None
    outlier_detection: OutlierDetectionConfig | None = None
    limits: LimitsConfig | None = None
    rate_limit: RateLimitConfig | None = None
    faults: Faults | None = None


_DEFAULT_MIRROR_TIMEOUT: Any = "5s"  # validated like a policy value


class MirrorLimits(Strict):
    max_concurrent: int = Field(default=16, ge=1, le=4096)
    max_body_bytes: int = Field(default=65536, ge=0)
    # a mirror copy never waits longer than this, so a hanging target cannot hold slots
    timeout: Duration = Field(default=_DEFAULT_MIRROR_TIMEOUT, gt=0)


class TracingConfig(Strict):
    """OpenTelemetry tracing of the calls through the mesh (``telemetry.tracing``).

    Spans are made only while the application has installed a TracerProvider; the
    ratio applies to requests that arrive without a trace: the others follow the
    sampled flag of their parent.
    """

    enabled: bool = True
    # the share of new traces kept; like the SDK's default sampler, all of them until
    # told otherwise (a hot-reloadable setting, unlike the SDK's sampler)
    sample_ratio: float = Field(default=1.0, ge=0.0, le=1.0)


class TelemetryConfig(Strict):
    """What the mesh reports about each call, beyond the golden metrics."""

    # one JSON line per request on the `meshlib.access` logger
    access_log: bool = False
    # header names whose values the tap and the access log never show, on top of
    # authorization, proxy-authorization, cookie, set-cookie and x-api-key
    redact_headers: list[str] = Field(default_factory=list)
    tracing: TracingConfig = Field(default_factory=TracingConfig)
    # the golden-metric windows (mesh.stats(), the graph, /metrics) and the
    # OpenTelemetry metrics (while a MeterProvider is installed); false: neither
    metrics: bool = True
    # labels the OpenTelemetry request metrics leave out unless asked: the endpoint
    # called (client side) and the request path (both sides); unbounded in general
    metric_labels: list[Literal["endpoint", "path"]] = Field(default_factory=list)

    @field_validator("redact_headers")
    @classmethod
    def _lowercase(cls, value: list[str]) -> list[str]:
        return [name.lower() for name in value]


class MeshConfig(Strict):
    """A whole policy document."""

    @field_validator("trust_domain")
    @classmethod
    def _trust_domain(cls, value: str) -> str:
        return validate_trust_domain(value)

    trust_domain: str = "cluster.local"
    identity: IdentityConfig | None = None
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    defaults: Defaults = Field(default_factory=Defaults)
    mirroring: MirrorLimits = Field(default_factory=MirrorLimits)
    services: dict[ServiceName, ServiceConfig] = Field(default_factory=dict)


LoadBalancerConfig.model_rebuild()
