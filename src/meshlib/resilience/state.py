"""Stateful resilience objects that outlive snapshot swaps.

Each object is keyed by what it protects and by its policy: an unchanged
policy keeps its budget, breakers and ejections across a reload; a changed
one starts fresh. Objects not used by the newest snapshot are dropped.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class StateTable:
    """get-or-create by key, with mark-and-sweep between compiles."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._objects: dict[tuple[str, ...], Any] = {}
        self._used: set[tuple[str, ...]] = set()

    def get(self, key: tuple[str, ...], factory: Callable[[], T]) -> T:
        with self._lock:
            self._used.add(key)
            found = self._objects.get(key)
            if found is None:
                found = self._objects[key] = factory()
            return found

    def begin(self) -> None:
        """Start a compile: forget which objects were in use."""
        with self._lock:
            self._used = set()

    def sweep(self) -> None:
        """End a compile: drop objects the new snapshot did not ask for."""
        with self._lock:
            self._objects = {k: v for k, v in self._objects.items() if k in self._used}
