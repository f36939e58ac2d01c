"""Classifying what happened to one attempt, the same way for every adapter."""

from __future__ import annotations

import httpx

from meshlib.errors import DeadlineExceeded

CONNECT_FAILURE = "connect-failure"
RESET = "reset"
TIMEOUT = "timeout"
OTHER = "other"

GATEWAY_STATUSES = frozenset({502, 503, 504})


def error_kind(exc: BaseException) -> str:
    """connect-failure / reset / timeout / other, for retry and outlier decisions."""
    if isinstance(exc, httpx.TimeoutException | TimeoutError):
        # a connect timeout never reached the server: safe to treat as a connect failure
        if isinstance(exc, httpx.ConnectTimeout):
            return CONNECT_FAILURE
        return TIMEOUT
    if isinstance(exc, httpx.ConnectError | ConnectionRefusedError):
        return CONNECT_FAILURE
    if isinstance(
        exc,
        httpx.RemoteProtocolError | httpx.ReadError | httpx.WriteError | ConnectionResetError,
    ):
        return RESET
    if isinstance(exc, httpx.NetworkError | ConnectionError):
        return CONNECT_FAILURE
    return OTHER


FAILURE_STATUS = 500
"""Statuses from this one on count as failures of the endpoint for breakers and
outlier detection (compared inline on the request path)."""


def deadline_exceeded(
    limit: str, seconds: float, route_timeout: float | None, where: str
) -> DeadlineExceeded:
    """The error for an expired limit; a route timeout reports its configured value."""
    if limit == "route timeout" and route_timeout:
        seconds = route_timeout
    return DeadlineExceeded(f"{limit} of {seconds:g}s fired {where}", limit=limit, seconds=seconds)
