"""The endpoint: one reachable address of a service, as discovery reports it.

Endpoints are immutable and live inside snapshots. The only mutable part is
``load`` (requests in flight), which is shared by every snapshot that contains
the same address so that least-request balancing keeps its view across config
swaps.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

_EMPTY: Mapping[str, str] = MappingProxyType({})


class EndpointLoad:
    """Mutable per-address counters used by balancers.

    Updated without a lock: under the GIL an increment may rarely be lost,
    which skews a least-request comparison for one pick and nothing else.
    """

    __slots__ = ("inflight", "total")

    def __init__(self) -> None:
        self.inflight = 0
        self.total = 0

    def __repr__(self) -> str:
        return f"EndpointLoad(inflight={self.inflight}, total={self.total})"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One address of a service, with the metadata balancers and subsets use."""

    host: str
    port: int
    weight: int = 1
    labels: Mapping[str, str] = field(default_factory=lambda: _EMPTY, hash=False)
    region: str = ""
    zone: str = ""
    priority: int = 0
    healthy: bool = True
    load: EndpointLoad = field(default_factory=EndpointLoad, compare=False, repr=False)
    address: str = field(init=False, compare=False, repr=False)
    """``host:port``, with IPv6 hosts in brackets; computed once, read on every request."""

    def __post_init__(self) -> None:
        host = self.host
        address = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"
        object.__setattr__(self, "address", address)

    def describe(self) -> dict[str, object]:
        """JSON-serialisable view for explain and config_dump."""
        return {
            "address": self.address,
            "weight": self.weight,
            "labels": dict(self.labels),
            "locality": {"region": self.region, "zone": self.zone},
            "priority": self.priority,
            "healthy": self.healthy,
            "inflight": self.load.inflight,
        }


def parse_address(address: str) -> tuple[str, int]:
    """Split ``host:port`` or ``[v6]:port``; raises ValueError with a reason."""
    if address.startswith("["):
        host, sep, rest = address[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"bad address {address!r}: expected [ipv6]:port")
        port_text = rest[1:]
    else:
        host, sep, port_text = address.rpartition(":")
        if not sep or not host:
            raise ValueError(f"bad address {address!r}: expected host:port")
        if ":" in host:
            raise ValueError(f"bad address {address!r}: write IPv6 hosts as [addr]:port")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"bad address {address!r}: port {port_text!r} is not a number") from None
    if not 0 < port < 65536:
        raise ValueError(f"bad address {address!r}: port {port} out of range 1-65535")
    return host, port
