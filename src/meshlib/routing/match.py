"""Compiled route matchers. Pure: they read a RequestView and nothing else."""

from __future__ import annotations

import re
from dataclasses import dataclass

from meshlib.routing.request import RequestView


@dataclass(frozen=True, slots=True)
class ValueMatcher:
    """exact / prefix / suffix / regex / present / absent, optionally inverted."""

    kind: str
    value: str = ""
    pattern: re.Pattern[str] | None = None
    invert: bool = False

    def test(self, actual: str | None) -> bool:
        return self._raw(actual) != self.invert

    def _raw(self, actual: str | None) -> bool:
        kind = self.kind
        if kind == "present":
            return actual is not None
        if kind == "absent":
            return actual is None
        if actual is None:
            return False
        if kind == "exact":
            return actual == self.value
        if kind == "prefix":
            return actual.startswith(self.value)
        if kind == "suffix":
            return actual.endswith(self.value)
        assert self.pattern is not None
        return self.pattern.fullmatch(actual) is not None

    def describe(self) -> str:
        text = "present" if self.kind in ("present", "absent") else f"{self.kind} {self.value!r}"
        if self.kind == "absent":
            text = "absent"
        return f"not {text}" if self.invert else text


@dataclass(frozen=True, slots=True)
class RouteMatcher:
    """All conditions of one route; every one must hold."""

    path: ValueMatcher | None = None
    methods: frozenset[str] | None = None
    headers: tuple[tuple[str, ValueMatcher], ...] = ()
    query: tuple[tuple[str, ValueMatcher], ...] = ()

    def matches(self, request: RequestView) -> bool:
        if self.methods is not None and request.method not in self.methods:
            return False
        if self.path is not None and not self.path.test(request.path):
            return False
        for name, matcher in self.headers:
            if not matcher.test(request.headers.get(name)):
                return False
        for name, matcher in self.query:  # noqa: SIM110 - keep the loops parallel
            if not matcher.test(request.query(name)):
                return False
        return True

    def mismatch(self, request: RequestView) -> str | None:
        """Why the request does not match, or None when it does (for explain)."""
        if self.methods is not None and request.method not in self.methods:
            return f"method {request.method} not in {sorted(self.methods)}"
        if self.path is not None and not self.path.test(request.path):
            return f"path {request.path!r} is not {self.path.describe()}"
        for name, matcher in self.headers:
            actual = request.headers.get(name)
            if not matcher.test(actual):
                shown = "missing" if actual is None else repr(actual)
                return f"header {name} is {shown}, wanted {matcher.describe()}"
        for name, matcher in self.query:
            actual = request.query(name)
            if not matcher.test(actual):
                shown = "missing" if actual is None else repr(actual)
                return f"query {name} is {shown}, wanted {matcher.describe()}"
        return None

    def describe(self) -> str:
        parts = []
        if self.methods is not None:
            parts.append(f"method in {sorted(self.methods)}")
        if self.path is not None:
            parts.append(f"path {self.path.describe()}")
        parts.extend(f"header {name} {m.describe()}" for name, m in self.headers)
        parts.extend(f"query {name} {m.describe()}" for name, m in self.query)
        return " and ".join(parts) if parts else "any request"
