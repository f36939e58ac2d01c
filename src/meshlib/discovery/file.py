"""The file registry: endpoints of many services in a YAML/JSON file that another
agent (a deploy script, a config-management run) rewrites. Hot-reloaded."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from types import MappingProxyType

from pydantic import BaseModel, ConfigDict, Field

from meshlib.config.load import validate_model
from meshlib.config.model import EndpointConfig, ServiceName
from meshlib.config.source_yaml import DocumentError, load_document
from meshlib.discovery.base import RegistryHealth, Resolution, Unsubscribe
from meshlib.endpoint import Endpoint, parse_address
from meshlib.errors import ConfigError
from meshlib.filewatch import FileWatcher

log = logging.getLogger("meshlib.discovery.file")


class FileEndpoint(EndpointConfig):
    healthy: bool = True


class EndpointsFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    services: dict[ServiceName, list[FileEndpoint]] = Field(default_factory=dict)


def parse_endpoints_file(text: str, file: str) -> dict[str, tuple[Endpoint, ...]]:
    """Parse the endpoints file; ConfigError names file, line and field of each problem."""
    try:
        document = load_document(text, file)
    except DocumentError as exc:
        raise ConfigError(exc.issues) from None
    if document.data is None:
        document.data = {}
    parsed = validate_model(EndpointsFile, document)
    result: dict[str, tuple[Endpoint, ...]] = {}
    for service, items in parsed.services.items():
        endpoints = []
        for item in items:
            host, port = parse_address(item.address)
            endpoints.append(
                Endpoint(
                    host=host,
                    port=port,
                    weight=item.weight,
                    labels=MappingProxyType(dict(item.labels)),
                    region=item.locality.region,
                    zone=item.locality.zone,
                    priority=item.priority,
                    healthy=item.healthy,
                )
            )
        result[service] = tuple(endpoints)
    return result


class FileRegistry:
    """Watches one endpoints file; a broken edit keeps the last good endpoints (stale)."""

    name = "file"

    def __init__(self, path: str, *, interval: float = 0.25, watch: bool = True) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._endpoints: dict[str, tuple[Endpoint, ...]] = {}
        self._version = 0
        self._updated = 0.0
        self._error: str | None = None
        self._watchers: dict[str, list[Callable[[Resolution], None]]] = {}
        self._watcher = FileWatcher(path, self._load, interval=interval, name="registry")
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except OSError as exc:
            self._error = f"cannot read {path}: {exc.strerror}"
            log.warning("file registry: %s", self._error)
        else:
            self._watcher.prime(text)
            self._load(text)
        if watch:
            self._watcher.start()

    def _load(self, text: str) -> None:
        try:
            endpoints = parse_endpoints_file(text, self.path)
        except ConfigError as exc:
            self._error = str(exc)
            log.error("file registry keeps the last good endpoints: %s", exc)
            self._notify(set(self._watchers))  # they now see the endpoints as stale
            return
        with self._lock:
            changed = {
                name
                for name in set(endpoints) | set(self._endpoints)
                if endpoints.get(name) != self._endpoints.get(name)
            }
            self._endpoints = endpoints
            self._version += 1
            self._updated = time.time()
            if self._error is not None:
                changed |= set(self._watchers)  # no longer stale
            self._error = None
        self._notify(changed)

    def _notify(self, services: set[str]) -> None:
        with self._lock:
            callbacks = [(n, cb) for n in services for cb in self._watchers.get(n, ())]
        for name, callback in callbacks:
            try:
                callback(self.resolve(name))
            except Exception:
                log.exception("a watcher of %s failed", name)

    def resolve(self, service: str) -> Resolution:
        return Resolution(
            service,
            self._endpoints.get(service, ()),
            str(self._version),
            self._updated,
            stale=self._error is not None,
            error=self._error,
        )

    def watch(self, service: str, callback: Callable[[Resolution], None]) -> Unsubscribe:
        with self._lock:
            self._watchers.setdefault(service, []).append(callback)

        def unsubscribe() -> None:
            with self._lock:
                self._watchers.get(service, []).remove(callback)

        return unsubscribe

    def health(self) -> RegistryHealth:
        return RegistryHealth(
            ok=self._error is None,
            last_update=self._updated,
            stale=self._error is not None,
            last_error=self._error,
            details={"path": self.path, "version": self._version},
        )

    def refresh(self) -> None:
        """Check the file now instead of waiting for the next poll."""
        self._watcher.check()

    def close(self) -> None:
        self._watcher.stop()
