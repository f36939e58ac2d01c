"""The snapshot store: one current snapshot, swapped whole by writers.

Readers take ``store.current`` (a single attribute read, atomic in CPython)
and use that object for the whole request, so a swap never changes a request
that is already in flight.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from meshlib.config.compile import LoadTable, compile_snapshot, static_endpoints
from meshlib.config.model import MeshConfig
from meshlib.discovery.base import Registry
from meshlib.discovery.file import FileRegistry
from meshlib.endpoint import Endpoint
from meshlib.errors import ConfigError, PolicyIssue
from meshlib.resilience.state import StateTable
from meshlib.snapshot import Snapshot
from meshlib.telemetry.metrics import METRICS

log = logging.getLogger("meshlib.config")


class SnapshotStore:
    """Owns the policy, the registries it names, and the current snapshot."""

    def __init__(
        self,
        config: MeshConfig,
        source: str,
        registries: Mapping[str, Registry] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._rng = rng or random.Random()
        self._lock = threading.RLock()
        self._loads = LoadTable()
        self._state = StateTable()
        self._provided = dict(registries or {})
        self._registries: dict[str, Registry] = {}
        self._unsubscribe: list[Callable[[], None]] = []
        self._version = 0
        self.config = config
        self.source = source
        self.last_error: ConfigError | None = None
        self.last_error_at: float | None = None
        self.current: Snapshot = self._build(config)

    # -- writers -------------------------------------------------------------

    def apply(self, config: MeshConfig, source: str | None = None) -> Snapshot:
        """Swap in a snapshot for a new, already validated policy."""
        with self._lock:
            if source is not None:
                self.source = source
            self.current = self._build(config)  # raises ConfigError before anything changes
            self.config = config
            self.last_error = None
            self.last_error_at = None
            METRICS.config_reload(self)
            log.info("policy version %d in force (%s)", self.current.version, self.source)
            return self.current

    def reject(self, error: ConfigError) -> None:
        """Record a broken policy edit; the current snapshot stays in force."""
        with self._lock:
            self.last_error = error
            self.last_error_at = time.time()
        METRICS.config_error(self)
        log.error("%s\nkeeping policy version %d in force", error, self.current.version)

    def rebuild(self) -> None:
        """Recompile after a registry reported new endpoints."""
        with self._lock:
            self.current = self._build(self.config)

    def close(self) -> None:
        with self._lock:
            for unsubscribe in self._unsubscribe:
                unsubscribe()
            self._unsubscribe.clear()
            for registry in self._registries.values():
                registry.close()
            self._registries.clear()

    # -- internals -----------------------------------------------------------

    def _registry_for(self, service: str, kind: str, path: str | None) -> Registry:
        provided = self._provided.get(kind)
        if provided is not None:
            return provided
        if kind != "file" or path is None:
            known = ", ".join(["static", "file", *sorted(self._provided)])
            raise ConfigError(
                [
                    PolicyIssue(
                        f"services.{service}.discovery.registry",
                        f"unknown registry {kind!r} (known: {known}); pass other registries "
                        "as Mesh(..., registries={name: registry})",
                        self.source,
                    )
                ]
            )
        key = f"file:{self._resolve_path(path)}"
        registry = self._registries.get(key)
        if registry is None:
            registry = self._registries[key] = FileRegistry(self._resolve_path(path))
        return registry

    def _resolve_path(self, path: str) -> str:
        """Relative registry paths are relative to the policy file, not the cwd."""
        if os.path.isabs(path) or not os.path.isfile(self.source):
            return path
        return os.path.join(os.path.dirname(os.path.abspath(self.source)), path)

    def _build(self, config: MeshConfig) -> Snapshot:
        endpoints: dict[str, tuple[Endpoint, ...]] = {}
        discovery: dict[str, Any] = {}
        watches: list[tuple[Registry, str]] = []
        wanted: set[str] = set()
        for name, service in config.services.items():
            found = service.discovery
            if found is None or found.registry == "static":
                endpoints[name] = static_endpoints(service)
                discovery[name] = {"registry": "static", "endpoints": len(endpoints[name])}
                continue
            registry = self._registry_for(name, found.registry, found.path)
            if found.path is not None:
                wanted.add(f"file:{self._resolve_path(found.path)}")
            resolution = registry.resolve(found.name or name)
            endpoints[name] = resolution.endpoints
            discovery[name] = {
                "registry": registry.name,
                "version": resolution.version,
                "updated_at": resolution.updated_at,
                "stale": resolution.stale,
                "error": resolution.error,
                "endpoints": len(resolution.endpoints),
            }
            watches.append((registry, found.name or name))
        self._version += 1
        snapshot = compile_snapshot(
            config,
            endpoints,
            version=self._version,
            source=self.source,
            loads=self._loads,
            discovery=discovery,
            rng=self._rng,
            state=self._state,
        )
        # only now that the build succeeded: move the subscriptions over
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe = [
            registry.watch(name, lambda _resolution: self.rebuild()) for registry, name in watches
        ]
        for key in [key for key in self._registries if key not in wanted]:
            self._registries.pop(key).close()  # a file registry the policy no longer names
        METRICS.follow(snapshot)  # breaker transitions are counted
        return snapshot

    def registries(self) -> dict[str, Registry]:
        return {**self._provided, **self._registries}
