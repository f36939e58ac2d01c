"""Errors raised by meshlib. Every message says what to do about it."""

from __future__ import annotations

from dataclasses import dataclass

import httpx


class MeshError(Exception):
    """Base class of every error the mesh raises."""


@dataclass(frozen=True, slots=True)
class PolicyIssue:
    """One problem in a policy document, located as precisely as we can."""

    path: str
    message: str
    file: str = "<policy>"
    line: int | None = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        field = self.path or "<root>"
        return f"{where}: {field}: {self.message}"

    def to_dict(self) -> dict[str, object]:
        return {"file": self.file, "line": self.line, "path": self.path, "message": self.message}


class ConfigError(MeshError):
    """A policy could not be loaded; ``issues`` lists every problem found."""

    def __init__(self, issues: list[PolicyIssue]) -> None:
        self.issues = issues
        lines = "\n".join(f"  {issue}" for issue in issues)
        count = len(issues)
        super().__init__(f"invalid mesh policy ({count} problem{'s' * (count != 1)}):\n{lines}")


class NoRouteError(MeshError):
    """No route of the service matched the request."""


class NoHealthyEndpointError(MeshError):
    """The chosen cluster has no endpoint to send to."""


class UnknownServiceError(MeshError):
    """A name was asked for that the mesh does not know."""


class DeadlineExceeded(MeshError, httpx.TimeoutException):
    """A mesh timeout fired; the message says which one (route timeout or per-try).

    Also an ``httpx.TimeoutException``, so code that handles httpx timeouts keeps working.
    """

    def __init__(self, message: str, *, limit: str, seconds: float) -> None:
        super().__init__(message)
        self.limit = limit
        self.seconds = seconds


class CircuitOpenError(MeshError):
    """Every endpoint's breaker (or the cluster's) is open: failing fast."""


class OverloadedError(MeshError):
    """A concurrency limit (bulkhead) of the cluster is full; the call was not queued."""


class RateLimitedError(MeshError):
    """The client-side rate limit of the service or route has no tokens left."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after
