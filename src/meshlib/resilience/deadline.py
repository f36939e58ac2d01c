"""The deadline of the request being served, carried to the calls it makes.

The ASGI middleware sets it from the caller's ``x-mesh-timeout-ms``; every
mesh call made while handling that request gets at most the time that is left,
so a deadline holds across hops. A context variable follows asyncio tasks and
the thread pools that copy the context (Starlette's ``run_in_threadpool``).
"""

from __future__ import annotations

from contextvars import ContextVar

INBOUND_DEADLINE: ContextVar[float | None] = ContextVar("meshlib_inbound_deadline", default=None)
"""Monotonic time by which the request being served must be answered, if known."""
