"""The Registry protocol that every discovery backend implements."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from meshlib.endpoint import Endpoint


@dataclass(frozen=True, slots=True)
class Resolution:
    """What a registry knows about one service right now."""

    service: str
    endpoints: tuple[Endpoint, ...]
    version: str
    updated_at: float
    stale: bool = False
    error: str | None = None


@dataclass(frozen=True, slots=True)
class RegistryHealth:
    """Whether the registry itself is reachable and current."""

    ok: bool
    last_update: float
    stale: bool = False
    last_error: str | None = None
    details: dict[str, object] = field(default_factory=dict)


Unsubscribe = Callable[[], None]


@runtime_checkable
class Registry(Protocol):
    """A source of endpoints for logical service names.

    Implementations must never raise from ``watch`` callbacks into the caller
    and must keep serving the last known endpoints (marked stale) when their
    backend is unreachable.
    """

    name: str

    def resolve(self, service: str) -> Resolution:
        """Current endpoints of ``service`` (empty when unknown)."""
        ...

    def watch(self, service: str, callback: Callable[[Resolution], None]) -> Unsubscribe:
        """Call ``callback`` with a new Resolution whenever ``service`` changes."""
        ...

    def health(self) -> RegistryHealth: ...

    def close(self) -> None: ...
