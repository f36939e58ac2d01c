"""The static registry: endpoints listed in the policy itself."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from meshlib.discovery.base import RegistryHealth, Resolution, Unsubscribe
from meshlib.endpoint import Endpoint


class StaticRegistry:
    """Endpoints fixed at construction; ``replace`` swaps them and notifies watchers."""

    name = "static"

    def __init__(self, endpoints: Mapping[str, tuple[Endpoint, ...]] | None = None) -> None:
        self._endpoints = dict(endpoints or {})
        self._version = 1
        self._updated = time.time()
        self._watchers: dict[str, list[Callable[[Resolution], None]]] = {}

    def resolve(self, service: str) -> Resolution:
        return Resolution(
            service, self._endpoints.get(service, ()), str(self._version), self._updated
        )

    def replace(self, service: str, endpoints: tuple[Endpoint, ...]) -> None:
        self._endpoints[service] = endpoints
        self._version += 1
        self._updated = time.time()
        for callback in list(self._watchers.get(service, ())):
            callback(self.resolve(service))

    def watch(self, service: str, callback: Callable[[Resolution], None]) -> Unsubscribe:
        self._watchers.setdefault(service, []).append(callback)
        return lambda: self._watchers.get(service, []).remove(callback)

    def health(self) -> RegistryHealth:
        return RegistryHealth(ok=True, last_update=self._updated)

    def close(self) -> None:
        self._watchers.clear()
